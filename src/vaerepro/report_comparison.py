"""The report section "Comparison across runs": the AEVB Figure 2 view, one figure and one ranking per group.

Runs are plain row dicts (see `compare`), one per run, as the caller reads them from MLflow. A group is one
data space (proper or improper) and one measurement (data source, test set, K: `compare.measurement`):
log-likelihoods in different units, of different test images or with different K never share a figure or
a ranking. Runs that cannot be placed in a group (no data space, failed, not finished, numbers no correct
evaluation gives, no log p(x)) are listed with the reason. The report's own run is marked "this run".
Used by the run report (`vaerepro.report`) and the sweep report (`vaerepro.sweep.report`).

Also here, how every report prints a log p(x) estimate: with its standard error, unit and convergence
verdict (`log_px_text`), and each likelihood's colour in every report's figures (`likelihood_colour`).
"""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Collection, Iterable, Mapping

import numpy as np
from matplotlib.figure import Figure

from vaerepro.compare import (
    IncomparableError,
    comparability_key,
    converged,
    group_comparable,
    impossible,
    measurement,
    measurement_text,
    metric_value,
    rank,
    space_label,
)
from vaerepro.document import Block, Caution, Fig, Heading, Para, Table, pm, png, slug

NATS = "nats/example"  # the unit of every log-likelihood and bound in the reports
EXCLUDED_STATUSES = {"FAILED", "KILLED"}  # MLflow run statuses never plotted or ranked
# A RUNNING run is not a result yet: MLflow cannot tell a run still going (a sweep trial, another pipeline)
# from one killed with kill -9 that nobody ended, and its numbers may be an evaluation logged in part, or
# replaced by the next evaluation of the same K (tracking.evaluations.evaluation_run). Unlike an unconverged
# estimate, a finished measurement with a known weakness that is plotted hollow and listed unranked, it is
# neither plotted nor ranked, in the run report and the sweep report alike: it is listed with the runs left
# out, with this reason. The report's own run is the exception (`this_run`).
UNFINISHED_STATUSES = {"RUNNING", "SCHEDULED"}
THIS_RUN = "this run"  # the mark of the report's own run, in the ranking and the figure
# One colour per likelihood (of matplotlib's default cycle) in every figure of the run and sweep reports,
# whichever likelihoods share a figure, so that a reader follows one likelihood from figure to figure.
# Keyed by likelihoods.REGISTRY's names (a test holds the two together); grey (C7) for a run naming none.
LIKELIHOOD_COLOURS = {"bernoulli": "C0", "continuous_bernoulli": "C1", "gaussian": "C2"}


def likelihood_colour(name: str) -> str:
    return LIKELIHOOD_COLOURS.get(name, "C7")


def not_a_result(row: Mapping) -> str | None:
    """Why a run's numbers are no result of the model its run holds now, by the run's status and whether they
    are of weights its training has since replaced (`stale`, tracking.experiment_runs); None when they are
    one. The runs for which it is None are those the MLflow UI's parallel coordinates draw, each view those
    of one measurement (tracking.ui.COMPARABLE_FILTER, measurement_filter; tests/test_tracking.py holds the
    two to each other)."""
    status = str(row.get("status") or "").upper()
    if status in EXCLUDED_STATUSES:
        return f"status {status}"
    if status in UNFINISHED_STATUSES:
        return f"status {status}, not finished: its numbers may be partial or still change"
    if row.get("stale"):
        return str(row["stale"])
    return None


def verdict(row: Mapping) -> str:
    """The convergence verdict of a row's log p(x) estimate, in words (see estimators.convergence)."""
    c = converged(row)
    return "converged" if c else "NOT CONVERGED" if c is False else "convergence not checked"


def log_px_text(row: Mapping) -> str:
    """'log p(x) ± SE nats/example (verdict)': every log p(x) the report shows carries its verdict."""
    text = pm(row.get("log_px"), row.get("log_px_se"), NATS)
    return text if text == "n/a" else f"{text} ({verdict(row)})"


_IMPROPER_GROUP_TEXT = (
    "IMPROPER runs: Bernoulli likelihoods on grey-level pixels, not normalised densities. Ordered here "
    "among themselves only; not comparable with any proper run."
)


def comparison_section(runs: Iterable[Mapping] | None, this_run: str | None = None) -> list[Block]:
    """The section's blocks for these runs (row dicts, see `compare`): per group a heading, the figure of
    log p(x) against latent size (when at least two runs have one) and the ranking; then the runs left out
    and why. None or no runs: a sentence saying so.

    `this_run`: the run id of the report's own run, marked THIS_RUN. It is RUNNING while its report is
    written (tracking.log_report ends it after) and may still read FAILED from an earlier failed report
    stage; its evaluation has finished (the report reads it from metrics/eval.json), so its status does not
    leave it out."""
    blocks: list[Block] = [Heading("Comparison across runs")]
    runs = list(runs or [])
    if not runs:
        return blocks + [Para("No other runs were passed to the report.")]
    repeated = _repeated_names(runs)
    usable, excluded = [], []
    for r in runs:
        mine = this_run is not None and r.get("run_id") == this_run
        try:
            comparability_key(r)
        except IncomparableError as e:
            excluded.append((r, str(e)))
            continue
        if not mine and (why := not_a_result(r)) is not None:
            excluded.append((r, why))
        elif (why := impossible(r)) is not None:  # a damaged or hand-edited record: no result to rank
            excluded.append((r, f"impossible value: {why}"))
        elif metric_value(r, "log_px") is None:
            excluded.append((r, "no log p(x)"))
        else:
            usable.append(r)

    blocks.append(
        Para(
            "As in AEVB's Figure 2: the log p(x) estimate against the size of the latent space, one line "
            "per likelihood. One figure and one ranking per data space: a pmf on binary pixels, a density "
            "on pixels in [0,1] and an improper Bernoulli on grey levels are different units, never put "
            "on one scale."
        )
    )
    for (space, improper), rows in group_comparable(usable).items():
        label = space_label(space, improper)
        # Same unit is not enough: estimates of other test images, or with another K, are not one measurement,
        # so each measurement gets its own figure and ranking inside its data-space group.
        by_measurement: dict[tuple[str, str, str], list[Mapping]] = {}
        for r in rows:
            by_measurement.setdefault(measurement(r), []).append(r)
        for m, members in by_measurement.items():
            heading = label if len(by_measurement) == 1 else f"{label} — {measurement_text(m)}"
            blocks.append(Heading(heading, level=3))
            if improper:
                blocks.append(Caution(_IMPROPER_GROUP_TEXT))
            blocks.append(Para(f"Every estimate here: {measurement_text(m)} importance samples."))
            suffix = "" if len(by_measurement) == 1 else f"-{slug('-'.join(m))}"
            plotted = [r for r in members if _latent(r) is not None]
            if len(plotted) >= 2:
                blocks.append(_group_figure(space, improper, members, suffix, this_run))
            elif len(members) == 1:
                blocks.append(Para(_ONE_RUN_TEXT.format(run=_run_name(members[0], this_run))))
            else:
                blocks.append(Para(_ONE_POINT_TEXT.format(n=len(members), plotted=len(plotted))))
            blocks += _ranking_blocks(space, improper, members, this_run, repeated)

    if excluded:
        blocks.append(Heading("Not plotted, not ranked", level=3))
        blocks.append(
            Table(
                ["run", "status", "likelihood", "data space", "improper", "reason"],
                [
                    [
                        _run_name(r, repeated=repeated),
                        str(r.get("status") or "n/a"),
                        str(r.get("likelihood") or "n/a"),
                        str(r.get("data_space") or "n/a"),
                        str(r.get("improper", "n/a")),
                        why,
                    ]
                    for r, why in excluded
                ],
                kind="excluded",
            )
        )
    return blocks


_ONE_RUN_TEXT = (
    "Only one run in this group ({run}): nothing to compare it with, so no figure; its numbers are in the "
    "table below."
)
_ONE_POINT_TEXT = (
    "{n} runs, {plotted} of them with a latent size to plot against: one point is no comparison, so no "
    "figure; the numbers are in the table below."
)
_UNCONVERGED_NOTE = (
    "Rank —: the log p(x) estimate has NOT CONVERGED (its ladder still rises with K, or too few effective "
    "samples); it may still be far from log p(x), so it is listed after the ranked runs and not ranked."
)


def _run_name(row: Mapping, this_run: str | None = None, repeated: Collection[str] = ()) -> str:
    """The run's name, with THIS_RUN for the report's own run; a name that `repeated` holds (runs named alike,
    the same likelihood, latent size and seed with another learning rate, say) with its run id's first 8
    characters, so that two rows never read the same."""
    name = str(row.get("run_name") or row.get("run_id") or "?")
    if name in repeated and row.get("run_id"):
        name = f"{name} [{str(row['run_id'])[:8]}]"
    return f"{name} ({THIS_RUN})" if this_run is not None and row.get("run_id") == this_run else name


def _repeated_names(rows: Iterable[Mapping]) -> set[str]:
    """The run names more than one of `rows` has."""
    counts = Counter(str(r.get("run_name") or r.get("run_id") or "?") for r in rows)
    return {name for name, n in counts.items() if n > 1}


def _latent(row: Mapping) -> int | None:
    """The run's latent size, or None without a positive one (such a run is ranked, not plotted)."""
    v = metric_value(row, "latent_dim")
    return int(v) if v is not None and v > 0 else None


def _group_figure(
    space: str, improper: bool, rows: list[Mapping], id_suffix: str = "", this_run: str | None = None
) -> Fig:
    """log p(x) ± SE against latent size, one line per likelihood, for the runs of one group; `id_suffix`
    tells apart the figures of different data sources in one data space; the point of run `this_run` is
    labelled THIS_RUN."""
    label = space_label(space, improper)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    by_lik: dict[str, list[Mapping]] = {}
    for r in rows:
        by_lik.setdefault(str(r.get("likelihood") or "?"), []).append(r)
    dims: set[int] = set()
    unplotted = unconverged = 0
    for lik, members in by_lik.items():
        pts = [
            (
                _latent(r),
                metric_value(r, "log_px"),
                metric_value(r, "log_px_se") or 0.0,
                converged(r) is False,
            )
            for r in members
        ]
        unplotted += sum(p[0] is None for p in pts)
        pts = sorted(p for p in pts if p[0] is not None)
        dims.update(int(p[0]) for p in pts)
        color = likelihood_colour(lik)
        for stray in (False, True):
            part = [p[:3] for p in pts if p[3] is stray]
            if not part:
                continue
            d, v, s = (np.array(c, dtype=float) for c in zip(*part, strict=True))
            if stray:
                # an unconverged estimate may still be far from log p(x): drawn hollow, never in the mean the
                # line joins, which would otherwise look like a converged result
                unconverged += len(part)
                legend, face = f"{lik}, NOT CONVERGED (not joined)", "none"
            else:
                legend, face = lik, None
            ax.errorbar(d, v, yerr=s, fmt="o", capsize=3, color=color, mfc=face, label=legend)
            if not stray:  # the line joins the mean over runs (seeds) at each latent size
                ud = np.unique(d)
                ax.plot(ud, [v[d == u].mean() for u in ud], "-", color=color)
    mine = [r for r in rows if this_run is not None and r.get("run_id") == this_run]
    mine = [r for r in mine if _latent(r) is not None]  # a run without a latent size is not plotted
    for r in mine:
        ax.annotate(
            THIS_RUN,
            (_latent(r), metric_value(r, "log_px")),
            xytext=(12, 12),
            textcoords="offset points",
            arrowprops={"arrowstyle": "->"},
            fontsize=8,
        )
    ax.set_xscale("log")
    if dims:
        ticks = sorted(dims)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("latent size (log scale)")
    what = "improper Bernoulli score" if improper else "log p(x) estimate"
    ax.set_ylabel(f"{what} ({NATS})")
    ax.set_title(textwrap.fill(label, 70), fontsize=9)
    if dims:
        ax.legend(title="likelihood", fontsize=8)
    fig.tight_layout()
    caption = (
        f"{len(rows)} run(s). Error bars: ± one standard error; lines join the mean at each latent size."
    )
    if unplotted:
        caption += f" {unplotted} run(s) without a latent size are ranked but not plotted."
    if unconverged:
        caption += (
            f" {unconverged} run(s) whose log p(x) estimate has NOT CONVERGED: hollow markers, left out "
            "of the lines."
        )
    if mine:
        caption += f" The arrow marks {THIS_RUN} ({_run_name(mine[0])})."
    return Fig(
        f"compare-{slug(space)}-{'improper' if improper else 'proper'}{id_suffix}",
        f"Comparison across runs: {label}",
        png(fig),
        caption,
    )


def _ranking_blocks(
    space: str,
    improper: bool,
    rows: list[Mapping],
    this_run: str | None = None,
    repeated: Collection[str] = (),
) -> list[Block]:
    """The ranking by log p(x) (compare.rank: unconverged estimates after the rest, here unranked) and,
    when there are unconverged ones, the note saying why; the report's own run (`this_run`) is ranked as
    any other, its name marked THIS_RUN."""
    ranked = rank(rows, "log_px", higher_is_better=True)
    body, attrs = [], []
    for i, r in enumerate(ranked, start=1):
        s, imp = comparability_key(r)
        body.append(
            [
                "—" if converged(r) is False else str(i),
                _run_name(r, this_run, repeated),
                str(r.get("likelihood") or "n/a"),
                str(r.get("latent_dim", "n/a")),
                str(r.get("source") or "n/a"),
                log_px_text(r),
                pm(r.get("elbo"), None, NATS),
                pm(r.get("bits_per_dim"), None, "bits/dim", 4),
                s + (" (IMPROPER)" if imp else ""),
            ]
        )
        attrs.append({"data-space": s, "data-improper": str(imp).lower()})
    header = [
        "rank",
        "run",
        "likelihood",
        "latent size",
        "source",
        "log p(x) estimate",
        "ELBO (lower bound)",
        "bits/dim",
        "data space",
    ]
    table = Table(
        header,
        body,
        kind="ranking",
        attrs={"data-space": space, "data-improper": str(improper).lower()},
        row_attrs=attrs,
    )
    return [table] + ([Para(_UNCONVERGED_NOTE)] if any(converged(r) is False for r in ranked) else [])
