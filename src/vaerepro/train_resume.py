"""Whether a training may go on from its models/last.ckpt under a configuration (train.resume=true): every
refusal, each a CheckpointError in one line that names the checkpoint and what differs, made before anything
is written.

A resumed training must be the one the checkpoint began: the same model, likelihood, data (by digest) and
training keys (`check_resumable`), a whole training state of no more epochs than train.max_epochs
(`check_state`), the same global batch (`check_same_batches`) and the same arithmetic
(`check_same_numerics`). The train stage checks them as it starts; `vaerepro run ... train.resume=true`
checks them before it rewrites the run's params.yaml and prepared/ (`check_resume_of_run`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from vaerepro import checkpoints, stepsize
from vaerepro import config as config_mod
from vaerepro.config import Config
from vaerepro.trainer import EpochHistory


def check_resumable(
    path: Path, ckpt: dict[str, Any], module: pl.LightningModule, max_epochs: int
) -> dict[str, Any]:
    """The checkpoint to resume from (`ckpt`, read from `path` by checkpoints.read, which refuses an
    unreadable one), compared with the module the config builds; a CheckpointError (nothing touched yet)
    when it trained something else. train.batch_size (per device) may change when the checkpoint records
    its world size: check_same_batches then compares the global batch, which must stay."""
    check_state(path, ckpt, max_epochs)
    recorded = checkpoints.global_batch(ckpt) is not None  # the global batch is then compared instead
    per_device = frozenset({"train.batch_size"} if recorded else ())
    differ = checkpoints.mismatches(ckpt["hyper_parameters"], dict(module.hparams), ignore=per_device)
    if differ:
        raise checkpoints.CheckpointError(
            f"{path}: train.resume=true, but the config differs from the training it would continue: "
            + "; ".join(differ)
            + ". Nothing was changed; restore those keys, or train from the start (train.resume=false, "
            "after moving models/ aside)"
        )
    return ckpt


def check_state(path: Path, ckpt: dict[str, Any], max_epochs: int) -> None:
    """A CheckpointError when `ckpt` is no training state to resume (weights only) or holds more epochs
    than train.max_epochs."""
    if "loops" not in ckpt or "optimizer_states" not in ckpt:
        raise checkpoints.CheckpointError(f"{path}: holds weights only, not a training state to resume")
    done = len(saved_curve(ckpt))
    if done > max_epochs:
        raise checkpoints.CheckpointError(
            f"{path}: holds {done} trained epochs, more than train.max_epochs={max_epochs}; nothing was "
            f"changed; set train.max_epochs={done} or more to continue it"
        )


def check_resume_of_run(cfg: Config, out_dir: Path, prepared_meta: Mapping[str, Any] | None = None) -> None:
    """Every refusal the train stage would make of `vaerepro run ... train.resume=true` into a run's
    directory, made before that command rewrites the run's params.yaml, mark and prepared/, with train's own
    message, so that a refused resume leaves the run's files as they were (train checks again after). The
    caller first takes and releases the training's lock (train.hold): a training or an evaluation running
    there now is refused before these.

    - a models/last.ckpt of weights only, or of more epochs than train.max_epochs (`check_state`);
    - a config that is not the run's: the data keys of its params.yaml (the checkpoint knows its data by
      digest only, which prepare would tell only after overwriting prepared/), and what last.ckpt records
      (model, likelihood, training keys, seed, data space; under train.lr_candidates, its pilots' rate);
    - another global batch (`check_same_batches`; the number of training examples from the run's
      prepared/ when its params.yaml's data keys matched; devices=auto on an accelerator: train only, once
      Lightning has counted the devices);
    - other arithmetic (`check_same_numerics`).

    `prepared_meta`: the meta.json of the data prepare would write now (cli prepares a user's .npz, which
    has no checksum, into a temporary directory), whose digest is compared with the checkpoint's."""
    last = out_dir / "models" / "last.ckpt"
    if not (cfg.train.resume and last.is_file()):
        return
    saved = checkpoints.read(last)
    check_state(last, saved, cfg.train.max_epochs)
    differ, old = [], None
    recorded = out_dir / "params.yaml"
    if recorded.is_file():
        try:
            old = config_mod.load(recorded).data.model_dump()
        except config_mod.ConfigError:
            old = None  # not a config of this version: the digest check in train still compares the data
        new = cfg.data.model_dump()
        if old is not None:
            differ += [
                f"data.{k}: {recorded.name} {old[k]!r}, config {v!r}"
                for k, v in new.items()
                if k not in config_mod.SAME_IMAGES_DATA_KEYS and old.get(k) != v
            ]
    hparams = saved.get("hyper_parameters") or {}
    if isinstance(hparams.get("vae_config"), dict):  # else check_resumable refuses it as train does
        vae = hparams["vae_config"]
        chosen = stepsize.recorded(saved) if cfg.train.lr_candidates is not None else None
        trained = cfg if chosen is None else stepsize.at_rate(cfg, chosen["chosen"])  # as train builds it
        dim, quantized = vae.get("data_dim", 0), hparams.get("quantized")
        digest = checkpoints.data_digest(dict(prepared_meta)) if prepared_meta is not None else None
        expected = checkpoints.expected_hparams(trained, dim, quantized, digest)
        ignore = frozenset({"train.batch_size"} if checkpoints.global_batch(saved) is not None else ())
        differ += checkpoints.mismatches(hparams, expected, ignore=ignore)
    if differ:
        raise checkpoints.CheckpointError(
            f"{last}: train.resume=true, but the config differs from the run it would continue: "
            + "; ".join(differ)
            + ". Nothing was changed; restore those keys, or give this configuration its own run directory"
        )
    x_train, world = out_dir / "prepared" / "x_train.npy", configured_world(cfg.trainer)
    if world is not None:  # prepared/ is of this config's data when its params.yaml's data keys are
        known = old is not None and x_train.is_file()
        n_train = len(np.load(x_train, mmap_mode="r")) if known else None  # the .npy header only
        check_same_batches(last, saved, n_train, cfg.train.batch_size, world)
    check_same_numerics(last, saved, configured_numerics(cfg.trainer))


def configured_world(t: config_mod.TrainerConfig) -> int | None:
    """devices x nodes of the trainer `t` describes, as Lightning resolves them; None for devices=auto on
    an accelerator other than the CPU (every visible device: known once the Trainer is built)."""
    if t.devices == "auto":
        return t.num_nodes if t.accelerator == "cpu" else None  # Lightning's CPU accelerator: one device
    return t.devices * t.num_nodes


def check_same_batches(
    path: Path, ckpt: dict[str, Any], n_train: int | None, batch_size: int, world: int
) -> None:
    """A CheckpointError (nothing touched yet) when the resumed checkpoint was trained with another global
    batch (train.batch_size x devices x nodes) than this configuration's, so the resumed epochs would be
    another training than the one the checkpoint began. Another split of the same global batch over the
    devices (1 x 50 resumed as 2 x 25) is the same training, up to float rounding.

    train.batch_size is per device. A checkpoint records its world size (checkpoints.WORLD_SIZE_KEY) beside
    it, hence its global batch. An older one does not (and check_resumable kept its train.batch_size); its
    steps tell: global_step = epochs done x ceil(n_train / global batch), last.ckpt being written at epoch
    ends only, so another number of optimiser steps an epoch is another global batch. `n_train` None (not
    known yet): the recorded global batch only."""
    now = f"a global batch of train.batch_size x devices x nodes = {batch_size} x {world}"
    recorded = checkpoints.global_batch(ckpt)
    if recorded is None:
        fix = "set trainer.devices and trainer.num_nodes as the training had them"
    else:
        saved, was = recorded[0] * recorded[1], f"{recorded[0]} x {recorded[1]}"
        fix = f"keep train.batch_size x devices x nodes = {saved} (the checkpoint's {was})"
    done, steps = len(saved_curve(ckpt)), ckpt.get("global_step")
    per_epoch = None if n_train is None else math.ceil(n_train / (batch_size * world))  # steps an epoch
    if done > 0 and steps is not None and per_epoch is not None and steps != done * per_epoch:
        raise checkpoints.CheckpointError(
            f"{path}: train.resume=true, but its {done} epochs took {steps} optimiser steps "
            f"({steps / done:g} an epoch) and this configuration takes {per_epoch} an epoch ({now}): it "
            f"would go on with another global batch. Nothing was changed; {fix}"
        )
    if recorded is not None and saved != batch_size * world:  # as many steps an epoch, other batches
        raise checkpoints.CheckpointError(
            f"{path}: train.resume=true, but it was trained with a global batch of {saved} and this "
            f"configuration has {now}: it would go on with another global batch. Nothing was changed; {fix}"
        )


def numerics(trainer: pl.Trainer) -> dict[str, str]:
    """The arithmetic `trainer` trains in (checkpoints.NUMERICS_KEY): Lightning's precision, and on a CUDA
    device torch's float32 matmul precision, which switches CUDA's TF32 matmuls ("high") on or off
    ("highest"). Not recorded on the CPU: trainer=cpu has "highest", trainer=ddp "high", and a CPU training
    resumes on trainer=ddp's processes with the same global batch (tests/test_resume_world_size.py)."""
    out = {"trainer.precision": str(trainer.precision)}
    if trainer.strategy.root_device.type == "cuda":
        out["trainer.matmul_precision"] = torch.get_float32_matmul_precision()
    return out


def configured_numerics(t: config_mod.TrainerConfig) -> dict[str, str]:
    """`numerics` of the trainer `t` describes, before it is built: Lightning names precision "32"
    "32-true"; train sets torch's matmul precision to trainer.matmul_precision, recorded on CUDA only."""
    out = {"trainer.precision": {"32": "32-true"}.get(t.precision, t.precision)}
    if t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available()):
        out["trainer.matmul_precision"] = t.matmul_precision
    return out


def check_same_numerics(path: Path, ckpt: dict[str, Any], now: Mapping[str, str]) -> None:
    """A CheckpointError (nothing touched yet) when the resumed checkpoint was trained in other arithmetic
    (checkpoints.NUMERICS_KEY, `numerics`) than `now` (`numerics` of this trainer, or `configured_numerics`
    before it is built): its epochs and the resumed ones would be one training under two precisions,
    recorded as one. A key only one side records is not compared."""
    recorded = ckpt.get(checkpoints.NUMERICS_KEY) or {}
    differ = [f"{k}: {v} in the checkpoint, {now[k]} now" for k, v in recorded.items() if now.get(k, v) != v]
    if differ:
        raise checkpoints.CheckpointError(
            f"{path}: train.resume=true, but it was trained in other arithmetic ({'; '.join(differ)}). "
            "Nothing was changed; set those keys as the training had them"
        )


def saved_curve(checkpoint: dict[str, Any]) -> list[dict[str, float]]:
    """EpochHistory's rows in a whole-state checkpoint (epoch, train_elbo, val_elbo), under its state key
    (Lightning's default: the class name)."""
    return list(((checkpoint.get("callbacks") or {}).get(EpochHistory.__qualname__) or {}).get("rows", []))
