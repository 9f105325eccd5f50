"""The sweep report: the AEVB Figure 2 view per data space, Optuna's history and importances, the best trial.

Written by the sweeper at the end of a sweep (and by `python -m vaerepro.sweep report STUDY`) from the
study and its MLflow child runs. The blocks and renderers are `vaerepro.document`'s; the comparison across
runs is the run report's (`vaerepro.report_comparison`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from vaerepro.document import (
    Block,
    Caution,
    Fig,
    Heading,
    Para,
    Table,
    png,
    write_document,
)
from vaerepro.files import locked
from vaerepro.sweep.space import SPACE_FREE_OBJECTIVES, objective_label, override_value
from vaerepro.sweep.study import INTERRUPTED, best_command, best_trial, top_trial
from vaerepro.sweep.study import unconverged as _unconverged

log = logging.getLogger(__name__)

# The end of the warning Optuna's importance evaluator gives with the placeholder values it returns when the
# completed trials cannot rank the parameters (PED-ANOVA, Optuna 5's default: optuna/importance/_ped_anova).
EQUAL_IMPORTANCES = "Parameter importances will be equal"


def _objective_rows(study, objective: str) -> list[dict[str, Any]]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        if "data_space" not in a:
            continue
        rows.append(
            {
                "run_name": f"trial {t.number}",
                "run_id": str(t.number),
                "value": t.value,
                "likelihood": a.get("likelihood"),
                "latent_dim": a.get("latent_dim"),
                "data_space": a["data_space"],
                "improper": a.get("improper", False),
                "unconverged": _unconverged(t, objective),
            }
        )
    return rows


def _objective_text(trial, objective: str) -> str:
    """The trial's objective value, marked when its log p(x) estimate has not converged."""
    if trial.value is None:
        return "n/a"
    return f"{trial.value:.4f}" + (" (NOT CONVERGED)" if _unconverged(trial, objective) else "")


def _objective_figures(study, objective: str) -> list:
    """The objective against the latent size, one line per likelihood: one figure, or one per data space;
    a group with one trial gets a sentence instead of a one-point axis."""
    import numpy as np
    from matplotlib.figure import Figure

    from vaerepro.compare import group_comparable, space_label
    from vaerepro.report_comparison import likelihood_colour

    rows = _objective_rows(study, objective)
    if not rows:
        return []
    if objective in SPACE_FREE_OBJECTIVES:
        groups = {("all", False): rows}
    else:
        groups = group_comparable(rows)
    figs = []
    for (space, improper), members in groups.items():
        title = "all data spaces" if space == "all" else space_label(space, improper)
        if len(members) == 1:
            figs.append(Para(f"{title}: only one completed trial ({members[0]['run_name']}), so no figure."))
            continue
        fig = Figure(figsize=(6.4, 4.0))
        ax = fig.add_subplot()
        by_lik: dict[str, list] = {}
        for r in members:
            by_lik.setdefault(str(r["likelihood"]), []).append(r)
        stray = 0  # trials whose log p(x) estimate has not converged
        for lik, rs in sorted(by_lik.items()):
            color = likelihood_colour(lik)
            for off in (False, True):
                part = [r for r in rs if r["unconverged"] is off]
                if not part:
                    continue
                d = np.array([float(r["latent_dim"]) for r in part])
                v = np.array([float(r["value"]) for r in part])
                if off:
                    # an unconverged estimate may be far from log p(x): hollow, and never in the mean a line
                    # joins, which would look like a converged result
                    stray += len(part)
                    ax.plot(d, v, "o", mfc="none", color=color, label=f"{lik}, NOT CONVERGED")
                    continue
                ax.plot(d, v, "o", color=color, label=lik)
                ud = np.unique(d)
                ax.plot(ud, [v[d == u].mean() for u in ud], "-", color=color)
        ax.set_xscale("log")
        ticks = sorted({int(r["latent_dim"]) for r in members})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("latent size (log scale)")
        ax.set_ylabel(objective_label(objective))
        ax.set_title(title, fontsize=9)
        ax.legend(title="likelihood", fontsize=8)
        fig.tight_layout()
        figs.append(
            Fig(
                f"objective-{space}-{'improper' if improper else 'proper'}",
                f"{objective} against latent size ({title})",
                png(fig),
                "Completed trials; lines join the mean at each latent size."
                + (
                    f" {stray} trial(s) whose log p(x) estimate has NOT CONVERGED: hollow markers, left out "
                    "of the lines."
                    if stray
                    else ""
                ),
            )
        )
    return figs


def _history_figure(study, objective: str):
    from matplotlib.figure import Figure
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    maximize = study.direction.name == "MAXIMIZE"
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    xs = [t.number for t in done]
    ys = [t.value for t in done]
    best, running = [], None
    for y in ys:
        running = y if running is None else (max if maximize else min)(running, y)
        best.append(running)
    # black and red: the colours C0-C2 mean likelihoods in the report's other figures (LIKELIHOOD_COLOURS)
    ax.plot(xs, ys, "o", color="k", label=f"{objective} of a trial")
    ax.step(xs, best, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial number")
    ax.set_ylabel(objective_label(objective))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return Fig(
        "history",
        "optimisation history",
        png(fig),
        "Optuna optimisation history: completed trials (pruned and failed ones have no value).",
    )


def _importance_blocks(study) -> list:
    from matplotlib.figure import Figure

    blocks: list[Block] = [Heading("Parameter importances")]
    try:
        import optuna

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            imp = optuna.importance.get_param_importances(study)
    except Exception as err:  # too few trials, nothing varies, ...: the report goes on without
        log.debug("no parameter importances", exc_info=True)
        return blocks + [Para(f"Not available: {err}")]
    # Where the trials cannot tell parameters apart (one completed trial; top and region quantiles of the
    # same trials) Optuna's evaluator only warns and returns placeholder values (all 0, or all equal): a
    # chart of them would look like a measurement.
    placeholder = [str(w.message) for w in caught if EQUAL_IMPORTANCES in str(w.message)]
    for w in caught:  # any other warning reaches the user as it would have without the recording
        if EQUAL_IMPORTANCES not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if placeholder:
        return blocks + [Para(f"Not available: Optuna: {placeholder[0]}")]
    if not imp:
        return blocks + [Para("Not available: no parameter varies across the completed trials.")]
    names = list(imp)[::-1]
    fig = Figure(figsize=(6.4, 0.6 + 0.45 * len(names)))
    ax = fig.add_subplot()
    ax.barh(names, [imp[n] for n in names])
    ax.set_xlabel("importance (normalised to sum to 1)")
    fig.tight_layout()
    return blocks + [
        Fig(
            "importances",
            "parameter importances",
            png(fig),
            "optuna.importance.get_param_importances over the completed trials (Optuna's default evaluator; "
            "PED-ANOVA in Optuna 5). Few trials make it rough.",
        )
    ]


def _unconverged_top(top, best, objective: str) -> str:
    """The warning for a top trial whose log p(x) estimate has not converged, naming the trial that wins
    instead (study.best_trial: the best of its data space whose estimate has converged or was not checked)."""
    text = (
        f"the best trial by {objective}, trial {top.number}, rests on a log p(x) estimate that has NOT "
        "CONVERGED (its metrics/eval.json says why): it may be far from log p(x) and does not win this sweep."
    )
    if best is None:
        return text + " No completed trial has a converged estimate."
    return text + f" The best trial whose estimate has converged: trial {best.number} ({best.value:.4f})."


def write_sweep_report(study, out_dir: Path, *, runs: list[dict] | None = None, storage: str = "") -> dict:
    """report.html (self-contained) and report.md (+ figures/) for a study and its trials' MLflow runs.

    The comparison across runs is the run report's AEVB Figure-2 view (log p(x) against latent size, one
    line per likelihood, one figure per data space and data source).
    """
    from optuna.trial import TrialState

    from vaerepro.report_comparison import comparison_section

    out_dir = Path(out_dir)
    objective = study.user_attrs.get("objective", "value")
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    top, best = top_trial(study), best_trial(study)
    title = f"Sweep report: study {study.study_name}"
    blocks: list[Block] = [
        Para(
            f"Objective: {objective_label(objective)}, to {study.direction.name.lower()}, from each trial's "
            "metrics/eval.json. "
            f"Trials: {len(trials)} — " + ", ".join(f"{n} {k}" for k, n in counts.items() if n) + ". "
            f"Storage: {storage or 'n/a'}."
        ),
        Heading("Best trial"),
    ]
    if top is None:
        blocks.append(Caution("no trial has completed yet"))
    elif best is None or best.number != top.number:  # the top trial's estimate has not converged
        blocks.append(Caution(_unconverged_top(top, best, objective)))
    if best is not None:
        rows = [["trial", str(best.number)], [objective, _objective_text(best, objective)]]
        rows += [[k, override_value(v)] for k, v in best.params.items()]
        rows.append(["command", best_command(best)])
        blocks.append(Table(["", "value"], rows, kind="best"))

    blocks.append(Heading("Trials"))
    table = []
    for t in trials:
        a = t.user_attrs
        table.append(
            [
                str(t.number),
                t.state.name + (" (interrupted)" if t.system_attrs.get(INTERRUPTED) else ""),
                _objective_text(t, objective),
                " ".join(f"{k}={override_value(v)}" for k, v in t.params.items()),
                str(a.get("data_space", "n/a")),
                "n/a" if a.get("wall_s") is None else f"{a['wall_s']:.1f}",
                str(a.get("mlflow_run_id", "n/a")),
            ]
        )
    header = ["trial", "state", objective_label(objective), "params", "data space", "wall s", "MLflow run"]
    blocks.append(Table(header, table))

    blocks.append(Heading(f"{objective} against latent size"))
    if objective not in SPACE_FREE_OBJECTIVES:
        blocks.append(Para(f"{objective} is in the units of its data space: one figure per space."))
    blocks += _objective_figures(study, objective) or [Para("No completed trial with a latent size yet.")]
    blocks.append(Heading("Optimisation history"))
    hist = _history_figure(study, objective)
    blocks.append(hist if hist is not None else Para("No completed trial yet."))
    blocks += _importance_blocks(study)
    blocks += comparison_section(runs) if runs is not None else [Para("MLflow tracking was off.")]

    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    # several sweep processes of one study (and `python -m vaerepro.sweep report`) may write the report at
    # once: a lock on the directory makes each one's documents and figures one set, written after the other's
    with locked(out_dir):
        figures = write_document(title, blocks, html_path, md_path, out_dir / "figures")
    return {"html": html_path, "md": md_path, "figures": figures}
