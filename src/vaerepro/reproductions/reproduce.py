"""`vaerepro reproduce NAME`: a paper's preset run once per seed, judged against the published numbers,
recorded in MLflow and written up as a reproduction card.

- Configuration: the preset's overrides, then SMOKE_OVERRIDES (--smoke), then the user's, composed with
  conf/ and validated before anything runs, as `vaerepro run` does (a mistake is one ConfigError naming it).
- Runs: one pipeline run per seed 0 .. N-1, each `vaerepro run ... seed=<s>` (cli.run_pipeline) as a
  process of its own in runs/reproductions/NAME/seed_<s>/: the command line imports the presets, which
  import this module, so importing cli here would be a cycle; and, as with sweep trials, no seed's state
  (seeded generators, MLflow's active run) reaches the next.
- Verdict: judge.judge: each published value against the result its preset names, mean and 95 %
  Student-t interval across seeds, with the run's departures from the protocol: never "reproduced"
  off-protocol.
- Card: reports/reproductions/NAME.md and .html (figures in NAME_figures/), written by
  card.py from the Result.
- MLflow: one parent run per reproduction (tracking.reproduction), the seeds' runs its children.
- Resuming (--resume): reproduction.json and each finished seed's marker (resumption.py) say what was
  asked and what is done; a finished seed is read from disk, a stopped one continues from its
  models/last.ckpt (train.resume=true), the others run from the start, all under the same parent run.

A smoke run (--smoke) writes under runs/reproductions/smoke/ and reports/reproductions/smoke/, so it never
replaces a real reproduction's results.

This module runs a reproduction (plan, the seeds' processes, the resume bookkeeping, the MLflow parent run,
the verdict); what it plans and what the seeds wrote are results.py's types (Plan, SeedResult, Result);
the card and the printed summary are card.py's.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vaerepro import config as config_mod
from vaerepro import run_dirs
from vaerepro.config import Config
from vaerepro.errors import Stopped, UserError
from vaerepro.reproductions import judge as R
from vaerepro.reproductions import resumption as resume_mod
from vaerepro.reproductions.card import write_card
from vaerepro.reproductions.results import Plan, Result, SeedResult
from vaerepro.tracking import reproduction as track
from vaerepro.tracking.names import space_name

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
        # the command, last: it can be copied whole. Status 2 is a refusal of the seed's input (a damaged
        # last.ckpt, say): resuming as it is meets it again, so the message says to mend what it named first
        mend = "once what it refused is mended, " if self.returncode == 2 else ""
        then = f"; resume {mend}with: {resume}" if resume else ""
        super().__init__(f"seed {seed}: `vaerepro run` ended with status {self.returncode}; {where}{then}")

    @property
    def stopped(self) -> bool:
        return self.returncode in (130, 143)  # SIGINT, SIGTERM


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
    and reports/. Seeds: `seeds`, else 1 for a smoke run and judge.seeds_needed otherwise."""
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


def environment(root: Path, cfg: Config, seeds: Sequence[SeedResult]) -> dict[str, str]:
    """Where and with what the reproduction ran: commit, data digest, versions, devices. The commit, the
    versions and the devices are those the seeds' train.json and eval.json record (values joined by " / "
    where resumed seeds ran elsewhere or from other code); this process's for records from before they held
    them."""
    import torch

    from vaerepro.checkpoints import data_digest
    from vaerepro.versions import git_commit, versions

    def joined(values: Iterable[str]) -> str:  # each value once, in the order of the seeds
        return " / ".join(dict.fromkeys(values))

    meta = seeds[0].meta if seeds else {}
    sizes = {k: meta["sizes"][k] for k in ("train", "val", "test") if k in (meta.get("sizes") or {})}
    digests = sorted({d for s in seeds if (d := data_digest(s.meta))})
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    t = cfg.trainer
    on_gpu = gpu is not None and t.accelerator != "cpu"
    machine = f"{gpu if on_gpu else cpu} x {t.devices} device(s) x {t.num_nodes} node(s)"
    ev = gpu if gpu is not None and cfg.eval.device != "cpu" else cpu
    recorded = [r for s in seeds for r in (s.train, s.eval) if isinstance(r.get("versions"), Mapping)]
    software = [r["versions"] for r in recorded] or [versions()]
    names = dict.fromkeys(name for v in software for name in v)
    trained = joined(s.train["device"] for s in seeds if isinstance(s.train.get("device"), str))
    evaluated = joined(s.eval["device"] for s in seeds if isinstance(s.eval.get("device"), str))
    commits = joined(
        r["commit"] for s in seeds for r in (s.train, s.eval) if isinstance(r.get("commit"), str)
    )
    return {
        "git commit": commits or git_commit(root) or "unknown (not a git checkout)",
        "data": f"{meta.get('source', '?')}: {', '.join(f'{k} {sizes[k]:,}' for k in sizes)} images",
        "data digest": "sha256 of prepared/x_train.npy: " + (" / ".join(digests) or "none"),
        "raw files (md5)": ", ".join(f"{k} {v}" for k, v in (meta.get("raw_files") or {}).items()) or "none",
        **{name: joined(str(v.get(name, "not recorded")) for v in software) for name in names},
        "training device": trained or machine,
        "evaluation device": evaluated or ev,
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
    lock: int,
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
        (seed_dir / run_dirs.RUN_MARK).unlink(missing_ok=True)  # the run there before is given up
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
        # the seed holds the reproduction's lock too (resumption.held): while it runs, no other invocation
        # starts, even after this process is killed (-9), which stops the seed at its epoch end as SIGTERM
        # does (signals.stop_with_parent: the seed watches this process)
        proc = _start_ignoring_sigint(cmd, cwd=root, env=env, stdout=2, pass_fds=(lock,))
        try:
            rc = proc.wait()
        except BaseException:
            # stopped (SIGTERM, Ctrl-C): the seed stops at its epoch end, as `vaerepro run` does on SIGTERM;
            # a second Ctrl-C, or no epoch end within STOP_GRACE_S, stops it at once
            proc.terminate()
            try:
                rc = proc.wait(timeout=STOP_GRACE_S)
            except BaseException:  # subprocess.TimeoutExpired, or a second Ctrl-C
                proc.kill()
                rc = proc.wait()
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


def _check_ran_as_planned(p: Plan, hows: dict[int, resume_mod.How]) -> None:
    """Resuming: each seed that ran before (read from disk, or continued) ran with the configuration this
    invocation plans, seed aside; a UserError naming the first setting that differs otherwise. The record
    holds the overrides only, so conf/ changed between the invocations (an edit, a pull) would otherwise mix
    seeds of two settings in one verdict. Where and how fast a run goes (reproduction.NEUTRAL_KEYS) may
    differ; a seed without its .hydra/config.yaml (Hydra's record of what the run composed) is not checked.
    A seed read from disk has its result files read here too, so that a damaged one is refused before
    anything runs (SeedResult.read names it). Reads only."""
    import yaml

    for seed, how in hows.items():
        if how == "reuse":
            SeedResult.read(seed, p.run_dir / f"seed_{seed}")
        path = p.run_dir / f"seed_{seed}" / ".hydra" / "config.yaml"
        if how == "start" or not path.is_file():
            continue
        try:
            ran = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: not YAML ({err}); seed {seed}'s settings cannot be checked") from None
        differ = R.setting_differences(ran if isinstance(ran, dict) else {}, p.config)
        if differ:
            key, old, new = differ[0]
            raise UserError(
                f"--resume: seed {seed} ran with {key}={old!r} ({path}), this invocation would run "
                f"{key}={new!r}: conf/ has changed since it ran, and one verdict cannot mix the two; "
                "restore conf/ to resume, or start again with --fresh (the stopped one is kept)"
            )


def _start_ignoring_sigint(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    """subprocess.Popen(cmd, **kwargs) with SIGINT ignored in the new process.

    Ctrl-C at a terminal signals every process of the foreground group: the seed's `vaerepro run` too,
    which would stop mid-epoch (KeyboardInterrupt), where no models/last.ckpt can be written (a mid-epoch
    state does not resume exactly). Ignored there (exec keeps an ignored signal ignored, and Python then
    installs no KeyboardInterrupt handler), Ctrl-C reaches this process only, which asks the seed to stop
    at its epoch end (SIGTERM). SIGINT is ignored here for the instant of the fork: a Ctrl-C within it is
    lost, and the next one works. Not preexec_fn, which is unsafe in a process with threads (MLflow's)."""
    # only the main thread may set a handler (and it is where Ctrl-C arrives); None: a handler set outside
    # Python, which could not be put back
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        return subprocess.Popen(cmd, **kwargs)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.Popen(cmd, **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)


def run(
    preset: R.Preset,
    user: Sequence[str] = (),
    *,
    seeds: int | None = None,
    smoke: bool = False,
    root: Path | None = None,
    out: Path | None = None,
    resume: bool = False,
    fresh: bool = False,
) -> tuple[Result, dict[str, Any]]:
    """Run the preset (see the module's docstring); returns the result and the card's paths (md, html,
    figures). Raises ConfigError / UserError for bad input before anything runs or is written (with
    `resume`: no record to resume, or one of other overrides or seeds), SeedFailed when a seed's process
    fails (the reproduction's MLflow run then ends FAILED, or KILLED when it was stopped). Every way out
    that leaves the reproduction unfinished names the command that resumes it: in SeedFailed's message, and
    as the `hint` of a stop (Stopped, KeyboardInterrupt). Without `resume`, an earlier reproduction in the
    same directory is kept (resumption.set_aside): moved beside it, or, when it was stopped and `fresh` is
    not given, the run is refused with the command that resumes it."""
    root = (root or config_mod.find_project_root()).resolve()
    out = out.resolve() if out is not None else None  # the seeds' processes run in `root`
    p = plan(preset, user, seeds=seeds, smoke=smoke, root=root, out=out)
    cfg = config_mod.validate(p.config)
    if resume:  # what it cannot resume is refused before the lock's file is made (and again under it)
        resume_mod.Ledger.stopped(p.run_dir, p.asked)
    with resume_mod.held(p.run_dir) as lock:  # one invocation at a time, its seeds' processes included
        return _run(p, cfg, root, lock, resume=resume, fresh=fresh)


def _run(
    p: Plan, cfg: Config, root: Path, lock: int, *, resume: bool, fresh: bool
) -> tuple[Result, dict[str, Any]]:
    """`run` under its hold on the reproduction (`lock`, the file descriptor each seed's process inherits)."""
    preset, smoke = p.preset, p.smoke
    if resume:
        ledger = resume_mod.Ledger.stopped(p.run_dir, p.asked)
        hows = {s: ledger.how(s) for s in p.seeds}
        _check_ran_as_planned(p, hows)  # before anything runs or is written
    else:
        name = preset.name
        card = [p.card_dir / f"{name}.md", p.card_dir / f"{name}.html", p.card_dir / f"{name}_figures"]
        if (kept := resume_mod.set_aside(p.run_dir, card, fresh=fresh, out=p.out)) is not None:
            log.info("%s: the earlier reproduction in %s is kept in %s", name, p.run_dir, kept)
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
        done = [_run_seed(p, s, root, rep, ledger, hows[s], lock) for s in p.seeds]
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
            space=space_name(cfg.data_space, cfg.improper),  # the space the seeds measured in
        )
    ledger.end("FINISHED", time.perf_counter() - start)
    return result, paths
