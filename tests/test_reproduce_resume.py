"""`vaerepro reproduce NAME --resume`: a stopped reproduction goes on where it stopped.

End to end (slow), once for the module: a 2-seed --smoke reproduction stopped by Ctrl-C while seed 1 trains
(after seed 0 finished), then resumed with the command the stop printed. The resumed invocation runs seed 1
only, continuing its models/last.ckpt and its MLflow run, under the same parent run, and its card and
summary are the whole reproduction's. Fast: --resume refuses, in one line and touching nothing, a request
with nothing to resume or other overrides or seeds. Then a fresh run over a stopped one: no seed of the
earlier reproduction is reused or continued.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import shutil
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import BIN, ROOT, ctrl_c_at_a_terminal, curve
from vaerepro.reproductions import presets as P
from vaerepro.reproductions import resumption

PRESET = "aevb-mnist-z3"  # two published values: the test ELBO (eval.json) and the training ELBO
REAL_POPEN = subprocess.Popen


def _option(cmd: list[str], key: str) -> str:
    return next(a.split("=", 1)[1] for a in cmd if a.startswith(f"{key}="))


def seed_processes(mp: pytest.MonkeyPatch, stop: Callable[[int, Path], bool] | None = None) -> list[list]:
    """Record each seed's `vaerepro run` command line (reproduce starts them with subprocess.Popen; every
    other process passes untouched). stop(seed, seed_dir), asked every 0.1 s while a seed's process runs:
    when true, Ctrl-C reaches the reproduction there (KeyboardInterrupt from its wait)."""
    calls: list[list] = []

    class Popen(REAL_POPEN):
        def __init__(self, args, *a, **kw):
            super().__init__(args, *a, **kw)
            self.seed = int(_option(args, "seed")) if "vaerepro.cli" in args else None
            if self.seed is not None:
                calls.append(list(args))
                self.seed_dir = Path(_option(args, "hydra.run.dir"))

        def wait(self, timeout=None):
            if self.seed is None or stop is None or timeout is not None:
                return super().wait(timeout)
            while True:
                try:
                    return super().wait(0.1)
                except subprocess.TimeoutExpired:
                    if stop(self.seed, self.seed_dir):
                        raise KeyboardInterrupt from None

    mp.setattr(subprocess, "Popen", Popen)
    return calls


def invoke(argv: list[str]) -> tuple[int, str, str]:
    """P.main(argv): its exit status, stdout and stderr (the seeds' processes log to fd 2, not here)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = P.main(argv)
    return status, out.getvalue(), err.getvalue()


def snapshot(d: Path) -> dict[str, int]:
    """Every file under d with its modification time (ns)."""
    return {str(f.relative_to(d)): f.stat().st_mtime_ns for f in sorted(d.rglob("*")) if f.is_file()}


# --- bad input: one line, exit 2, nothing touched ----------------------------------------------------
@pytest.mark.slow
def test_resume_refuses_what_it_cannot_resume(tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_dir = out / "runs" / "reproductions" / "smoke" / PRESET
    argv = [PRESET, "tracking.enabled=false", "--smoke", "--seeds", "2", "--out", str(out)]

    status, _, err = invoke([PRESET, "--smoke", "--out", str(out), "--resume"])
    assert status == 2 and err == (
        f"vaerepro reproduce: no stopped reproduction of {PRESET} in {run_dir} to resume; run it without "
        "--resume\n"
    )
    assert not out.exists()  # refused before anything was made

    # a reproduction stopped (Ctrl-C) as its first seed's process starts: its record is written first
    calls = seed_processes(monkeypatch, stop=lambda seed, seed_dir: True)
    status, _, err = invoke(argv)
    resume = shlex.join(["vaerepro", "reproduce", PRESET, "tracking.enabled=false", "--seeds", "2"])
    resume += f" --smoke --out {out} --resume"
    assert status == 130 and err == f"vaerepro reproduce: stopped (Ctrl-C); resume with: {resume}\n"
    assert [_option(c, "seed") for c in calls] == ["0"]
    record = json.loads((run_dir / resumption.RECORD).read_text())
    assert (record["preset"], record["seeds"], record["smoke"]) == (PRESET, 2, True)
    assert record["user_overrides"] == ["tracking.enabled=false"] and record["mlflow"] is None
    (inv,) = record["invocations"]
    assert inv["status"] == "KILLED" and inv["resumed"] is False and list(inv["seeds"]) == ["0"]
    assert inv["seeds"]["0"]["how"] == "start" and inv["seeds"]["0"]["wall_s"] > 0  # its end was seen

    before = snapshot(out)
    for extra, named in [
        (["model.latent_dim=4"], "overrides `tracking.enabled=false model.latent_dim=4` (recorded: "),
        (["--seeds", "3"], "--seeds 3 (recorded: --seeds 2)"),
    ]:
        status, _, err = invoke([*argv, *extra, "--resume"])
        assert status == 2 and err.count("\n") == 1 and named in err, err
        assert err.startswith("vaerepro reproduce: --resume: ") and str(run_dir / resumption.RECORD) in err
    # without the recorded override: named as what the request has (none) against the record's
    status, _, err = invoke([PRESET, "--smoke", "--seeds", "2", "--out", str(out), "--resume"])
    assert status == 2 and "overrides none (recorded: `tracking.enabled=false`)" in err, err
    assert snapshot(out) == before and len(calls) == 1  # no file touched, no process started

    # the same command without --resume: refused, naming how to go on or start again; nothing touched
    status, _, err = invoke(argv)
    assert status == 2 and err == (
        f"vaerepro reproduce: {run_dir} holds a stopped reproduction (0 of 2 seeds finished): go on with "
        f"`{resume}`, or start again with --fresh (the stopped one is then kept beside the new one)\n"
    )
    status, _, err = invoke([*argv, "--fresh", "--resume"])
    assert status == 2 and "--fresh and --resume: give one" in err
    assert snapshot(out) == before and len(calls) == 1

    (run_dir / resumption.RECORD).write_text("{not json")
    before = snapshot(out)
    status, _, err = invoke([*argv, "--resume"])
    assert status == 2 and err.count("\n") == 1, err
    assert f"{run_dir / resumption.RECORD}: not a reproduction record" in err
    assert snapshot(out) == before and len(calls) == 1

    # --fresh: the stopped reproduction (here with an unreadable record) moves whole beside the new one,
    # with its card, named by when it started; nothing of it is deleted
    card = out / "reports" / "reproductions" / "smoke"
    card.mkdir(parents=True)
    (card / f"{PRESET}.md").write_text(f"the earlier card: seed 0 in {run_dir / 'seed_0'}")
    kept = snapshot(run_dir)
    status, _, _ = invoke([*argv, "--fresh"])
    assert status == 130 and [_option(c, "seed") for c in calls] == ["0", "0"]
    (aside,) = [d for d in run_dir.parent.iterdir() if d.name.startswith(f"{PRESET}.")]
    assert {k: v for k, v in snapshot(aside).items() if not k.startswith("card/")} == kept
    # the card moves with it, naming the seeds where they now are (run_dir's seed_0 is the new one's); the
    # new reproduction, stopped before its card, leaves none in reports/ that would describe its seeds
    assert (aside / "card" / f"{PRESET}.md").read_text() == f"the earlier card: seed 0 in {aside / 'seed_0'}"
    assert not (card / f"{PRESET}.md").exists()
    assert json.loads((run_dir / resumption.RECORD).read_text())["invocations"][0]["resumed"] is False


def test_set_aside_keeps_a_finished_reproduction_and_refuses_a_stopped_one(tmp_path):
    run_dir = tmp_path / "runs" / PRESET
    asked = resumption.Asked(PRESET, ("a=1",), ("a=1",), 2, False)
    assert resumption.set_aside(run_dir, [], fresh=False, out=None) is None  # nothing there
    ledger = resumption.Ledger.fresh(run_dir, asked)
    ledger.begin(None, fresh=True)
    (run_dir / "seed_0").mkdir()
    resumption.write_marker(run_dir / "seed_0", 0, resumption.SeedWall(12.0, 1), None)
    ledger.end("FAILED", 15.0)
    before = snapshot(run_dir)
    with pytest.raises(
        resumption.UserError, match=r"\(1 of 2 seeds finished\): go on with `vaerepro reproduce"
    ):
        resumption.set_aside(run_dir, [], fresh=False, out=None)
    assert snapshot(run_dir) == before
    ledger.data["invocations"][-1]["status"] = "FINISHED"  # a finished one is moved without --fresh
    resumption.write_json(ledger.path, ledger.data)
    before = snapshot(run_dir)
    stamp = ledger.data["started"].replace(":", "").replace("+0000", "Z")
    assert resumption.set_aside(run_dir, [tmp_path / "absent.md"], fresh=False, out=None) == (
        tmp_path / "runs" / f"{PRESET}.{stamp}"
    )
    assert not run_dir.exists() and snapshot(tmp_path / "runs" / f"{PRESET}.{stamp}") == before


def test_set_aside_never_leaves_the_earlier_card_cut_short(tmp_path, monkeypatch):
    """The earlier reproduction's card, moved beside it, is rewritten to name its seeds where they now are.
    It was rewritten in place: a full disk (or a kill) during that write left the only copy of the earlier
    card cut short. Now the rewrite goes beside it and is renamed over it: the card is whole, old or new."""
    run_dir = tmp_path / "runs" / PRESET
    asked = resumption.Asked(PRESET, ("a=1",), ("a=1",), 1, False)
    ledger = resumption.Ledger.fresh(run_dir, asked)
    ledger.begin(None, fresh=True)
    (run_dir / "seed_0").mkdir()
    ledger.end("FINISHED", 15.0)
    card = tmp_path / "reports" / f"{PRESET}.md"
    card.parent.mkdir()
    earlier = f"the earlier card: seed 0 in {run_dir / 'seed_0'}\n" + "a verdict and its numbers\n" * 500
    card.write_text(earlier)
    real_open = Path.open

    class HalfWritten:  # a file of the card opened for writing: half of what is written lands, then ENOSPC
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            self.fh.flush()
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def full_disk(self, mode="r", *args, **kwargs):  # the card's file itself, or a sibling written for it
        fh = real_open(self, mode, *args, **kwargs)
        return HalfWritten(fh) if "w" in mode and f"{PRESET}.md" in self.name else fh

    monkeypatch.setattr(Path, "open", full_disk)
    with pytest.raises(OSError, match="No space left"):
        resumption.set_aside(run_dir, [card], fresh=False, out=None)
    monkeypatch.undo()
    (aside,) = [d for d in run_dir.parent.iterdir() if d.name.startswith(f"{PRESET}.")]
    assert (aside / "card" / f"{PRESET}.md").read_text() == earlier  # whole, naming the seeds' old place
    assert sorted(p.name for p in (aside / "card").iterdir()) == [f"{PRESET}.md"]


@pytest.mark.slow
def test_ctrl_c_at_a_terminal_stops_the_seed_at_its_epoch_end_with_last_ckpt(raw_dir, tmp_path):
    """Ctrl-C at a terminal signals the whole foreground process group: `vaerepro reproduce` and its seed's
    `vaerepro run`. The seed's process ignores it; reproduce asks it to stop (SIGTERM) and it stops at the end
    of its epoch with models/last.ckpt written, so the resume continues there. (With SIGINT reaching the
    seed it stopped mid-epoch with no last.ckpt: checkpoint_every_s had not come round.)"""
    out = tmp_path / "out"
    seed_dir = out / "runs" / "reproductions" / "smoke" / PRESET / "seed_0"
    cmd = [str(BIN / "vaerepro"), "reproduce", PRESET, f"data.raw_dir={raw_dir}", "tracking.enabled=false"]
    cmd += ["train.max_epochs=10000", "train.checkpoint_every_s=100000", "--smoke", "--out", str(out)]
    code, err = ctrl_c_at_a_terminal(cmd, seed_dir / "models" / "best.ckpt", cwd=ROOT)  # after epoch 1
    assert code == 130, err
    assert "SIGTERM received: training stops at the end of this epoch" in err, err
    assert err.splitlines()[-1].startswith("vaerepro reproduce: stopped (Ctrl-C); resume with: "), err
    ckpt = torch.load(seed_dir / "models" / "last.ckpt", map_location="cpu", weights_only=True)
    rows = curve(seed_dir)  # written with last.ckpt: the epochs that checkpoint holds
    assert ckpt["epoch"] == len(rows) >= 1 and [r["epoch"] for r in rows] == list(range(len(rows)))
    assert ckpt["global_step"] % len(rows) == 0  # whole epochs only


@pytest.mark.slow
def test_a_kill_9_of_reproduce_stops_its_seed_at_its_epoch_end(raw_dir, tmp_path):
    """`kill -9` of `vaerepro reproduce` alone (the out-of-memory killer, a scheduler's hard kill of one
    pid) passes nothing on: its seed's `vaerepro run` trained on unseen, holding the reproduction's lock,
    so that a --resume was refused until the seed had trained to the end. The seed now watches the
    process that started it and stops as a SIGTERM stops it: at its epoch end with models/last.ckpt, and
    the lock is free for --resume."""
    import signal
    import time

    from vaerepro.files import try_lock

    out = tmp_path / "out"
    run_dir = out / "runs" / "reproductions" / "smoke" / PRESET
    seed_dir = run_dir / "seed_0"
    cmd = [str(BIN / "vaerepro"), "reproduce", PRESET, f"data.raw_dir={raw_dir}", "tracking.enabled=false"]
    cmd += ["train.max_epochs=10000", "train.checkpoint_every_s=100000", "--smoke", "--out", str(out)]
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (seed_dir / "models" / "best.ckpt").is_file():  # the seed has trained an epoch
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()
            time.sleep(0.1)
        proc.kill()  # SIGKILL to the reproduction alone
        proc.wait()
        deadline, lock = time.monotonic() + 60, None
        while (lock := try_lock(run_dir.with_name(f".{run_dir.name}.lock"))) is None:
            assert time.monotonic() < deadline, "the seed trains on after its reproduction was killed"
            time.sleep(0.2)
        os.close(lock)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the seed too, if it is still there
    text = (tmp_path / "err").read_text()
    assert "SIGTERM received: training stops at the end of this epoch" in text, text
    assert "Traceback" not in text, text
    ckpt = torch.load(seed_dir / "models" / "last.ckpt", map_location="cpu", weights_only=True)
    rows = curve(seed_dir)  # written with last.ckpt: the epochs that checkpoint holds
    assert ckpt["epoch"] == len(rows) >= 1 and ckpt["global_step"] % len(rows) == 0  # whole epochs only


# --- stopped after seed 0 of 2, then resumed (slow) --------------------------------------------------
@pytest.fixture(scope="module")
def resumed(store, raw_dir, tmp_path_factory):
    """A 2-seed smoke reproduction stopped by Ctrl-C while seed 1 trains (once its models/last.ckpt is
    written), then `vaerepro reproduce` with the command its message ends with."""
    from mlflow import MlflowClient

    out = tmp_path_factory.mktemp("resume") / "out"
    run_dir = out / "runs" / "reproductions" / "smoke" / PRESET
    argv = [PRESET, f"data.raw_dir={raw_dir}", "--smoke", "--seeds", "2", "--out", str(out)]
    r = SimpleNamespace(out=out, run_dir=run_dir, argv=argv)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store)
        checkpoint = run_dir / "seed_1" / "models" / "last.ckpt"
        r.first_calls = seed_processes(mp, stop=lambda seed, seed_dir: seed == 1 and checkpoint.is_file())
        r.first_status, _, r.first_err = invoke(argv)
        r.first_record = json.loads((run_dir / resumption.RECORD).read_text())
        r.parent = r.first_record["mlflow"]["parent_run_id"]
        r.first_parent = MlflowClient(store).get_run(r.parent)
        r.seed0_files = snapshot(run_dir / "seed_0")
        r.seed0_eval = json.loads((run_dir / "seed_0" / "metrics" / "eval.json").read_text())
        r.seed1_run = json.loads((run_dir / "seed_1" / "models" / "mlflow_run.json").read_text())["run_id"]
        r.markers = sorted(p.parent.name for p in run_dir.glob(f"seed_*/{resumption.MARKER}"))

        r.command = r.first_err.splitlines()[-1].split("; resume with: ", 1)[1]
        r.second_calls = seed_processes(mp)
        r.second_status, r.stdout, r.second_err = invoke(shlex.split(r.command)[2:])
    return r


@pytest.mark.slow
def test_a_stopped_reproduction_names_the_command_that_resumes_it(resumed, raw_dir):
    r = resumed
    assert r.first_status == 130, r.first_err
    resume = shlex.join(["vaerepro", "reproduce", PRESET, f"data.raw_dir={raw_dir}", "--seeds", "2"])
    resume += f" --smoke --out {r.out} --resume"
    assert r.first_err.splitlines()[-1] == f"vaerepro reproduce: stopped (Ctrl-C); resume with: {resume}"
    assert [_option(c, "seed") for c in r.first_calls] == ["0", "1"]
    assert (
        r.first_parent.info.status == "KILLED"
        and "KeyboardInterrupt" in r.first_parent.data.tags["vaerepro.failure"]
    )
    assert r.markers == ["seed_0"]  # seed 0 finished; seed 1 was stopped
    (inv,) = r.first_record["invocations"]
    assert inv["status"] == "KILLED" and [e["how"] for e in inv["seeds"].values()] == ["start", "start"]


@pytest.mark.slow
def test_resume_runs_only_the_unfinished_seed_under_the_same_parent(resumed, store):
    from mlflow import MlflowClient

    r = resumed
    assert r.second_status == 0, r.second_err
    assert [_option(c, "seed") for c in r.second_calls] == ["1"]  # seed 0's process did not run again
    assert snapshot(r.run_dir / "seed_0") == r.seed0_files  # nor was any of its files touched

    record = json.loads((r.run_dir / resumption.RECORD).read_text())
    assert record["mlflow"]["parent_run_id"] == r.parent and len(record["invocations"]) == 2
    first, second = record["invocations"]
    assert (second["status"], second["resumed"]) == ("FINISHED", True)
    assert {s: e["how"] for s, e in second["seeds"].items()} == {"0": "reuse", "1": "continue"}

    client = MlflowClient(store)
    parent = client.get_run(r.parent)
    assert parent.info.status == "FINISHED" and "vaerepro.failure" not in parent.data.tags
    assert parent.data.tags["vaerepro.resumed"] == "1"
    exp = parent.info.experiment_id
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{r.parent}'")
    assert sorted(c.data.tags["vaerepro.seed"] for c in children) == ["0", "1"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert r.seed1_run in {c.info.run_id for c in children}  # seed 1's run went on, not a new one

    # the numbers are the whole reproduction's: seed 0's from the first invocation, seed 1's from this one
    seed1_eval = json.loads((r.run_dir / "seed_1" / "metrics" / "eval.json").read_text())
    (name,) = [k for k in parent.data.metrics if k.endswith("reproduction/test_elbo_mean")]
    mean = statistics.fmean([r.seed0_eval["elbo"], seed1_eval["elbo"]])
    assert parent.data.metrics[name] == pytest.approx(mean, rel=1e-12)
    md = (r.out / "reports" / "reproductions" / "smoke" / f"{PRESET}.md").read_text()
    assert "(95 % t, 2 seeds)" in md and "(95 % t, 2 seeds)" in r.stdout
    rows = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith(("| 0 |", "| 1 |"))}
    assert (
        f"| {r.seed0_eval['elbo']:.2f} ± " in rows["| 0"] and f"| {seed1_eval['elbo']:.2f} ± " in rows["| 1"]
    )
    said = (
        "resumed (--resume) 1 time; seed 0 finished earlier: read from disk, not run again; seed 1 continued "
        "from models/last.ckpt"
    )
    assert f"This reproduction was {said}" in md and f"  {said}" in r.stdout

    # wall times: seed 0's from its marker; seed 1's, its two processes' recorded times added up
    marker0 = json.loads((r.run_dir / "seed_0" / resumption.MARKER).read_text())
    marker1 = json.loads((r.run_dir / "seed_1" / resumption.MARKER).read_text())
    walls = [inv["seeds"]["1"]["wall_s"] for inv in (first, second)]
    assert marker0["wall_s"] == first["seeds"]["0"]["wall_s"] and marker0["invocations"] == 1
    assert marker1["wall_s"] == pytest.approx(sum(walls), abs=0.05) and marker1["invocations"] == 2
    assert marker1["mlflow_run_id"] == r.seed1_run
    assert f"| {marker1['wall_s']:.1f} (2 invocations) |" in rows["| 1"]
    assert f"| {marker0['wall_s']:.1f} |" in rows["| 0"]
    # in all: both invocations', the second's up to its card (its record's runs on to the end)
    total = float(md.split(" s in all, over 2 invocations (each seed's")[0].rsplit(None, 1)[1])
    assert first["wall_s"] + walls[1] - 0.05 <= total <= first["wall_s"] + second["wall_s"] + 0.05


@pytest.mark.slow
def test_a_seed_with_a_checkpoint_and_no_marker_continues_it(resumed):
    (cmd,) = resumed.second_calls
    assert cmd[cmd.index("seed=1") + 1] == "train.resume=true"
    assert "resuming from" in (resumed.run_dir / "seed_1" / "cli.log").read_text()


# --- a fresh run over a stopped one -------------------------------------------------------------------
@pytest.mark.slow
def test_a_fresh_run_leaves_nothing_of_the_earlier_one_to_resume(
    resumed, store, tmp_path, monkeypatch, caplog
):
    """Over a copy of the finished reproduction (both seeds with markers and checkpoints): a fresh run,
    stopped as its first seed starts, moves the finished one beside it and records a new reproduction;
    --resume then runs seed 0 from the start and finds no seed of the earlier reproduction."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    out = tmp_path / "out"
    shutil.copytree(resumed.out, out)
    run_dir = out / "runs" / "reproductions" / "smoke" / PRESET
    argv = [a if a != str(resumed.out) else str(out) for a in resumed.argv]
    calls = seed_processes(monkeypatch, stop=lambda seed, seed_dir: True)

    status, _, _ = invoke(argv)
    assert status == 130 and list(run_dir.glob(f"seed_*/{resumption.MARKER}")) == []
    record = json.loads((run_dir / resumption.RECORD).read_text())
    assert len(record["invocations"]) == 1 and record["mlflow"]["parent_run_id"] != resumed.parent
    # the finished reproduction is kept whole beside the new one: its markers, its checkpoints
    (aside,) = [d for d in run_dir.parent.iterdir() if d.name.startswith(f"{PRESET}.")]
    assert len(list(aside.glob(f"seed_*/{resumption.MARKER}"))) == 2
    assert (aside / "seed_1" / "models" / "last.ckpt").is_file()
    assert not (run_dir / "seed_1").exists()
    asked = resumption.Asked(PRESET, tuple(record["overrides"]), tuple(record["user_overrides"]), 2, True)
    ledger = resumption.Ledger.stopped(run_dir, asked)
    assert [ledger.how(s) for s in (0, 1)] == ["start", "start"]

    # the recorded parent run deleted from the store: the resumed reproduction goes on in a new one
    client = MlflowClient(store)
    client.delete_run(record["mlflow"]["parent_run_id"])
    with caplog.at_level(logging.WARNING, logger="vaerepro"):
        status, _, _ = invoke([*argv, "--resume"])
    assert status == 130 and [_option(c, "seed") for c in calls] == ["0", "0"]
    assert "train.resume=true" not in calls[1]
    again = json.loads((run_dir / resumption.RECORD).read_text())
    new = again["mlflow"]["parent_run_id"]
    assert new != record["mlflow"]["parent_run_id"] and client.get_run(new).info.status == "KILLED"
    assert f"is not in {store}: it goes on in a new run, {new}" in caplog.text


# --- the wall times a record adds up (constructed records) -------------------------------------------
def _ledger(tmp_path, *invocations) -> resumption.Ledger:
    ledger = resumption.Ledger.fresh(tmp_path, resumption.Asked(PRESET, (), (), 2, True))
    for i, (wall, seeds) in enumerate(invocations):
        ledger.begin(None, fresh=i == 0)
        ledger.data["invocations"][-1] |= {"wall_s": wall}
        for seed, (how, seconds) in seeds.items():
            ledger.seed_started(seed, how)
            ledger.data["invocations"][-1]["seeds"][str(seed)]["wall_s"] = seconds
    return ledger


def test_wall_times_add_the_invocations_a_result_continues(tmp_path):
    # seed 1: started (30 s), continued (20 s), continued now (5 s): 55 s over 3 invocations
    ledger = _ledger(
        tmp_path,
        (40.0, {0: ("start", 10.0), 1: ("start", 30.0)}),
        (25.0, {1: ("continue", 20.0)}),
        (None, {}),
    )
    assert ledger.seed_wall(1, 5.0, "continue") == resumption.SeedWall(55.0, 3, "3 invocations")
    assert ledger.seed_wall(1, 5.0, "start") == resumption.SeedWall(5.0, 1)  # started again: its own only
    assert ledger.total_wall(7.0) == (72.0, "over 3 invocations")
    assert ledger.resumed == 2
    # started again in the second invocation: the first one's 30 s trained what was thrown away
    ledger = _ledger(tmp_path, (40.0, {1: ("start", 30.0)}), (25.0, {1: ("start", 20.0)}), (None, {}))
    assert ledger.seed_wall(1, 5.0, "continue") == resumption.SeedWall(25.0, 2, "2 invocations")
    # an invocation whose end was never seen (killed -9): this invocation's alone, and said so
    ledger = _ledger(tmp_path, (None, {1: ("start", None)}), (None, {}))
    unrecorded = "this invocation only: an earlier one's time was not recorded"
    assert ledger.seed_wall(1, 5.0, "continue") == resumption.SeedWall(5.0, 1, unrecorded)
    assert ledger.total_wall(7.0) == (7.0, unrecorded)


def test_the_resume_command_quotes_for_the_shell(tmp_path):
    command = resumption.resume_command("iwae-x", ["model.hidden_dims=[64,64]"], 3, False, tmp_path / "a b")
    assert (
        command
        == f"vaerepro reproduce iwae-x 'model.hidden_dims=[64,64]' --seeds 3 --out '{tmp_path}/a b' --resume"
    )
    assert shlex.split(command)[3:] == [
        "model.hidden_dims=[64,64]",
        "--seeds",
        "3",
        "--out",
        f"{tmp_path}/a b",
        "--resume",
    ]
