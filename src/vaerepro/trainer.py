"""The Lightning Trainer the train stage runs, and its callbacks: best and last checkpoints, the per-epoch
curve for DVC, the test-set curve for plotting, the progress bar, SIGTERM, the same config on every DDP
rank; and the optimiser with its learning-rate schedule.

Lightning is the trainer (loops, devices/DDP, checkpointing, logging, progress bar); these callbacks add
what a reproduction needs on top of it and nothing else.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import logging
import logging.handlers
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from vaerepro import schedules, signals
from vaerepro.config import ADAM_BETAS, ADAM_EPS, Config, ConfigError, TrainerConfig
from vaerepro.cudagraph import CapturableAdagrad, CapturableAdam
from vaerepro.datamodule import resolve_val_batch_size
from vaerepro.files import write_whole
from vaerepro.likelihoods import space_name

log = logging.getLogger(__name__)
LIGHTNING_INFO = "lightning.pytorch.utilities.rank_zero"  # the logger of Lightning's info lines


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
    logging.getLogger(LIGHTNING_INFO).addFilter(_NoAdverts())


_one_log_stream()  # now: the handlers were added when lightning was imported, above


@contextlib.contextmanager
def lightning_lines_held() -> Iterator[None]:
    """Hold back Lightning's info lines ("GPU available: ...", which a Trainer logs when it is built) until
    the block ends, then print them; drop them when the block raises. The train stage builds its Trainer
    before the checks that need it (the world size a resume is checked against, rank 0's lock on the run
    directory), so that a refusal there is the one line the user reads, with no lines about devices before
    it. (logging.handlers.BufferingHandler holds the records; its capacity is never reached.)"""
    logger = logging.getLogger(LIGHTNING_INFO)
    held = logging.handlers.BufferingHandler(capacity=10_000)
    propagate = logger.propagate
    logger.addHandler(held)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(held)
        logger.propagate = propagate
    for record in held.buffer:  # reached only without an exception
        logger.handle(record)


VAL_KEY = "val/elbo"  # the validation ELBO's per-epoch metric (nats per example): checkpoints and curves


def train_key(objective: str) -> str:
    """The name of the training objective's per-epoch metric (nats per example)."""
    return "train/elbo" if objective == "elbo" else "train/iwae"


class _CsvRows(pl.Callback):
    """Rows of numbers kept in whole-state checkpoints (so that a resumed training writes the whole file,
    not only its own rows) and written to a CSV file by global rank 0."""

    fields: tuple[str, ...] = ()

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state["rows"])

    def write(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        text = io.StringIO(newline="")  # the csv module's line ends (\r\n), as it writes them to a file
        w = csv.DictWriter(text, fieldnames=list(self.fields))
        w.writeheader()
        w.writerows(self.rows)
        write_whole(self.path, text.getvalue())  # the earlier curve stays if the process dies meanwhile


class EpochHistory(_CsvRows):
    """One CSV row per epoch (epoch, train_elbo, val_elbo): plots/elbo.csv, and the same rows in
    plots/elbo_by_space/<space>.csv for `dvc plots`.

    Lightning's CSVLogger keys its rows by step and names columns by metric key; DVC plots want one row per
    epoch with plain column names. The file is written with last.ckpt (so the curve on disk is the one that
    checkpoint resumes), at the end of training and when training stops on an error. Every epoch's numbers
    are also logged to MLflow as the epoch ends and reach the store within tracking.flush_every_s.

    Why a second file named by the data space (likelihoods.space_name): dvc.yaml plots the folder, and DVC
    draws each file name in a plot of its own, so `dvc plots diff` of a binary run and a continuous one
    draws two plots, never a pmf's ELBO and a density's on one axis (DVC cannot split one file's plot by a
    value in it). The folder holds this training's file only: another space's, an earlier training's, is
    removed when this one is written.
    """

    fields = ("epoch", "train_elbo", "val_elbo")
    BY_SPACE = "elbo_by_space"  # the folder beside plots/elbo.csv

    def __init__(self, path: Path, train_key: str, space: str):
        super().__init__(path)
        self.train_key = train_key
        self.by_space = self.path.parent / self.BY_SPACE / f"{space}.csv"

    def write(self, trainer: pl.Trainer) -> None:
        super().write(trainer)
        if not trainer.is_global_zero:
            return
        self.by_space.parent.mkdir(parents=True, exist_ok=True)
        for other in self.by_space.parent.iterdir():
            if other != self.by_space and other.is_file():
                other.unlink()
        write_whole(self.by_space, self.path.read_bytes())

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

    def on_save_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict) -> None:
        self.write(trainer)  # Lightning calls this for whole-state checkpoints (last.ckpt), not weights-only

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.write(trainer)

    def on_exception(self, trainer: pl.Trainer, module: pl.LightningModule, exception: BaseException) -> None:
        # a training that failed before its first epoch ended has no curve: keep the file that is there
        if self.rows or not self.path.exists():
            self.write(trainer)


def grid_index(samples: int) -> int:
    """The largest integer k with 10^(k/10) <= samples (an int >= 1): the test curve's grid, 10 points a
    decade. In integers, with no float rounding to reason about at s = 10^3 and the like: 10^(k/10) <= s is
    10^k <= s^10, so k is the number of decimal digits of s^10 less one."""
    return len(str(samples**10)) - 1


def on_test_grid(epoch: int, n_train: int) -> bool:
    """Whether epoch `epoch` (from 0) ends at a new point of the grid: whether the training samples seen by
    its end, (epoch + 1) x n_train, reach a 10^(k/10) that those seen by the previous epoch's end did not
    (the first epoch always does)."""
    return epoch == 0 or grid_index((epoch + 1) * n_train) > grid_index(epoch * n_train)


class TestCurve(_CsvRows):
    """The test-set ELBO during training, for plotting only (AEVB's Figure 2 plots the bound on the test set
    against training samples evaluated): rows (epoch, samples_seen, test_elbo) at the end of each epoch on
    the grid (`on_test_grid`: 10 points a decade of samples seen, a few dozen over a long training) and, at
    the end of training, of the last epoch. Nothing reads the value but the reproduction card: no
    checkpoint choice, stopping rule or logged metric uses it, so the test set stays out of every decision
    about the model.

    The ELBO, nats per example averaged over the test split, is the validation's (`fixed_elbo` of the
    module, train.VAEModule) on a fixed sample of the test split: x (M, D), one draw of the data space, and
    eps (M, 1, Z), one draw of q's noise for each image, so that a value depends on the weights only, not
    on `batch_size`. It runs in eval mode (no dropout) under inference mode, draws from no global
    generator and puts every submodule's train/eval mode back: a training with the curve ends bit for bit
    where one without it does. Under DDP each rank computes the whole test split (redundant, but no
    collective to keep in step); global rank 0 writes the file.

    The file is written at every new row, so a stopped training keeps its rows, and at the start of
    training, so a resumed one starts from its checkpoint's rows; a row off the grid (a last epoch, kept in
    last.ckpt when that is written at the end of training) that a resumed training continues past is
    dropped, as an uninterrupted training has none there.
    """

    fields = ("epoch", "samples_seen", "test_elbo")

    def __init__(
        self, path: Path, x: torch.Tensor, eps: torch.Tensor, *, n_train: int, batch_size: int | str
    ):
        """x (M, D) and eps (M, 1, Z): the fixed test sample; n_train: training images (samples an epoch);
        batch_size: train.val_batch_size (a number, or "auto": datamodule.resolve_val_batch_size)."""
        super().__init__(path)
        self.x, self.eps, self.n_train, self.batch_size = x, eps, n_train, batch_size

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.write(trainer)  # the resumed checkpoint's rows, or only the header

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if on_test_grid(trainer.current_epoch, self.n_train):
            self._record(trainer, module, trainer.current_epoch)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # the last epoch, off the grid: here, with its weights, whatever ended training (max_epochs, a signal,
        # early stopping), which is known only once training has ended
        last = trainer.current_epoch - 1  # current_epoch counts the epochs done here
        if last >= 0 and (not self.rows or self.rows[-1]["epoch"] != last):
            self._record(trainer, module, last)

    def _record(self, trainer: pl.Trainer, module: pl.LightningModule, epoch: int) -> None:
        # a row off the grid is an earlier invocation's last epoch, which this training continues past
        self.rows = [r for r in self.rows if on_test_grid(int(r["epoch"]), self.n_train)]
        row = {
            "epoch": epoch,
            "samples_seen": (epoch + 1) * self.n_train,
            "test_elbo": self.elbo(trainer, module),
        }
        self.rows.append(row)
        self.write(trainer)

    def elbo(self, trainer: pl.Trainer, module: pl.LightningModule) -> float:
        """The mean ELBO over the fixed test sample, nats per example, for the module's current weights."""
        modes = [(m, m.training) for m in module.modules()]
        module.eval()  # as Lightning runs validation: dropout off
        precision = trainer.precision_plugin  # validation's autocast and input dtype, e.g. under 16-mixed
        try:
            with torch.inference_mode(), precision.val_step_context():
                total = torch.zeros((), dtype=torch.float64, device=module.device)
                size = resolve_val_batch_size(self.batch_size, module.vae, len(self.x), module.device)
                for x, eps in zip(*(t.split(size) for t in (self.x, self.eps)), strict=True):
                    x, eps = precision.convert_input((x.to(module.device), eps.to(module.device)))
                    total += module.fixed_elbo(x, eps.transpose(0, 1)).sum(dtype=torch.float64)  # (B,)
        finally:
            for m, training in modes:
                m.train(training)
        return float(total) / len(self.x)


class StopOnSignal(pl.Callback):
    """The first SIGTERM during training stops it at the end of the current epoch (`vaerepro.signals`), so
    that last.ckpt, written when training ends, resumes exactly; rank 0's signal decides for every rank.

    Lightning's own SIGTERM handler stops after the current batch and its loops then exit with status 0,
    which a scheduler reads as success; the handler is replaced once Lightning has installed it (fit start)
    and Lightning puts the previous one back when fit ends. A SIGTERM before on_train_start reaches both
    handlers: Lightning's stop (SIGTERMException) is then turned into Stopped by `train.train`."""

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        signals.take_over()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args) -> None:
        signals.check()  # a signal Python dropped in a finalizer (while MLflow made its store) counts now

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


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (best.ckpt), whose best score a resumed training keeps when the run
    directory has moved since last.ckpt was written (another node's mount, a copied project).

    ModelCheckpoint restores its best score only when its directory is the absolute path the checkpoint
    recorded; otherwise the first resumed epoch counts as the best whatever its score, overwrites best.ckpt,
    and train.json reports its score beside an older best_epoch. models/ moves with last.ckpt, and best.ckpt
    with them: the recorded paths are read as the same file names in this directory."""

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key ("ModelCheckpoint{'monitor': ...}"): every last.ckpt written before this class
        # keeps its best score
        return ModelCheckpoint.__qualname__ + super().state_key.removeprefix(type(self).__qualname__)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_dir = state_dict.get("dirpath")
        if self.dirpath is None or saved_dir is None or saved_dir == self.dirpath:
            return super().load_state_dict(state_dict)

        def here(path: str) -> str:  # the same file name in this directory ("" stays "": none)
            return os.path.join(self.dirpath, os.path.basename(path)) if path else path

        moved = {
            k: here(state_dict[k]) for k in ("best_model_path", "kth_best_model_path", "last_model_path")
        }
        models = {here(k): v for k, v in (state_dict.get("best_k_models") or {}).items()}
        log.info("resuming in %s: its best checkpoint was recorded in %s", self.dirpath, saved_dir)
        super().load_state_dict({**state_dict, **moved, "best_k_models": models, "dirpath": self.dirpath})


class ResumableEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping, resumed as the config says: with train.patience as configured now (a change
    the resume check allows; Lightning's own restores the checkpoint's patience over it), and stopping at once
    when the restored count of epochs without improvement has reached it, i.e. when the checkpoint is of a
    training that early stopping had ended. Lightning's own trains on from such a checkpoint (its stop is not
    saved), adding epochs an uninterrupted training never had and moving best.ckpt and train.json."""

    @property
    def state_key(self) -> str:
        # EarlyStopping's key: every last.ckpt written before this class keeps its count
        return EarlyStopping.__qualname__ + super().state_key.removeprefix(type(self).__qualname__)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # wait_count: epochs since the best one, restored from last.ckpt (0 for a new training)
        if self.wait_count >= self.patience:
            trainer.should_stop = True  # the fit loop then runs no epoch
            log.info(
                "early stopping: the resumed training had stopped improving %d epochs ago "
                "(train.patience=%d): no epoch to train",
                self.wait_count,
                self.patience,
            )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written whole or not at all (files.write_whole: the bytes go to .NAME.tmp in the
    checkpoint's directory, are flushed to disk, and are renamed over NAME), so a kill or a power cut during a
    save leaves the earlier best.ckpt / last.ckpt readable.

    Lightning's own save writes into a file of the system's temporary directory and moves it: when that
    directory is on another file system than models/ (a node-local /tmp, the project on a network file
    system), the move is a copy into NAME itself, and a kill during it leaves a torn file in place of the
    good one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)  # Lightning's TypeError
        write_whole(path, lambda fh: torch.save(checkpoint, fh))


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """Lightning's AsyncCheckpointIO around AtomicCheckpointIO: a checkpoint is taken at the epoch's end and
    written (torch.save, fsync, rename) by one background thread while the next epoch trains, in the order
    saved. The fit waits for every write before it returns, also when it stops on an error (Lightning's
    teardown); an error of a write is raised by the next save or at that teardown. A process killed in the
    milliseconds before a write ends leaves the earlier file whole.

    Why: on a GPU an epoch of AEVB's MNIST model takes about 0.2 s, and an fsynced write of its best.ckpt
    (3.3 MB) several milliseconds of it with the device idle (docs/performance.md). What this class adds to
    Lightning's: the tensors are copied to host memory here, on the training's thread, before Lightning's
    clones them and hands them to its thread. Lightning's thread would otherwise copy them from the device
    itself, possibly while the training's thread captures a CUDA graph (cudagraph.StepGraph, again at a
    learning-rate schedule's epoch start), and torch.cuda.graph's default capture_error_mode ("global")
    makes a capture fail on such a call from any thread. On a CPU, .cpu() returns the tensor itself and
    Lightning's clone is the snapshot."""

    def __init__(self):
        super().__init__(AtomicCheckpointIO())

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        on_host = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().cpu())
        super().save_checkpoint(on_host, path, storage_options=storage_options)


def check_launcher_world(world_size: int, t: TrainerConfig) -> None:
    """Refuse (ConfigError) a training that torchrun started in another number of processes than the trainer
    section trains on (`world_size`: the Trainer's devices x nodes; under DDP its world_size is torchrun's):
    with one device each rank trained alone as rank 0 of its own run, and with more Lightning raised a
    ValueError after the MLflow run and files were made. Lightning's own DDP processes match by design."""
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    if not TorchElasticEnvironment.detect() or (launched := int(os.environ["WORLD_SIZE"])) == world_size:
        return
    raise ConfigError(
        f"trainer.devices={t.devices} x trainer.num_nodes={t.num_nodes} trains on {world_size} process(es), "
        f"but torchrun started {launched} processes (WORLD_SIZE={launched}); set trainer.devices and "
        "trainer.num_nodes to torchrun's --nproc-per-node and --nnodes (docs/scaling.md)"
    )


@functools.cache
def fused_adagrad_runs(device: torch.device | str) -> bool:
    """Whether this torch has Adagrad's fused kernel for `device` (e.g. "cpu", cuda:0): torch 2.11's has it
    for the CPU only (on an H200 its first fused step on CUDA raised a RuntimeError); 2.13's Python no
    longer excludes CUDA. Asked by one fused step on a scratch tensor on that device, once per process and
    device: torch has no public query."""
    p = torch.zeros(1, device=device, requires_grad=True)
    p.grad = torch.ones_like(p)
    try:
        torch.optim.Adagrad([p], fused=True).step()
    except (RuntimeError, NotImplementedError):
        return False
    return True


class ForeachAdagrad(torch.optim.Adagrad):
    """torch's Adagrad on its foreach kernels: train.fused where this torch has no fused Adagrad kernel for
    the device (fused_adagrad_runs). The same update up to float rounding. A checkpoint written with fused
    kernels resumes on these too: torch copies a saved group's settings over the optimiser's, and would
    otherwise ask for the missing kernel at the first step."""

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=False, **kwargs)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.update(fused=False)


def build_optimizer(params: Iterable[torch.nn.Parameter], train: Mapping[str, Any], capturable: bool = False):
    """What `configure_optimizers` returns for the train section `train` (TrainConfig as a dict): the
    optimiser alone for a constant rate, else with its LambdaLR (rate of epoch e = train.lr x factor(e)).
    `capturable` (trainer.cuda_graph on one CUDA device): cudagraph.CapturableAdam or CapturableAdagrad,
    whose update a CUDA graph can capture (train.fused does not apply: Adam's is foreach, Adagrad's fused).

    The module steps the scheduler itself at every epoch end (manual optimisation: Lightning steps none), and
    Lightning keeps its state in last.ckpt, so a resumed training continues the schedule where it was. Keys
    an older module's train dict lacks take the values every training had before them."""
    # fused: the whole update of a parameter tensor in one kernel instead of ~10 element-wise ops (the
    # bench's "minimal fused" loop shows the gain); the update is the same up to float rounding. Lightning
    # builds the optimiser after moving the module to its device, where torch checks that the kernel exists.
    params = list(params)
    common = dict(lr=train["lr"], weight_decay=train["weight_decay"], fused=train.get("fused", True))
    if train["optimizer"] == "adam":
        betas = tuple(train.get("adam_betas", ADAM_BETAS))
        adam = dict(betas=betas, eps=train.get("adam_eps", ADAM_EPS))
        if capturable:
            opt = CapturableAdam(params, lr=train["lr"], weight_decay=train["weight_decay"], **adam)
        else:
            opt = torch.optim.Adam(params, **adam, **common)
    elif capturable:
        opt = CapturableAdagrad(params, lr=train["lr"], weight_decay=train["weight_decay"])
    elif common["fused"] and params and not fused_adagrad_runs(params[0].device):
        log.warning(
            "train.fused: torch %s has no fused Adagrad kernel for %s; Adagrad runs its foreach kernels "
            "(the same update up to float rounding)",
            torch.__version__,
            params[0].device.type,
        )
        opt = ForeachAdagrad(params, lr=train["lr"], weight_decay=train["weight_decay"])
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
        BestCheckpoint(
            dirpath=out_dir / "models",
            filename="best",
            monitor=VAL_KEY,
            mode="max",
            save_weights_only=True,
            enable_version_counter=False,
        ),
        LastCheckpoint(out_dir / "models" / "last.ckpt", cfg.train.checkpoint_every_s),
        EpochHistory(
            out_dir / "plots" / "elbo.csv",
            train_key(cfg.train.objective),
            space_name(cfg.data_space, cfg.improper),
        ),
        StopOnSignal(),
        *extra_callbacks,
    ]
    if cfg.train.early_stopping:
        callbacks.append(ResumableEarlyStopping(monitor=VAL_KEY, mode="max", patience=cfg.train.patience))
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
        # best.ckpt and last.ckpt written whole or not at all, in the background
        plugins=[BackgroundCheckpointIO()],
    )
