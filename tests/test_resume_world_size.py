"""Resuming on another number of devices: train.batch_size is per device, the global batch is batch_size x
devices x nodes, and a checkpoint records its world size (checkpoints.WORLD_SIZE_KEY). A resume may split the
same global batch over other devices (1 x 50 resumed as 2 x 25: the same training up to float rounding, see
tests/test_ddp.py); another global batch is refused in one line, and a checkpoint written before the world
size was recorded keeps its train.batch_size."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import BIN, curve, run, tiny_config
from test_ddp import DDP, ELBO_TOL_NATS, PER_DEVICE, WEIGHT_TOL, _ckpt, _project
from vaerepro import checkpoints
from vaerepro.train_resume import check_resumable, check_same_batches

N_TRAIN = 420  # the tiny split's training digits: 9 batches of 50 an epoch


def _saved(batch_size: int, world: int | None, epochs: int = 1) -> dict:
    """A whole-state checkpoint of `epochs` epochs trained at train.batch_size x world (no world size key
    for None: a checkpoint written before it was recorded)."""
    hp = checkpoints.expected_hparams(tiny_config(f"train.batch_size={batch_size}"), 784, False, "abc")
    rows = [{"epoch": e, "train_elbo": -200.0, "val_elbo": -190.0} for e in range(epochs)]
    ckpt = {
        "hyper_parameters": hp,
        "loops": {},
        "optimizer_states": [],
        "global_step": epochs * -(-N_TRAIN // (batch_size * (world or 1))),
        "callbacks": {"EpochHistory": {"rows": rows}},
    }
    if world is not None:
        ckpt[checkpoints.WORLD_SIZE_KEY] = world
    return ckpt


def _resume(ckpt: dict, batch_size: int, world: int) -> None:
    """The resume's two checks, as train.train runs them, for a configuration of batch_size x world."""
    module = SimpleNamespace(
        hparams=checkpoints.expected_hparams(tiny_config(f"train.batch_size={batch_size}"), 784, False, "abc")
    )
    path = Path("models/last.ckpt")
    check_resumable(path, ckpt, module, max_epochs=3)
    check_same_batches(path, ckpt, N_TRAIN, batch_size, world)


@pytest.mark.slow
def test_a_recorded_world_size_lets_the_per_device_batch_change_with_the_devices():
    ckpt = _saved(50, 1)
    _resume(ckpt, 25, 2)  # the same global batch of 50
    _resume(ckpt, 50, 1)
    _resume(_saved(25, 2), 50, 1)  # and back
    _resume(_saved(10, 5), 25, 2)

    # another global batch: refused, naming the checkpoint's split and what to keep
    with pytest.raises(checkpoints.CheckpointError) as err:
        _resume(ckpt, 50, 2)  # 1 x 50 resumed as 2 x 50
    msg = str(err.value)
    assert "\n" not in msg
    assert "its 1 epochs took 9 optimiser steps" in msg and "takes 5 an epoch" in msg, msg
    assert msg.endswith("keep train.batch_size x devices x nodes = 50 (the checkpoint's 50 x 1)"), msg
    with pytest.raises(checkpoints.CheckpointError, match=r"takes 17 an epoch \(.* = 25 x 1\)"):
        _resume(ckpt, 25, 1)
    # 51 x 1 takes as many steps an epoch as 50 x 1 (ceil(420 / 51) = 9): the recorded batch tells them apart
    with pytest.raises(checkpoints.CheckpointError) as err:
        _resume(ckpt, 51, 1)
    assert "trained with a global batch of 50 and this configuration has a global batch of " in str(err.value)
    assert "= 51 x 1" in str(err.value)


def test_a_checkpoint_without_a_world_size_keeps_its_per_device_batch():
    """Written before the world size was recorded: its train.batch_size stays (as before), and its steps
    still refuse another world size at the same per-device batch."""
    old = _saved(50, None)
    _resume(old, 50, 1)
    with pytest.raises(checkpoints.CheckpointError, match="train.batch_size: checkpoint 50, config 25"):
        _resume(old, 25, 2)
    with pytest.raises(checkpoints.CheckpointError, match="set trainer.devices and trainer.num_nodes as"):
        _resume(old, 50, 2)


@pytest.mark.slow
def test_one_device_resumed_on_two_with_the_same_global_batch_ends_as_one_uninterrupted(
    tmp_path, raw_dir, prepared_tiny
):
    """3 epochs of 1 x 70 against 1 epoch of 1 x 70 resumed for 2 more as 2 x 35 (the same global batch):
    the same weights and curve within test_ddp.py's tolerances. Resuming it as 2 x 70 is refused first, in
    one line, with nothing changed."""
    one = [f"train.batch_size={2 * PER_DEVICE}", "tracking.enabled=false"]
    whole = _project(tmp_path / "whole", raw_dir, *one, prepared=prepared_tiny)
    run(["vaerepro", "train", "--no-progress"], whole)

    d = _project(tmp_path / "resumed", raw_dir, *one, "train.max_epochs=1", prepared=prepared_tiny)
    run(["vaerepro", "train", "--no-progress"], d)
    assert _ckpt(d)[checkpoints.WORLD_SIZE_KEY] == 1
    assert _ckpt(d, "best.ckpt")[checkpoints.WORLD_SIZE_KEY] == 1

    resume = ["train.max_epochs=3", "train.resume=true", "tracking.enabled=false", *DDP]
    _project(d, raw_dir, *resume, f"train.batch_size={2 * PER_DEVICE}")  # 2 x 70: twice the global batch
    before = {p: (d / p).read_bytes() for p in ("models/last.ckpt", "models/best.ckpt", "plots/elbo.csv")}
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        ["vaerepro", "train", "--no-progress"], cwd=d, env=env, capture_output=True, text=True, timeout=600
    )
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert line.startswith("vaerepro train: ") and "another global batch" in line, line
    assert "(the checkpoint's 70 x 1)" in line, line
    assert {p: (d / p).read_bytes() for p in before} == before

    _project(d, raw_dir, *resume, f"train.batch_size={PER_DEVICE}")  # 2 x 35: the same global batch
    out = run(["vaerepro", "train", "--no-progress"], d)
    assert "resuming from" in out.stdout + out.stderr
    a, b = _ckpt(whole), _ckpt(d)
    assert a["global_step"] == b["global_step"] == 3 * 6
    assert b[checkpoints.WORLD_SIZE_KEY] == 2 and b["hyper_parameters"]["train"]["batch_size"] == PER_DEVICE
    diff = max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"])
    assert diff < WEIGHT_TOL, diff
    ca, cb = curve(whole), curve(d)
    assert [r["epoch"] for r in cb] == [0, 1, 2] and ca[0] == cb[0]  # epoch 0: the 1-device training's
    for ra, rb in zip(ca, cb, strict=True):
        for k in ("train_elbo", "val_elbo"):
            assert abs(ra[k] - rb[k]) < ELBO_TOL_NATS, (k, ra, rb)
    assert ca[0]["val_elbo"] < ca[-1]["val_elbo"]  # it trained
    ja, jb = (json.loads((x / "metrics" / "train.json").read_text()) for x in (whole, d))
    assert (ja["epochs"], ja["best_epoch"]) == (jb["epochs"], jb["best_epoch"]) == (3, 2)
    assert abs(ja["best_val_elbo"] - jb["best_val_elbo"]) < ELBO_TOL_NATS
