"""Bad inputs and faults, as a user meets them: real `vaerepro` processes, real signals, a real sqlite store.

Every bad input exits with status 2 and one line on stderr naming the key or file and the problem, with no
traceback, and leaves what was saved (prepared/, models/, metrics/, plots/, artifacts/, params.yaml and the
MLflow store's runs, tags and metrics) as it was. docs/errors.md lists these cases for users. Each bad input
is a process of its own, forked from one that has imported what `vaerepro run` imports (forked_cli.py); the
signal tests start the console script.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import BIN, ROOT, TINY, run, shrink_conf
from vaerepro.devices import device_text
from vaerepro.versions import git_commit, versions, versions_text

pytestmark = pytest.mark.slow

WATCHED = ("prepared", "models", "metrics", "plots", "artifacts", "params.yaml")


def _env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("VAEREPRO_DEBUG", None)
    return env


def vaerepro(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["vaerepro", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def forked_ok(forked, args: list[str], d: Path) -> None:
    proc = forked.run(args, d, _env())
    assert proc.returncode == 0, (
        f"vaerepro {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    )


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def snapshot(d: Path) -> dict:
    """The saved results: every watched file's sha256, and the store's runs, tags and metrics (after
    sqlite's integrity check)."""
    files = {}
    for name in WATCHED:
        p = d / name
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                files[f.relative_to(d).as_posix()] = _sha(f)
    try:
        with sqlite3.connect(d / "mlflow.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            store = {
                table: db.execute(f"SELECT {cols} FROM {table} ORDER BY {cols}").fetchall()
                for table, cols in (
                    ("runs", "run_uuid, status, end_time"),
                    ("tags", "run_uuid, key, value"),
                    ("metrics", "run_uuid, key, step, value"),
                    ("params", "run_uuid, key, value"),
                )
            }
    except sqlite3.DatabaseError:  # a store a case damaged on purpose: it must stay byte for byte
        store = {"sha256": _sha(d / "mlflow.db")}
    return {"files": files, "store": store}


def runs(d: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(d / "mlflow.db") as db:
        return db.execute("SELECT run_uuid, status FROM runs ORDER BY start_time").fetchall()


def tag(d: Path, run_id: str, key: str) -> str | None:
    with sqlite3.connect(d / "mlflow.db") as db:
        row = db.execute("SELECT value FROM tags WHERE run_uuid=? AND key=?", (run_id, key)).fetchone()
    return row[0] if row else None


def metric_steps(d: Path, run_id: str, key: str) -> list[int]:
    with sqlite3.connect(d / "mlflow.db") as db:
        rows = db.execute("SELECT step FROM metrics WHERE run_uuid=? AND key=?", (run_id, key)).fetchall()
    return sorted(s for (s,) in rows)


@pytest.fixture(scope="module")
def project(tmp_path_factory, raw_dir, forked) -> Path:
    """A project that ran the whole tiny pipeline (3 epochs) with MLflow tracking in its own mlflow.db."""
    d = tmp_path_factory.mktemp("project")
    shutil.copytree(ROOT / "conf", d / "conf")
    shutil.copy(ROOT / "dvc.yaml", d / "dvc.yaml")
    shrink_conf(d / "conf")
    forked_ok(forked, ["params", f"data.raw_dir={raw_dir}"], d)
    for stage in ("prepare", "train", "evaluate", "report"):
        forked_ok(forked, [stage, *(["--no-progress"] if stage in ("train", "evaluate") else [])], d)
    assert [s for _, s in runs(d)] == ["FINISHED"]
    return d


def copy_project(src: Path, dst: Path) -> Path:
    """A copy whose models/mlflow_run.json points at the copy's own store."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("conf"))
    (dst / "conf").symlink_to(src / "conf")
    run_file = dst / "models" / "mlflow_run.json"
    d = json.loads(run_file.read_text())
    d["tracking_uri"] = f"sqlite:///{dst / 'mlflow.db'}"
    run_file.write_text(json.dumps(d))
    return dst


def params(d: Path) -> dict:
    return yaml.safe_load((d / "params.yaml").read_text())


def write_params(d: Path, edit) -> str:
    """bad.yaml: params.yaml changed by `edit` (a function of the dict, or the file's text)."""
    if isinstance(edit, str):
        (d / "bad.yaml").write_text(edit)
    else:
        p = params(d)
        edit(p)
        (d / "bad.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return "bad.yaml"


def _set(path: str, value):
    def edit(p: dict) -> None:
        *parents, leaf = path.split(".")
        for k in parents:
            p = p[k]
        p[leaf] = value

    return edit


def _drop(*sections: str):
    def edit(p: dict) -> None:
        for s in sections:
            del p[s]

    return edit


def _both(*edits):
    def edit(p: dict) -> None:
        for e in edits:
            e(p)

    return edit


def _text_file(d: Path) -> Path:
    f = d / "digits.npz"
    f.write_text("label,pixel0,pixel1\n3,0,255\n")
    return f


def _real_npz(d: Path) -> Path:
    f = d / "digits.npz"
    np.savez_compressed(f, x=np.zeros((50, 28, 28), dtype=np.uint8))
    return f


def _prepared_with_split_seed_1(d):
    """prepared/ replaced by splits of data.split_seed=1 (the run's config has 0)."""
    raw = params(d)["data"]["raw_dir"]
    run(["vaerepro", "params", "--output", "other.yaml", f"data.raw_dir={raw}", "data.split_seed=1"], d)
    run(["vaerepro", "prepare", "--params", "other.yaml", "--out", "other"], d)
    shutil.rmtree(d / "prepared")
    shutil.copytree(d / "other" / "prepared", d / "prepared")


def _drop_meta_key(path, key):
    meta = json.loads(path.read_text())
    del meta[key]
    path.write_text(json.dumps(meta))


def _corrupt(rel: str, data: bytes | None = None, keep: int | None = None):
    def setup(d: Path) -> None:
        f = d / rel
        if keep is not None:
            f.write_bytes(f.read_bytes()[:keep])
        else:
            f.write_bytes(data)

    return setup


# (id, command, params edit or None, extra setup of the copy or None, what the one line must contain)
CASES = [
    ("latent_dim_zero", ["train"], _set("model.latent_dim", 0), None, "model.latent_dim"),
    ("latent_dim_absurd", ["train"], _set("model.latent_dim", 10**9), None, "model.latent_dim"),
    ("hidden_absurd", ["train"], _set("model.hidden_dims", [10**9]), None, "model.hidden_dims"),
    ("seed_negative", ["train"], _set("seed", -1), None, "seed"),
    ("eval_seed_2_64", ["evaluate"], _set("eval.seed", 2**64), None, "eval.seed"),
    ("split_seed_huge", ["prepare"], _set("data.split_seed", 2**40), None, "data.split_seed"),
    ("devices_zero", ["train"], _set("trainer.devices", 0), None, "trainer.devices"),
    ("unknown_likelihood", ["evaluate"], _set("likelihood.name", "poisson"), None, "likelihood"),
    ("negative_lr", ["train"], _set("train.lr", -1.0), None, "train.lr"),
    ("unknown_key", ["train"], _set("model.foo", 1), None, "model.foo"),
    ("batch_size_text", ["train"], _set("train.batch_size", "abc"), None, "train.batch_size"),
    ("zero_samples", ["evaluate"], _set("eval.num_samples", 0), None, "eval.num_samples"),
    ("fractions", ["prepare"], _set("data.val_fraction", 0.9), None, "val_fraction"),
    (
        "space_mismatch",
        ["train"],
        _both(_set("likelihood", {"name": "continuous_bernoulli"}), _set("data.space", "binary")),
        None,
        "data.space",
    ),
    ("improper_bernoulli", ["train"], _set("data.space", "continuous"), None, "allow_improper"),
    ("missing_section", ["evaluate"], _drop("model"), None, "no model section"),
    ("missing_sections", ["train"], _drop("model", "train"), None, "no model, train sections"),
    ("not_yaml", ["evaluate"], "seed: [0\n", None, "not valid YAML"),
    ("yaml_list", ["report"], "- 1\n- 2\n", None, "mapping"),
    ("eval_device_cuda", ["evaluate"], _set("eval.device", "cuda"), None, "eval.device"),
    ("npz_without_path", ["prepare"], _set("data.source", "npz"), None, "data.path"),
    (
        "npz_missing",
        ["prepare"],
        _both(_set("data.source", "npz"), _set("data.path", "/nonexistent/digits.npz")),
        None,
        "/nonexistent/digits.npz",
    ),
    (
        "npz_is_text",
        ["prepare"],
        _both(_set("data.source", "npz"), _set("data.path", "DIR/digits.npz")),
        _text_file,
        "not an .npz archive",
    ),
    (
        "npz_over_limit",
        ["prepare"],
        _both(
            _set("data.source", "npz"), _set("data.path", "DIR/digits.npz"), _set("data.max_npz_bytes", 1000)
        ),
        _real_npz,
        "data.max_npz_bytes=1000",
    ),
    ("params_missing", ["train", "--params", "nope.yaml"], None, None, "nope.yaml"),
    # the checkpoint is the truth for the model it holds
    (
        "eval_other_latent",
        ["evaluate"],
        _set("model.latent_dim", 5),
        None,
        "model.latent_dim: checkpoint 4, config 5",
    ),
    (
        "eval_other_likelihood",
        ["evaluate"],
        _set("likelihood", {"name": "continuous_bernoulli"}),
        None,
        "likelihood.name: checkpoint 'bernoulli', config 'continuous_bernoulli'",
    ),
    (
        "eval_other_splits",
        ["evaluate"],
        None,
        _prepared_with_split_seed_1,
        "its splits were made with data.split_seed=1, but the config has data.split_seed=0",
    ),
    (
        # the same, in a meta.json that does not say how its splits were made (written before it did): the
        # checkpoint's record of its training data still refuses it
        "eval_other_data",
        ["evaluate"],
        None,
        lambda d: (
            _prepared_with_split_seed_1(d),
            _drop_meta_key(d / "prepared" / "meta.json", "seed"),
        ),
        "training data (sha256 of prepared/x_train.npy)",
    ),
    (
        "eval_corrupt_ckpt",
        ["evaluate"],
        None,
        _corrupt("models/best.ckpt", keep=1000),
        "best.ckpt: not a readable",
    ),
    ("eval_text_ckpt", ["evaluate"], None, _corrupt("models/best.ckpt", b"not a checkpoint\n"), "best.ckpt"),
    (
        "eval_no_ckpt",
        ["evaluate"],
        None,
        lambda d: (d / "models" / "best.ckpt").unlink(),
        "best.ckpt: file not found",
    ),
    (
        "resume_changed_lr",
        ["train"],
        _both(_set("train.resume", True), _set("train.lr", 0.01)),
        None,
        "train.lr: checkpoint 0.001, config 0.01",
    ),
    (
        "resume_fewer_epochs",
        ["train"],
        _both(_set("train.resume", True), _set("train.max_epochs", 1)),
        None,
        "more than train.max_epochs=1",
    ),
    (
        "resume_truncated",
        ["train"],
        _set("train.resume", True),
        _corrupt("models/last.ckpt", keep=2000),
        "last.ckpt: not a readable checkpoint",
    ),
    (
        "report_corrupt_eval_json",
        ["report"],
        None,
        _corrupt("metrics/eval.json", b'{"log_px": '),
        "eval.json: not valid JSON",
    ),
    (
        "report_corrupt_run_file",
        ["report"],
        None,
        _corrupt("artifacts/mlflow_run.json", b"[1, 2"),  # the run the evaluation logged to
        "artifacts/mlflow_run.json",
    ),
    (
        "report_truncated_samples",
        ["report"],
        None,
        _corrupt("artifacts/samples.npz", keep=1000),  # a damaged copy
        "artifacts/samples.npz: not a readable .npz archive",
    ),
    ("train_corrupt_store", ["train"], None, _corrupt("mlflow.db", keep=3000), "mlflow.db"),
    # Lightning refuses an unknown strategy only when the Trainer is built, with a traceback
    ("train_unknown_strategy", ["train"], _set("trainer.strategy", "foo"), None, "trainer.strategy: "),
    ("train_sharded_strategy", ["train"], _set("trainer.strategy", "fsdp"), None, "trainer.strategy: "),
    ("report_corrupt_store", ["report"], None, _corrupt("mlflow.db", keep=3000), "mlflow.db"),
    ("report_text_store", ["report"], None, _corrupt("mlflow.db", b"not a database\n"), "mlflow.db"),
    ("unreachable_server", ["train"], _set("tracking.uri", "http://127.0.0.1:9"), None, "tracking.uri"),
    # overrides on the command line
    ("run_bad_value", ["run", "model.latent_dim=0"], None, None, "model.latent_dim"),
    ("run_unknown_key", ["run", "foo=1"], None, None, "foo"),
    ("run_unknown_option", ["run", "likelihood=poisson"], None, None, "likelihood/poisson"),
    # a mistake found once Hydra has made the job's directory: the directory goes again
    ("run_data_missing", ["run", "data=npz", "data.path=/nonexistent/digits.npz"], None, None, "digits.npz"),
    (
        "params_bad_value",
        ["params", "--output", "p2.yaml", "model.latent_dim=-3"],
        None,
        None,
        "model.latent_dim",
    ),
]


@pytest.mark.parametrize(("name", "command", "edit", "setup", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    project, forked, tmp_path, name, command, edit, setup, expected
):
    d = copy_project(project, tmp_path / "p")
    if setup is not None:
        setup(d)
    args = list(command)
    if edit is not None:
        if not isinstance(edit, str):
            inner = edit

            def edit(p, inner=inner):  # noqa: F811 - DIR stands for the copy, for files a setup wrote
                inner(p)
                if isinstance(p.get("data", {}).get("path"), str):
                    p["data"]["path"] = p["data"]["path"].replace("DIR", str(d))

        args += ["--params", write_params(d, edit)]
    before = snapshot(d)
    proc = forked.run(args, d, _env())
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("vaerepro ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"vaerepro {command[0]}: ") and expected in lines[0], lines[0]
    assert "pickle" not in lines[0] and "weights_only" not in lines[0]
    assert snapshot(d) == before
    # no run directory (at most Hydra's empty runs/ parent) and no file
    assert not (d / "runs").exists() or not any((d / "runs").iterdir())
    assert not (d / "p2.yaml").exists()


def test_debug_shows_the_traceback(project, tmp_path):
    d = copy_project(project, tmp_path / "p")
    args = ["evaluate", "--params", write_params(d, _set("model.latent_dim", 5))]
    assert "Traceback" in vaerepro([*args, "--debug"], d).stderr
    # `vaerepro reproduce` reads its own command line: --debug reaches it too
    proc = vaerepro(["--debug", "reproduce", "no-such-preset"], d)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "no-such-preset" in proc.stderr


def _start(args: list[str], d: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.Popen(
        ["vaerepro", *args], cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_new_run(d: Path, known: int, proc: subprocess.Popen, timeout: float = 120) -> str:
    """The id of the run a started process created (once the store holds more than `known` runs)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        rows = runs(d)
        if len(rows) > known:
            return rows[-1][0]
        time.sleep(0.2)
    raise AssertionError("no MLflow run was created")


def _long_training(d: Path, *extra: str) -> str:
    return write_params(
        d,
        _both(
            _set("train.max_epochs", 2000),
            *(_set(k, yaml.safe_load(v)) for k, v in (e.split("=", 1) for e in extra)),
        ),
    )


def test_sigterm_stops_training_at_an_epoch_end_exit_143_killed_and_resumable(project, tmp_path):
    d = copy_project(project, tmp_path / "p")
    assert (d / "metrics" / "train.json").is_file()  # the earlier training's: not true of the stopped one
    bad = _long_training(d, "train.checkpoint_every_s=3600")
    proc = _start(["train", "--no-progress", "--params", bad], d)
    run_id = _wait_for_new_run(d, 1, proc)
    time.sleep(3)  # some epochs, none of them saved yet (checkpoint_every_s=3600)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    line = [ln for ln in err.splitlines() if ln.startswith("vaerepro train: ")]
    assert len(line) == 1 and "stopped by SIGTERM" in line[0] and "train.resume=true" in line[0], err[-2000:]
    assert dict(runs(d))[run_id] == "KILLED" and "SIGTERM" in tag(d, run_id, "vaerepro.failure")
    assert not (d / "metrics" / "train.json").exists()
    last = torch.load(d / "models" / "last.ckpt", map_location="cpu", weights_only=True)
    curve = (d / "plots" / "elbo.csv").read_text().splitlines()[1:]
    done = len(curve)
    assert done >= 1 and last["callbacks"]["EpochHistory"]["rows"][-1]["epoch"] == done - 1
    # the whole curve of the stopped training reached the store, step = epoch
    assert metric_steps(d, run_id, "binary/val/elbo") == list(range(done))

    resume = write_params(d, _both(_set("train.resume", True), _set("train.max_epochs", done + 2)))
    proc = vaerepro(["train", "--no-progress", "--params", resume], d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert dict(runs(d))[run_id] == "FINISHED" and tag(d, run_id, "vaerepro.failure") is None
    assert metric_steps(d, run_id, "binary/val/elbo") == list(range(done + 2))
    assert json.loads((d / "metrics" / "train.json").read_text())["epochs"] == done + 2


def test_after_kill_9_a_resumed_run_sends_the_epochs_the_store_never_got(project, tmp_path):
    d = copy_project(project, tmp_path / "p")
    # every epoch in last.ckpt, no metric sent before the end: a kill -9 loses the whole buffer
    bad = _long_training(d, "train.checkpoint_every_s=0", "tracking.flush_every_s=3600")
    proc = _start(["train", "--no-progress", "--params", bad], d)
    run_id = _wait_for_new_run(d, 1, proc)
    time.sleep(3)
    proc.kill()
    proc.communicate(timeout=60)
    assert dict(runs(d))[run_id] == "RUNNING" and metric_steps(d, run_id, "binary/val/elbo") == []
    done = len((d / "plots" / "elbo.csv").read_text().splitlines()) - 1
    assert done >= 1
    resume = write_params(d, _both(_set("train.resume", True), _set("train.max_epochs", done + 1)))
    proc = vaerepro(["train", "--no-progress", "--params", resume], d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("binary/val/elbo", "binary/train/elbo"):
        assert metric_steps(d, run_id, key) == list(range(done + 1)), key
    assert dict(runs(d))[run_id] == "FINISHED"


def test_after_kill_9_the_next_training_into_models_ends_the_dead_run_killed(project, tmp_path):
    """`dvc repro` after a training was killed outright (kill -9, the out-of-memory killer): DVC deletes
    models/ (and the mlflow_run.json that named the dead run) and trains again. The new training ends the
    run the dead one left RUNNING: KILLED, naming its process and the run that trained models/ again; the
    finished run before it is untouched."""
    d = copy_project(project, tmp_path / "p")
    ((finished, _),) = runs(d)
    proc = _start(["train", "--no-progress", "--params", _long_training(d)], d)
    dead = _wait_for_new_run(d, 1, proc)
    assert tag(d, dead, "vaerepro.process").endswith(f":{proc.pid}")
    assert tag(d, dead, "vaerepro.model_dir") == str((d / "models").resolve())
    killed = proc.pid
    proc.kill()
    proc.communicate(timeout=60)
    assert dict(runs(d))[dead] == "RUNNING"
    shutil.rmtree(d / "models")  # what DVC does before it runs the train stage again
    proc = vaerepro(["train", "--no-progress", "--params", write_params(d, _set("train.max_epochs", 1))], d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = json.loads((d / "models" / "mlflow_run.json").read_text())["run_id"]
    status = dict(runs(d))
    assert status == {finished: "FINISHED", dead: "KILLED", new: "FINISHED"}
    reason = tag(d, dead, "vaerepro.failure")
    assert f":{killed}) is gone and never ended the run" in reason, reason
    assert reason.endswith(f"{(d / 'models').resolve()} was trained again in run {new}"), reason
    assert f"MLflow run {dead} was RUNNING, its process" in proc.stderr


def test_sigterm_stops_vaerepro_run_with_143_killed_and_the_resume_command(project, tmp_path, raw_dir):
    d = copy_project(project, tmp_path / "p")
    proc = _start(["run", f"data.raw_dir={raw_dir}", "train.max_epochs=2000", "hydra.run.dir=runs/one"], d)
    run_id = _wait_for_new_run(d, 1, proc)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    line = [ln for ln in err.splitlines() if ln.startswith("vaerepro run: ")]
    assert len(line) == 1 and "train.resume=true" in line[0] and "hydra.run.dir=" in line[0], err[-2000:]
    assert dict(runs(d))[run_id] == "KILLED"
    assert (d / "runs" / "one" / "models" / "last.ckpt").is_file()


# Loaded by the `vaerepro run` below (sitecustomize, from PYTHONPATH): once MLflow has made the new store's
# tables, an object's finalizer gets the Ctrl-C, as SQLAlchemy's weakref callbacks did in a Ctrl-C sweep.
_DROP_CTRL_C_IN_A_FINALIZER = """
import os, signal
import mlflow.store.db.utils as db_utils

def _noop():
    pass

class _Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        _noop()  # the handler runs here: its KeyboardInterrupt is "Exception ignored in ..."

_upgrade_db = db_utils._upgrade_db

def _upgrade_then_drop(engine):
    _upgrade_db(engine)
    _Finalized()

db_utils._upgrade_db = _upgrade_then_drop
"""


def test_a_ctrl_c_python_drops_in_a_finalizer_still_stops_the_run(tmp_path, raw_dir):
    """Python runs a signal's handler in whatever code is running, and drops what it raises in a finalizer:
    a Ctrl-C while MLflow made a project's first store (SQLAlchemy runs weakref callbacks) was printed as
    "Exception ignored in ..." and lost, and `vaerepro run` trained, evaluated and exited 0. It now stops
    the training at the end of its first epoch, as a Ctrl-C in training does."""
    d = tmp_path / "p"
    shutil.copytree(ROOT / "conf", d / "conf")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_DROP_CTRL_C_IN_A_FINALIZER)
    proc = subprocess.run(
        ["vaerepro", "run", *TINY, f"data.raw_dir={raw_dir}", "hydra.run.dir=runs/one"],
        cwd=d,
        env={**_env(), "PYTHONPATH": str(tmp_path / "site")},
        # SIGINT at its default, as at a terminal: pytest-xdist's workers ignore it, and a child inherits that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 - a test's child
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("vaerepro run: stopped by SIGINT: training stopped after 1 of 3 epochs"), last
    assert [status for _, status in runs(d)] == ["KILLED"]
    assert (d / "runs" / "one" / "models" / "last.ckpt").is_file()
    assert not (d / "runs" / "one" / "metrics" / "eval.json").exists()


def test_an_unwritable_run_file_fails_the_run_it_created(project, tmp_path):
    """models/mlflow_run.json cannot be written (here: a directory is in its place) after the MLflow run
    was created: the run ends FAILED with the reason, not RUNNING for ever."""
    d = copy_project(project, tmp_path / "p")
    (d / "models" / "mlflow_run.json").unlink()
    (d / "models" / "mlflow_run.json").mkdir()
    proc = vaerepro(["train", "--no-progress"], d)
    assert proc.returncode == 2 and "mlflow_run.json" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
    run_id, status = runs(d)[-1]
    assert status == "FAILED" and "mlflow_run.json" in tag(d, run_id, "vaerepro.failure")


def test_a_diverging_training_is_one_line_exit_2_naming_what_to_change(project, tmp_path):
    """Settings under which training diverges (train.lr=1000 on one full batch an epoch: a NaN validation
    ELBO in epoch 0) are a mistake in the input found late: one line naming the epoch and the keys to
    change, exit status 2, no traceback; the run ends FAILED with that line, tagged with the device, versions
    and commit it ran on and from (the project is made a git checkout here), and the earlier training's
    best.ckpt stays as it was (no epoch of this one had a finite ELBO to replace it)."""
    d = copy_project(project, tmp_path / "p")
    best = _sha(d / "models" / "best.ckpt")
    bad = write_params(d, _both(_set("train.lr", 1000.0), _set("train.batch_size", 500)))
    for args in (
        ["init", "-q"],
        ["add", "dvc.yaml"],
        ["-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "x"],
    ):
        subprocess.run(["git", *args], cwd=d, check=True, capture_output=True)
    commit = git_commit(d)
    proc = vaerepro(["train", "--no-progress", "--params", bad], d)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("vaerepro ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("vaerepro train: non-finite validation ELBO (val/elbo = nan) in epoch 0")
    assert "lower train.lr" in lines[0]
    run_id, status = runs(d)[-1]
    assert status == "FAILED" and tag(d, run_id, "vaerepro.failure").startswith("Diverged: non-finite")
    # where and with what it failed, as a finished training's record would say
    assert tag(d, run_id, "vaerepro.train.device") == device_text(torch.device("cpu"), 1)
    assert tag(d, run_id, "vaerepro.train.versions") == versions_text(versions())
    assert commit is not None and "-dirty" not in commit and tag(d, run_id, "vaerepro.train.commit") == commit
    assert _sha(d / "models" / "best.ckpt") == best


def test_a_pipeline_that_fails_after_training_ends_its_run_failed_not_finished(
    raw_dir, tmp_path, monkeypatch
):
    from conftest import tiny_config
    from vaerepro import cli

    def broken_evaluate(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(cli, "stage_evaluate", broken_evaluate)
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    cfg = tiny_config("train.max_epochs=1", tracking=True, raw_dir=raw_dir)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        cli.run_pipeline(cfg, tmp_path / "out", tmp_path, progress=False)
    ((run_id, status),) = runs(tmp_path)
    assert (
        status == "FAILED" and tag(tmp_path, run_id, "vaerepro.failure") == "RuntimeError: evaluation broke"
    )
