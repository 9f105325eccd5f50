"""Resuming and checkpoint files under the conditions a user meets: an early-stopped training resumed, a run
directory that moved, a save killed part-way."""

from __future__ import annotations

import json
import os
import shutil

import lightning.pytorch as pl
import pytest
import torch

from conftest import Crash, copy_prepared, curve, tiny_config
from vaerepro import checkpoints
from vaerepro.train import train


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_a_resumed_early_stopped_training_trains_no_more_and_takes_the_configured_patience(
    prepared_tiny, tmp_path
):
    """Resuming a training that early stopping ended (train.resume=true, same config, e.g. a reproduction
    whose evaluate was stopped) trains no epoch: train.json, elbo.csv and best.ckpt stay as they were. With
    train.patience raised (a change resume allows), it goes on to where an uninterrupted training with that
    patience ends."""
    # lr 1e-9: the weights barely move, so the validation ELBO stops improving at once (epoch 0 is best)
    settings = (
        "train.max_epochs=30",
        "train.lr=1e-9",
        "train.early_stopping=true",
        "train.checkpoint_every_s=0",
    )
    whole = copy_prepared(prepared_tiny, tmp_path / "whole")
    patient = train(tiny_config(*settings, "train.patience=4"), whole, enable_progress_bar=False)

    out = copy_prepared(prepared_tiny, tmp_path / "stopped")
    first = train(tiny_config(*settings, "train.patience=2"), out, enable_progress_bar=False)
    assert (first["epochs"], first["best_epoch"]) == (3, 0)  # epochs 1 and 2 did not improve on epoch 0
    best = (out / "models" / "best.ckpt").read_bytes()
    again = train(
        tiny_config(*settings, "train.patience=2", "train.resume=true"), out, enable_progress_bar=False
    )
    assert (again["epochs"], again["best_epoch"], again["best_val_elbo"]) == (3, 0, first["best_val_elbo"])
    assert len(curve(out)) == 3 and (out / "models" / "best.ckpt").read_bytes() == best
    assert json.loads((out / "metrics" / "train.json").read_text())["epochs"] == 3

    longer = train(
        tiny_config(*settings, "train.patience=4", "train.resume=true"), out, enable_progress_bar=False
    )
    assert patient["epochs"] > 3
    for k in ("epochs", "best_epoch", "best_val_elbo", "val_elbo"):
        assert longer[k] == patient[k], k
    assert curve(out) == curve(whole)


@pytest.mark.slow
def test_a_resumed_training_in_a_moved_directory_keeps_its_best_checkpoint(prepared_tiny, tmp_path):
    """A training that crashed, whose directory then moved (another node's mount, a copied project), resumes
    with its best score: a worse epoch then neither overwrites best.ckpt nor becomes best_val_elbo."""

    class Scramble(pl.Callback):  # epoch 3 starts from noised weights: its validation ELBO is the worst
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 3:
                with torch.no_grad():
                    for p in module.parameters():
                        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))

    class CrashInEpoch3(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == 3 and batch_idx == 2:
                raise Crash

    settings = ("train.max_epochs=4", "train.checkpoint_every_s=0")
    whole = train(
        tiny_config(*settings),
        copy_prepared(prepared_tiny, tmp_path / "whole"),
        enable_progress_bar=False,
        callbacks=[Scramble()],
    )
    assert whole["best_epoch"] == 2 and whole["val_elbo"] < whole["best_val_elbo"]
    before = copy_prepared(prepared_tiny, tmp_path / "before")
    with pytest.raises(Crash):
        train(
            tiny_config(*settings), before, enable_progress_bar=False, callbacks=[Scramble(), CrashInEpoch3()]
        )
    out = tmp_path / "moved"
    shutil.move(before, out)
    resumed = train(
        tiny_config(*settings, "train.resume=true"), out, enable_progress_bar=False, callbacks=[Scramble()]
    )
    for k in ("best_val_elbo", "best_epoch", "val_elbo", "epochs"):
        assert resumed[k] == whole[k], k
    best = _load(out / "models" / "best.ckpt")
    assert best["epoch"] == 2
    assert all(
        torch.equal(v, _load(tmp_path / "whole" / "models" / "best.ckpt")["state_dict"][k])
        for k, v in best["state_dict"].items()
    )


class Killed(BaseException):
    """A kill -9 or power cut in the middle of writing a file."""


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a second file system (/dev/shm)")
def test_a_checkpoint_save_killed_part_way_leaves_the_earlier_file_readable(
    prepared_tiny, tmp_path, monkeypatch
):
    """best.ckpt and last.ckpt are replaced whole or not at all, also with the system's temporary directory on
    another file system than models/ (node-local /tmp, the project on NFS), where a file moved there is
    copied into its final name."""
    import shutil as shutil_mod
    import tempfile

    out = copy_prepared(prepared_tiny, tmp_path / "run")
    if os.stat("/dev/shm").st_dev == os.stat(out).st_dev:
        pytest.skip("/dev/shm is on the same file system as the test's directory")
    train(tiny_config("train.max_epochs=1"), out, enable_progress_bar=False)
    good = {name: _load(out / "models" / name)["epoch"] for name in ("best.ckpt", "last.ckpt")}

    scratch = tempfile.mkdtemp(dir="/dev/shm")
    monkeypatch.setattr(tempfile, "tempdir", scratch)  # as TMPDIR on another file system
    monkeypatch.setattr(shutil_mod, "_USE_CP_SENDFILE", False)  # copies go through copyfileobj

    def copy_dies_half_way(fsrc, fdst, length=0):
        data = fsrc.read()
        fdst.write(data[: len(data) // 2])
        fdst.flush()
        raise Killed

    def fsync_dies(fd):  # a kill after the bytes were written, before they replace the file
        raise Killed

    monkeypatch.setattr(shutil_mod, "copyfileobj", copy_dies_half_way)
    monkeypatch.setattr(os, "fsync", fsync_dies)
    resume = tiny_config("train.max_epochs=2", "train.resume=true", "train.checkpoint_every_s=0")
    try:
        with pytest.raises(Killed):
            train(resume, out, enable_progress_bar=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    monkeypatch.undo()
    for name, epoch in good.items():
        assert checkpoints.read(out / "models" / name)["epoch"] == epoch, name  # readable, the earlier one


@pytest.mark.slow
def test_resume_refuses_another_global_batch_before_touching_anything(tmp_path, raw_dir, prepared_tiny):
    """train.batch_size is per device: a training resumed on 2 processes from a 1-process last.ckpt would go
    on with twice the global batch (another training, silently joined to the first one's curve). Refused in
    one line, exit 2, with last.ckpt and elbo.csv as they were."""
    import subprocess

    from conftest import BIN, ROOT, TINY, run

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    copy_prepared(prepared_tiny, tmp_path)
    common = [*TINY, f"data.raw_dir={raw_dir}", "tracking.enabled=false"]
    run(["vaerepro", "params", *common, "train.max_epochs=1"], tmp_path)
    run(["vaerepro", "train"], tmp_path)
    before = {
        p: (tmp_path / p).read_bytes() for p in ("models/last.ckpt", "models/best.ckpt", "plots/elbo.csv")
    }
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    run(["vaerepro", "params", *common, "train.max_epochs=2", "train.resume=true", *ddp], tmp_path)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        ["vaerepro", "train"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    line = proc.stderr.strip().splitlines()[-1]  # the lines before it: Lightning's info
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert line.startswith("vaerepro train: ") and "last.ckpt: train.resume=true" in line, line
    assert "9 optimiser steps" in line and "takes 5 an epoch" in line and "= 50 x 2)" in line, line
    assert "resuming from" not in proc.stderr  # it does not say it resumes
    assert {p: (tmp_path / p).read_bytes() for p in before} == before


@pytest.mark.parametrize(("key", "value", "recorded"), [("trainer.precision", "bf16-mixed", "32-true")])
def test_resume_refuses_other_arithmetic_before_touching_anything(
    tmp_path, prepared_tiny, key, value, recorded
):
    """Resumed under trainer.precision=bf16-mixed, a float32 training went on in bf16 and was recorded as one
    bf16-mixed training. last.ckpt names its arithmetic (checkpoints.NUMERICS_KEY); another is refused,
    naming both, with the files as they were; a checkpoint from before the key is resumed as before."""
    out = copy_prepared(prepared_tiny, tmp_path)
    train(tiny_config("train.max_epochs=1"), out, enable_progress_bar=False)
    last = out / "models" / "last.ckpt"
    # trainer.matmul_precision switches CUDA's TF32: recorded on CUDA only (train_resume.numerics)
    assert _load(last)[checkpoints.NUMERICS_KEY] == {"trainer.precision": "32-true"}
    files = ("models/last.ckpt", "models/best.ckpt", "plots/elbo.csv", "metrics/train.json")
    before = {p: (out / p).read_bytes() for p in files}
    with pytest.raises(checkpoints.CheckpointError) as err:
        train(
            tiny_config("train.max_epochs=2", "train.resume=true", f"{key}={value}"),
            out,
            enable_progress_bar=False,
        )
    assert str(err.value) == (
        f"{last}: train.resume=true, but it was trained in other arithmetic ({key}: {recorded} in the "
        f"checkpoint, {value} now). Nothing was changed; set those keys as the training had them"
    )
    assert {p: (out / p).read_bytes() for p in files} == before
    ckpt = _load(last)
    del ckpt[checkpoints.NUMERICS_KEY]  # written before the key: not compared
    torch.save(ckpt, last)
    metrics = train(tiny_config("train.max_epochs=2", "train.resume=true"), out, enable_progress_bar=False)
    assert metrics["epochs"] == 2
