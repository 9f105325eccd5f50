"""AEVB's step-size selection: the learning rate chosen from `train.lr_candidates` by short pilot trainings.

Kingma & Welling 2014, Section 5: "the Adagrad global stepsize parameters were chosen from {0.01, 0.02, 0.1}
based on performance on the training set in the first few iterations". Here: for each candidate in order, a
pilot trains `train.lr_pilot_steps` optimiser steps from the training's own initial weights, on its own first
batches, with its optimiser, objective, schedule and weight decay, at that rate; its score is the mean
training bound over those steps (the objective in nats per example: the mean over steps of each batch's mean).
The candidate with the highest score is chosen (the first on a tie; a pilot that diverged scores below any
that did not), the pilots' weights are dropped, and the training runs at the chosen rate exactly as a
training with `train.lr=<chosen>` would (same initial weights, batches, curve and final weights):
`train.train` builds its module from `at_rate(cfg, chosen)`.

A pilot is a throwaway Lightning Trainer (`pilot`) around the project's own LightningModule and DataModule,
not a loop of our own, so that every pilot step is the training's step: its manual optimisation, batch seeds,
epoch reshuffles, and the schedule's step at each epoch end. So a pilot longer than an epoch follows the
schedule into epoch 1 as the training does (IWAE's schedule then lowers the rate by 10^(-1/7)); within epoch
0 (AEVB's MNIST: 500 steps an epoch) every pilot step runs at candidate x the schedule's factor for epoch 0,
and the chosen candidate's pilot is the training's first steps, step for step.

Resuming, the selection is not repeated: whole-state checkpoints (last.ckpt) carry it (`SelectionRecord`)
and `choose` returns the recorded one. One device only (config.py refuses more): under DDP every rank
re-runs the script.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from vaerepro.config import Config
from vaerepro.errors import Diverged
from vaerepro.trainer import LIGHTNING_INFO

log = logging.getLogger(__name__)


class SelectionRecord(pl.Callback):
    """The selection (`choose`'s dict) kept in whole-state checkpoints, under this class's name in their
    "callbacks" state (Lightning's state key for a callback), so that a resumed training neither repeats the
    pilots nor forgets them; `recorded` reads it back."""

    def __init__(self, selection: Mapping[str, Any]):
        self.selection = dict(selection)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.selection)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.selection = dict(state)


def recorded(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The selection a whole-state checkpoint (as `checkpoints.read` returns it) recorded, or None."""
    state = (checkpoint.get("callbacks") or {}).get(SelectionRecord.__qualname__)
    return dict(state) if state else None


def at_rate(cfg: Config, lr: float) -> Config:
    """`cfg` with train.lr = lr, every other key as it is (train.lr_candidates included: the module's
    checkpoints record both the candidates and the rate it trained at)."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": float(lr)})})


def best_index(scores: Sequence[float]) -> int:
    """The index of the highest score, the first of equal ones; a non-finite score (a pilot whose bound
    overflowed or became NaN) loses to every finite one. Diverged when none is finite."""
    finite = [i for i, s in enumerate(scores) if math.isfinite(s)]
    if not finite:
        raise Diverged(
            f"train.lr_candidates: every pilot's training bound is non-finite ({list(scores)}); "
            "give smaller rates"
        )
    return max(finite, key=lambda i: scores[i])  # max keeps the first of equal keys


def choose(
    cfg: Config,
    data: pl.LightningDataModule,
    build: Callable[[Config], pl.LightningModule],
    *,
    saved: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The step-size selection of the training `cfg` describes, as metrics/train.json records it:
    {"candidates", "pilot_steps", "pilot_bounds" (nats per example, one per candidate), "chosen"}.

    None without train.lr_candidates. Resuming (`saved`: the whole-state checkpoint, read), the selection it
    recorded, without a pilot; None when it recorded none (train_resume.check_resumable then refuses it: its
    train.lr_candidates differ from the config's). Otherwise one `pilot` per candidate, of a module that
    `build` (train.build_module on `data`) makes from `at_rate(cfg, candidate)`, each run on the global
    random state of the moment and giving it back afterwards (`forked_rng`): every pilot starts from the
    weights the training's own `build` will draw next, and the training's random state is as if no pilot had
    run.
    """
    t = cfg.train
    if t.lr_candidates is None:
        return None
    if saved is not None:
        return recorded(saved)
    scores = []
    for lr in t.lr_candidates:
        start = time.perf_counter()
        with forked_rng(cuda=cfg.trainer.accelerator != "cpu"):
            scores.append(pilot(build(at_rate(cfg, lr)), data, cfg, t.lr_pilot_steps))
        log.info(
            "step-size pilot: lr=%g, mean training bound %.3f nats per example over %d steps (%.1f s)",
            lr,
            scores[-1],
            t.lr_pilot_steps,
            time.perf_counter() - start,
        )
    chosen = t.lr_candidates[best_index(scores)]
    log.info("step-size selection: training at lr=%g (train.lr=%g is not used)", chosen, t.lr)
    return {
        "candidates": list(t.lr_candidates),
        "pilot_steps": t.lr_pilot_steps,
        "pilot_bounds": scores,
        "chosen": chosen,
    }


class StepLosses(pl.Callback):
    """Each training step's loss, detached and kept on the device (no synchronisation a step)."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        self.losses.append(outputs["loss"])  # manual optimisation: {"loss": training_step's return, detached}


def pilot(module: pl.LightningModule, data: pl.LightningDataModule, cfg: Config, steps: int) -> float:
    """The mean training bound (nats per example) over `steps` optimiser steps of `module` (a
    train.VAEModule, left trained) from its present weights on `data` (a set-up datamodule.VAEData), from
    epoch 0, batch 0 (epochs follow one another until then): the mean over steps of each batch's mean bound.

    A throwaway Trainer: no validation, checkpoint, logger or progress bar, nothing written. On cfg's
    accelerator and precision, on one device with Lightning's default strategy for it (a strategy like ddp on
    one device is the same computation: a gradient average over one rank)."""
    record = StepLosses()
    t = cfg.trainer
    with warnings.catch_warnings(), _quiet_lightning():
        # torch's deprecation of an API that Lightning 2.6 calls, as in train.train
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        trainer = pl.Trainer(
            accelerator=t.accelerator,
            devices=1,
            num_nodes=1,
            precision=t.precision,
            deterministic=t.deterministic,
            max_steps=steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[record],
            use_distributed_sampler=False,  # as trainer.build_trainer's: every batch is the sampler's own
        )
        trainer.fit(module, datamodule=data)
    if len(record.losses) != steps:  # Lightning stops at max_steps; fewer would mean another stop
        raise RuntimeError(f"step-size pilot: {steps} steps asked, {len(record.losses)} ran")
    # On one device a step's loss is minus its batch's mean bound (VAEModule.shard_loss: -sum(bound) x world
    # / N, world = 1)
    return float(-torch.stack(record.losses).to(torch.float64).mean())  # mean of (steps,)


@contextlib.contextmanager
def forked_rng(*, cuda: bool) -> Iterator[None]:
    """Run the block on the global random states (Python's, numpy's, torch's CPU and, with `cuda`, every
    CUDA device's) and put them back afterwards, as they were before the block."""
    # numpy's legacy global state: the one Lightning's seed_everything seeds
    py, npy = random.getstate(), np.random.get_state()  # noqa: NPY002
    devices = list(range(torch.cuda.device_count())) if cuda and torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)  # noqa: NPY002


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Without Lightning's info lines at every Trainer start and stop ("GPU available: ...", "`Trainer.fit`
    stopped: `max_steps=100` reached."): the training's own Trainer prints them once."""
    logger = logging.getLogger(LIGHTNING_INFO)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
