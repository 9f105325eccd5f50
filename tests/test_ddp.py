"""Multi-process training and evaluation, proven with Lightning's DDP on CPU processes (gloo).

Every DDP run is a real command line in a subprocess (`vaerepro ...`, `python -m vaerepro.cli ...`,
`torchrun`), so Lightning's re-launch of the other rank is exercised as users meet it.

What "the same" means here: a 2-process run with per-device batch B and a 1-process run with batch 2B see
the same global batches with the same randomness per example (train.py draws it for the whole global
batch), so they differ only by float rounding in the gradient all-reduce. Measured after 3 epochs (18
Adam steps): weights differ by <= 2e-7, the validation ELBO by 3e-5 nats (one float32 ulp at 417 nats),
the training ELBO not at all. The tolerances below (1e-5, 1e-3 nats) leave a margin of 30-50x; a real
difference in data order, randomness or gradient scaling moves these numbers by 0.1-10 nats.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, copy_prepared, curve, run
from vaerepro import cli
from vaerepro.document import differences

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
PER_DEVICE = 35  # 420 training digits: 6 global batches of 70 per epoch
WEIGHT_TOL = 1e-5
ELBO_TOL_NATS = 1e-3


def _project(d: Path, raw_dir: Path, *overrides: str, prepared: Path | None = None) -> Path:
    """A project directory (conf/ and a dvc.yaml marker) with params.yaml from `vaerepro params`."""
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "conf").exists():
        shutil.copytree(ROOT / "conf", d / "conf")
        (d / "dvc.yaml").write_text("stages: {}\n")
    if prepared is not None and not (d / "prepared").exists():
        copy_prepared(prepared, d)
    run(["vaerepro", "params", *TINY, f"data.raw_dir={raw_dir}", *overrides], d)
    return d


def _ckpt(d: Path, name: str = "last.ckpt") -> dict:
    return torch.load(d / "models" / name, map_location="cpu", weights_only=True)


def _runs(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("vaerepro")
    return [] if exp is None else client.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def ddp_trained(tmp_path_factory, raw_dir, prepared_tiny) -> Path:
    """3 epochs on 2 CPU processes through the console script (Lightning re-launches it for rank 1).
    With trainer.steps_per_call=4 (one_trained has 1): each of a call's optimiser steps all-reduces its own
    gradients (Lightning arms DDP's reducer at every manual backward), else the ranks' weights would part."""
    d = _project(
        tmp_path_factory.mktemp("ddp"),
        raw_dir,
        *DDP,
        f"train.batch_size={PER_DEVICE}",
        "trainer.steps_per_call=4",
        "tracking.enabled=false",
        prepared=prepared_tiny,
    )
    run(["vaerepro", "train", "--no-progress"], d)
    return d


@pytest.fixture(scope="module")
def one_trained(tmp_path_factory, raw_dir, prepared_tiny) -> Path:
    """The same 3 epochs in one process with the DDP runs' global batch, 2 x PER_DEVICE."""
    one = _project(
        tmp_path_factory.mktemp("one"),
        raw_dir,
        f"train.batch_size={2 * PER_DEVICE}",
        "tracking.enabled=false",
        prepared=prepared_tiny,
    )
    run(["vaerepro", "train", "--no-progress"], one)
    return one


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(ddp_trained, one_trained):
    one = one_trained
    a, b = _ckpt(one), _ckpt(ddp_trained)
    assert a["global_step"] == b["global_step"] == 3 * 6  # the same number of optimiser steps
    assert a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    diff = max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"])
    assert diff < WEIGHT_TOL, diff
    ca, cb = curve(one), curve(ddp_trained)
    assert [r["epoch"] for r in ca] == [r["epoch"] for r in cb] == [0, 1, 2]
    for ra, rb in zip(ca, cb, strict=True):
        for k in ("train_elbo", "val_elbo"):
            assert abs(ra[k] - rb[k]) < ELBO_TOL_NATS, (k, ra, rb)
    assert ca[0]["val_elbo"] < ca[-1]["val_elbo"]  # and both actually trained

    # only rank 0 wrote: one checkpoint of each kind, no per-rank files
    assert sorted(p.name for p in (ddp_trained / "models").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
        "mlflow_run.json",
    ]
    record = json.loads((ddp_trained / "metrics" / "train.json").read_text())
    assert record["epochs"] == 3 and record["device"].endswith(" cores), 2 processes")  # 2 CPU processes


@pytest.mark.slow
def test_compiled_objective_under_ddp_trains_like_one_eager_process(
    one_trained, raw_dir, prepared_tiny, tmp_path
):
    """trainer.compile under DDP: each rank compiles its own objective (inductor's CPU kernels here) and the
    gradients' all-reduce still runs after its backward. reduce-overhead compiles without CUDA graphs under
    DDP (train.compile_mode), which rank 0 says once."""
    d = _project(
        tmp_path / "ddp-compiled",
        raw_dir,
        *DDP,
        f"train.batch_size={PER_DEVICE}",
        "trainer.compile=reduce-overhead",
        "tracking.enabled=false",
        prepared=prepared_tiny,
    )
    proc = run(["vaerepro", "train", "--no-progress"], d)
    said = (
        "trainer.compile=reduce-overhead under DDP (2 processes): each rank compiles the objective with mode "
        "default, without CUDA graphs"
    )
    assert (proc.stdout + proc.stderr).count(said) == 1
    a, b = _ckpt(one_trained), _ckpt(d)
    assert a["global_step"] == b["global_step"] == 3 * 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    # the tolerances of test_compile.py (compiled against eager), which the DDP rounding (2e-7) does not move
    diff = max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"])
    assert diff < 1e-2, diff
    for ra, rb in zip(curve(one_trained), curve(d), strict=True):
        for k in ("train_elbo", "val_elbo"):
            assert abs(ra[k] - rb[k]) < 1e-2, (k, ra, rb)


@pytest.mark.slow
def test_ddp_training_is_one_mlflow_run_and_resumes_into_it(ddp_trained, raw_dir, prepared_tiny, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri}
    d = _project(
        tmp_path / "p",
        raw_dir,
        *DDP,
        f"train.batch_size={PER_DEVICE}",
        "train.max_epochs=2",
        prepared=prepared_tiny,
    )
    # `python -m vaerepro.cli`: Lightning re-launches rank 1 as `python -m vaerepro.cli train ...`
    run([sys.executable, "-m", "vaerepro.cli", "train", "--no-progress"], d, env=env)

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    (first,) = _runs(uri)  # exactly one run for two training processes
    run_id = first.info.run_id
    for key in ("binary/val/elbo", "binary/train/elbo"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == 2 and len(set(steps)) == 2, (key, steps)  # once per epoch, not once per rank
    assert json.loads((d / "models" / "mlflow_run.json").read_text())["run_id"] == run_id

    # resume: one more epoch from models/last.ckpt, on 2 processes again, into the same MLflow run
    _project(d, raw_dir, *DDP, f"train.batch_size={PER_DEVICE}", "train.max_epochs=3", "train.resume=true")
    out = run(["vaerepro", "train", "--no-progress"], d, env=env)
    assert "resuming from" in out.stderr + out.stdout
    (again,) = _runs(uri)
    assert again.info.run_id == run_id
    for key in ("binary/val/elbo", "binary/train/elbo"):
        hist = client.get_metric_history(run_id, key)
        assert len(hist) == 3, key
        assert sorted(m.step for m in hist) == [0, 1, 2]  # step = epoch, continued across the resume
    assert again.data.tags.get("changed.train.max_epochs") == "3"
    assert json.loads((d / "metrics" / "train.json").read_text())["epochs"] == 3
    assert _ckpt(d)["global_step"] == 18
    # the whole curve, and bit for bit the uninterrupted run's: the randomness is a function of
    # (seed, epoch, batch) and the optimiser state is in the checkpoint
    assert curve(d) == curve(ddp_trained)


@pytest.mark.slow
def test_torchrun_evaluation_equals_single_process(ddp_trained, tmp_path):
    single, shared = tmp_path / "single", tmp_path / "shared"
    for d in (single, shared):
        shutil.copytree(ddp_trained, d, ignore=shutil.ignore_patterns("metrics", "artifacts"))
    run(["vaerepro", "evaluate", "--no-progress"], single)
    # 120 test digits in batches of 50: rank 0 takes batches 0 and 2, rank 1 batch 1
    out = run(
        [
            "torchrun",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "vaerepro.cli",
            "evaluate",
            "--no-progress",
        ],
        shared,
    )
    assert "rank 1 of 2 takes 1 example batches" in out.stdout + out.stderr
    a = np.load(single / "artifacts" / "per_example.npz")
    b = np.load(shared / "artifacts" / "per_example.npz")
    assert a.files == b.files and len(a["log_px"]) == 120
    for k in a.files:
        assert np.array_equal(a[k], b[k]), k  # exactly, every example
    assert not np.isnan(b["log_px"]).any()
    # the same record, but for where it ran: one process or two
    one, two = (json.loads((x / "metrics" / "eval.json").read_text()) for x in (single, shared))
    assert two.pop("device") == one.pop("device") + ", 2 processes"
    assert one == two


@pytest.mark.slow
def test_vaerepro_run_with_ddp(raw_dir, tmp_path):
    """`vaerepro run trainer=ddp`: rank 1 is a re-run of the Hydra app; it trains and shares the evaluation
    out, and writes nothing; rank 0 does everything else, into one MLflow run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    d = _project(tmp_path / "p", raw_dir)
    out_dir = tmp_path / "p" / "runs" / "ddp"
    overrides = [*TINY, f"data.raw_dir={raw_dir}", *DDP, f"train.batch_size={PER_DEVICE}"]
    out = run(
        ["vaerepro", "run", *overrides, f"hydra.run.dir={out_dir}"], d, env={"MLFLOW_TRACKING_URI": uri}
    )
    log = out.stdout + out.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log and "rank 1 of 2 takes 1 example batches" in log
    assert log.count("prepared mnist5k") == 1  # rank 1 did not prepare again

    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    assert not [f for f in files if "ddp_process" in f or "pl_hydra" in f], files  # nothing from rank 1
    assert {"metrics/eval.json", "metrics/train.json", "reports/report.html", "models/best.ckpt"} <= set(
        files
    )
    (only,) = _runs(uri)
    assert only.info.status == "FINISHED" and "binary/test/log_px" in only.data.metrics

    # the evaluation shared out over the 2 training processes equals a single process's
    ev = json.loads((out_dir / "metrics" / "eval.json").read_text())
    per_ex = np.load(out_dir / "artifacts" / "per_example.npz")
    alone = tmp_path / "alone"
    shutil.copytree(out_dir, alone, ignore=shutil.ignore_patterns("metrics", "artifacts", "reports"))
    (alone / "dvc.yaml").write_text("stages: {}\n")
    run(["vaerepro", "params", *overrides, "tracking.enabled=false"], d)
    shutil.copy(d / "params.yaml", alone / "params.yaml")
    run(["vaerepro", "evaluate", "--no-progress"], alone)
    for k in per_ex.files:
        assert np.array_equal(per_ex[k], np.load(alone / "artifacts" / "per_example.npz")[k]), k
    single = json.loads((alone / "metrics" / "eval.json").read_text())
    # the same numbers; the configurations each evaluation ran under differ in where it was tracked only, and
    # the records in where it ran: the training's 2 processes, then one
    assert ev["device"] == single["device"] + ", 2 processes"
    numbers = [{k: v for k, v in d.items() if k not in ("config", "device")} for d in (single, ev)]
    assert numbers[0] == numbers[1]
    assert list(differences(ev["config"], single["config"])) == ["tracking.enabled"]


@pytest.mark.slow
def test_torchrun_training_with_another_number_of_processes_is_refused(raw_dir, prepared_tiny, tmp_path):
    """torchrun starting 2 processes for trainer=cpu (1 device): each rank trained alone and rank 1 failed
    with an AttributeError in MLflow, rank 0 then ended KILLED by torchrun; with trainer.devices=3 Lightning
    raised a ValueError. Each rank now says it in one line, exit status 2, before anything is written."""
    import subprocess

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for overrides in ([], [*DDP[:2], "trainer.devices=3"]):
        d = _project(tmp_path / f"p{len(overrides)}", raw_dir, *overrides, prepared=prepared_tiny)
        before = sorted(p.relative_to(d) for p in d.rglob("*"))
        cmd = ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "vaerepro.cli", "train"]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        proc = subprocess.run(
            [*cmd, "--no-progress"],
            cwd=d,
            env={**env, "MLFLOW_TRACKING_URI": uri},
            capture_output=True,
            text=True,
            timeout=300,
        )
        err = proc.stdout + proc.stderr
        # torchrun's own traceback (ChildFailedError) stays; none from vaerepro's processes
        assert proc.returncode != 0 and "exitcode  : 2" in err, err[-4000:]
        assert not re.search(r'File ".*vaerepro', err), err[-4000:]
        lines = [line for line in err.splitlines() if line.startswith("vaerepro train: ")]
        assert len(lines) == 2 and "torchrun started 2 processes (WORLD_SIZE=2)" in lines[0], err[-4000:]
        assert sorted(p.relative_to(d) for p in d.rglob("*")) == before  # no models/, metrics/, plots/
        assert not _runs(uri)


def test_vaerepro_run_refuses_an_external_launcher(monkeypatch, capsys):
    # under torchrun every rank would fetch and prepare; the stages are the way there
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert "torchrun" in err and "vaerepro train" in err


@pytest.mark.slow
def test_a_sweep_of_ddp_trials(raw_dir, tmp_path):
    """2 Optuna trials, each DDP on 2 CPU processes: Lightning re-launches
    `python -m vaerepro.sweep.__main__ ...` for rank 1 of each trial with that trial's overrides
    (SameConfigOnEveryRank checks it)."""
    import hashlib

    import optuna

    from vaerepro import sweep

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        sys.executable, "-m", "vaerepro.cli", "run", "--multirun",
        *TINY, f"data.raw_dir={raw_dir}", *DDP, f"train.batch_size={PER_DEVICE}",
        "hydra/sweeper=vaerepro_optuna", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0",
        "hydra.sweeper.study_name=ddp", f"hydra.sweep.dir={tmp_path / 'runs'}", "hydra.sweeper.n_trials=2",
        "train.lr=choice(0.001,0.003)", "model.latent_dim=choice(2,3,5)",
    ]  # fmt: skip
    run(cmd, tmp_path, env={"MLFLOW_TRACKING_URI": uri})

    study = optuna.load_study(
        study_name="ddp", storage=sweep.open_storage(str(tmp_path / "optuna" / "ddp.log"))
    )
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:
        trial_dir = Path(t.user_attrs["trial_dir"])
        params = (trial_dir / "params.yaml").read_text()
        assert f"latent_dim: {t.params['model.latent_dim']}" in params
        digest = hashlib.sha256(params.encode()).hexdigest()[:12]
        trial_log = (trial_dir / "trial.log").read_text()
        # rank 1 resolved the very configuration rank 0 did, this trial's hyperparameters included
        assert f"all 2 ranks train configuration {digest}" in trial_log
        assert "rank 1 of 2 takes 1 example batches" in trial_log
    runs = [r for r in _runs(uri) if "vaerepro.trial" in r.data.tags]
    assert sorted(int(r.data.tags["vaerepro.trial"]) for r in runs) == [0, 1]  # one MLflow run per trial
