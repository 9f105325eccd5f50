"""The Lightning Trainer the train stage runs, and its callbacks: best and last checkpoints, the per-epoch
curve for DVC, the progress bar, SIGTERM, the same config on every DDP rank; and the optimiser with its
learning-rate schedule.

Lightning is the trainer (loops, devices/DDP, checkpointing, logging, progress bar); these callbacks add
what a reproduction needs on top of it and nothing else.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from vaerepro import schedules, signals
from vaerepro.config import ADAM_BETAS, ADAM_EPS, Config

log = logging.getLogger(__name__)


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


def _one_log_stream() -> None:
    """Print each of Lightning's log lines once, through the root logger's handlers (Hydra's or the
    command's): importing `lightning` gives its logger a console handler of its own while its records also
    reach the root logger, so every line came out twice. Its advertisement (the litlogger tip, logged at
    every Trainer start) is dropped."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())


_one_log_stream()  # now: the handlers were added when lightning was imported, above


VAL_KEY = "val/elbo"  # the validation ELBO's per-epoch metric (nats per example): checkpoints and curves


def train_key(objective: str) -> str:
    """The name of the training objective's per-epoch metric (nats per example)."""
    return "train/elbo" if objective == "elbo" else "train/iwae"


class EpochHistory(pl.Callback):
    """One CSV row per epoch (epoch, train_elbo, val_elbo) for `dvc plots`.

    Lightning's CSVLogger writes train and validation metrics on separate rows keyed by step; DVC plots
    want one row per epoch with both series. The file is written with last.ckpt (so the curve on disk is
    the one that checkpoint resumes), at the end of training and when training stops on an error. Every
    epoch's numbers also reach MLflow as the epoch ends.
    """

    def __init__(self, path: Path, train_key: str):
        self.path, self.train_key = Path(path), train_key
        self.rows: list[dict[str, float]] = []

    # kept in the checkpoint, so a resumed run writes the whole curve, not only its own epochs
    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state["rows"])

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        m = trainer.callback_metrics
        if trainer.sanity_checking or VAL_KEY not in m:
            return
        self.rows.append(
            {
                "epoch": trainer.current_epoch,
                "train_elbo": float(m[self.train_key]),
                "val_elbo": float(m[VAL_KEY]),
            }
        )

    def write(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["epoch", "train_elbo", "val_elbo"])
            w.writeheader()
            w.writerows(self.rows)

    def on_save_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict) -> None:
        self.write(trainer)  # Lightning calls this for whole-state checkpoints (last.ckpt), not weights-only

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.write(trainer)

    def on_exception(self, trainer: pl.Trainer, module: pl.LightningModule, exception: BaseException) -> None:
        # a training that failed before its first epoch ended has no curve: keep the file that is there
        if self.rows or not self.path.exists():
            self.write(trainer)


class StopOnSignal(pl.Callback):
    """The first SIGTERM during training stops it at the end of the current epoch (`vaerepro.signals`), so
    that last.ckpt, written when training ends, resumes exactly; rank 0's signal decides for every rank.

    Lightning's own SIGTERM handler stops after the current batch and its loops then exit with status 0,
    which a scheduler reads as success; the handler is replaced once Lightning has installed it (fit start)
    and Lightning puts the previous one back when fit ends."""

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        signals.take_over()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.strategy.broadcast(signals.requested() is not None, src=0):
            trainer.should_stop = True


class SameConfigOnEveryRank(pl.Callback):
    """Under DDP, stop a rank whose resolved config differs from rank 0's (a re-launch that lost an override
    would otherwise train something else, or fail later with a less clear message)."""

    def __init__(self, digest: str):
        self.digest = digest

    def setup(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size == 1:
            return
        theirs = trainer.strategy.broadcast(self.digest, src=0)
        if theirs != self.digest:
            raise RuntimeError(
                f"rank {trainer.global_rank} resolved configuration {self.digest}, rank 0 {theirs}: "
                "every DDP process must be started with the same configuration"
            )
        if trainer.is_global_zero:
            log.info("all %d ranks train configuration %s", trainer.world_size, self.digest)


class EpochBar(TQDMProgressBar):
    """Lightning's tqdm bar, one line kept per epoch (its validation ELBO in the postfix), redrawn every
    `refresh_rate` batches, and no separate bar for the validation pass, which for these models takes
    milliseconds to a second."""

    def __init__(self, refresh_rate: int = 20):
        super().__init__(refresh_rate=refresh_rate, leave=True)

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)


class LastCheckpoint(Checkpoint):
    """models/last.ckpt, the whole training state for `train.resume`: written at the end of the first epoch
    that ends `every_s` seconds or more after the previous save (every epoch for 0), and at the end of
    training, so a stopped or crashed training loses at most `every_s` seconds of work. (best.ckpt, the
    weights alone, is written by Lightning's ModelCheckpoint whenever the validation ELBO improves.)

    Our own because Lightning's ModelCheckpoint offers epoch counts or a time interval checked after every
    batch: a mid-epoch checkpoint cannot resume this harness's per-epoch seeded batches exactly.
    A `Checkpoint` subclass, so Lightning runs it after the best-checkpoint callback and the saved state
    includes that epoch's best score.
    """

    def __init__(self, path: Path, every_s: float):
        self.path, self.every_s = Path(path), float(every_s)
        self._last_save = time.monotonic()
        self._saved_step = -1

    def _save(self, trainer: pl.Trainer) -> None:
        # the whole training state, to resume from; every rank calls it, the strategy writes on global rank 0
        trainer.save_checkpoint(self.path, weights_only=False)
        self._last_save, self._saved_step = time.monotonic(), trainer.global_step

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._last_save = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        due = time.monotonic() - self._last_save >= self.every_s
        if trainer.strategy.broadcast(due, src=0):  # rank 0's clock decides: every rank must save, or none
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self._saved_step != trainer.global_step:
            self._save(trainer)


def build_optimizer(params: Iterable[torch.nn.Parameter], train: Mapping[str, Any]):
    """What `configure_optimizers` returns for the train section `train` (TrainConfig as a dict): the
    optimiser alone for a constant rate, else with its LambdaLR (rate of epoch e = train.lr x factor(e)).

    The module steps the scheduler itself at every epoch end (manual optimisation: Lightning steps none), and
    Lightning keeps its state in last.ckpt, so a resumed training continues the schedule where it was. Keys
    an older module's train dict lacks take the values every training had before them."""
    # fused: the whole update of a parameter tensor in one kernel instead of ~10 element-wise ops (the
    # bench's "minimal fused" loop shows the gain); the update is the same up to float rounding. Lightning
    # builds the optimiser after moving the module to its device, where torch checks that the kernel exists.
    common = dict(lr=train["lr"], weight_decay=train["weight_decay"], fused=train.get("fused", True))
    if train["optimizer"] == "adam":
        betas = tuple(train.get("adam_betas", ADAM_BETAS))
        opt = torch.optim.Adam(params, betas=betas, eps=train.get("adam_eps", ADAM_EPS), **common)
    else:
        opt = torch.optim.Adagrad(params, **common)
    factor = schedules.lr_factor(train.get("lr_schedule", "constant"))
    if factor is None:
        return opt  # no scheduler: the checkpoint holds no scheduler state, as before the key existed
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)  # sets the rate of epoch 0 now
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def build_trainer(cfg: Config, out_dir: Path, logger, extra_callbacks=(), enable_progress_bar: bool = True):
    callbacks = [
        # Lightning's tqdm bar, one line an epoch (the default redraws every batch)
        *([EpochBar()] if enable_progress_bar else []),
        # best.ckpt: the weights evaluation uses (and the model's constructor args), without the optimiser
        # state, a third of the bytes to write, store in DVC and upload to MLflow; first in the list, so it is
        # trainer.checkpoint_callback. last.ckpt: the whole training state, for resuming.
        ModelCheckpoint(
            dirpath=out_dir / "models",
            filename="best",
            monitor=VAL_KEY,
            mode="max",
            save_weights_only=True,
            enable_version_counter=False,
        ),
        LastCheckpoint(out_dir / "models" / "last.ckpt", cfg.train.checkpoint_every_s),
        EpochHistory(out_dir / "plots" / "elbo.csv", train_key(cfg.train.objective)),
        StopOnSignal(),
        *extra_callbacks,
    ]
    if cfg.train.early_stopping:
        callbacks.append(EarlyStopping(monitor=VAL_KEY, mode="max", patience=cfg.train.patience))
    t = cfg.trainer
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        deterministic=t.deterministic,
        max_epochs=cfg.train.max_epochs,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        use_distributed_sampler=False,  # every rank gets the global batches and takes its rows itself
        enable_progress_bar=enable_progress_bar,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        default_root_dir=out_dir,
    )
