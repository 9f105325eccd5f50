"""Training: a thin LightningModule and DataModule over the core, and the `train` stage.

Lightning is the trainer (loops, devices/DDP, checkpointing, logging, progress bar); this file only says
what a batch is and what the objective is.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import logging
import math
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from vaerepro import checkpoints, estimators, signals, tracking
from vaerepro import config as config_mod
from vaerepro.config import Config
from vaerepro.data import Splits, fixed_space, load_prepared, to_space
from vaerepro.errors import Stopped
from vaerepro.model import VAE
from vaerepro.sweep import trial_callbacks

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

VAL_SEED_OFFSET = 1  # the validation draw (binarisation / dequantisation) uses seed + 1
# metrics/train_summary.json, the DVC metrics of training: the best validation ELBO (nats per example), how
# many epochs ran and the best one's index (from 0, as in plots/elbo.csv); train.json keeps the whole record.
SUMMARY_KEYS = ("best_val_elbo", "epochs", "best_epoch")


def train_key(objective: str) -> str:
    """The name of the training objective's per-epoch metric (nats per example)."""
    return "train/elbo" if objective == "elbo" else "train/iwae"


# --- data -----------------------------------------------------------------------------------------------


class EpochBatches:
    """Yields index tensors, one per global batch: a seeded shuffle per epoch (in order when not shuffling).

    Every rank gets the same global batches and keeps its own rows of each (`shard`), after drawing the
    batch's randomness for all of them (see `VAEModule.shard_loss`). Our own sampler because the batches
    are index tensors (see TensorBatches), and Lightning's DistributedSampler would give each rank its own
    examples without telling it the global batch they belong to.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        yield from order.split(self.batch_size)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


class TensorBatches:
    """The batches of an in-memory tensor in the order of `sampler` (index tensors, one per batch), each
    taken with one vectorised gather; Lightning iterates over it as over a DataLoader.

    Not a DataLoader over a TensorDataset: that collates B single items per batch (B Python calls). Nor a
    DataLoader over this gather: its own per-batch bookkeeping (fetcher, collate, a profiler range) does
    nothing these data need: they are tensors in memory already, with no workers to feed and nothing to
    pin. Lightning takes any iterable with a length; it finds ``sampler`` and ``batch_sampler`` under a
    DataLoader's names, and calls ``sampler.set_epoch`` at every epoch start.
    """

    batch_sampler = None  # as a DataLoader with batch_size=None: the sampler yields whole batches

    def __init__(self, sampler: EpochBatches, x: torch.Tensor, *more: torch.Tensor):
        """Batches of ``x`` or, with ``more`` tensors, tuples of the same rows (dim 0) of each."""
        self.sampler, self.tensors = sampler, (x, *more)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, ...]]:
        tensors = self.tensors
        for idx in self.sampler:
            # index_select, not x[idx]: advanced indexing takes the general gather path, 27 us for a
            # 100 x 784 uint8 batch on a CPU against 4 us
            batch = tuple(t.index_select(0, idx) for t in tensors)
            yield batch if len(batch) > 1 else batch[0]


def shard(t: torch.Tensor, rank: int, world: int, dim: int = 0) -> torch.Tensor:
    """Rank r's rows of a global batch along `dim`: r, r + world, r + 2 world, ... (sizes differ by <= 1)."""
    if world == 1:
        return t  # all of them (slicing would add an op to every training step)
    return t[(slice(None),) * dim + (slice(rank, None, world),)]


TRAIN_STREAM, VAL_STREAM = 0, 1
SEED_BLOCK = 32  # batch seeds computed together, see _seed_block


def batch_seed(seed: int, stream: int, epoch: int, index: int) -> int:
    """The seed of one global batch's randomness: a function of (run seed, stream, epoch, batch index) only,
    so it is the same on every rank, for any number of ranks, and after resuming from a checkpoint."""
    block, i = divmod(index, SEED_BLOCK)
    return _seed_block(seed, stream, epoch, block)[i]


@functools.lru_cache(maxsize=8)
def _seed_block(seed: int, stream: int, epoch: int, block: int) -> tuple[int, ...]:
    """`batch_seed` of batches block * SEED_BLOCK ... (block + 1) * SEED_BLOCK - 1, computed together.

    Why in blocks: numpy's SeedSequence is an order of magnitude slower when called between a training
    step's large tensor ops, which have evicted it from the CPU's caches, than in a loop of its own. The
    same numbers, one cold start per SEED_BLOCK batches.
    """
    start = block * SEED_BLOCK
    return tuple(
        int(np.random.SeedSequence([seed % 2**64, stream, epoch, i]).generate_state(1, dtype=np.uint64)[0])
        for i in range(start, start + SEED_BLOCK)
    )


class VAEData(pl.LightningDataModule):
    """The prepared splits in memory: training batches of raw pixels (the data space is drawn per batch by
    `VAEModule.shard_loss`), and the fixed validation sample: one draw of the data space for each
    validation image and one draw of q's noise for it (`latent_dim`), the same every epoch, so that
    validation ELBOs differ between epochs only by the weights, and not with the validation batch size or
    the number of devices. Batch sizes are per device."""

    def __init__(
        self,
        prepared_dir: Path,
        data_space: str,
        batch_size: int,
        seed: int,
        *,
        latent_dim: int,
        val_batch_size: int | None = None,
    ):
        super().__init__()
        self.prepared_dir, self.data_space = Path(prepared_dir), data_space
        self.batch_size, self.seed = batch_size, seed
        self.latent_dim, self.val_batch_size = latent_dim, val_batch_size or batch_size
        self.splits: Splits | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        self.splits = load_prepared(self.prepared_dir)
        self.quantized = bool(self.splits.quantized)
        # Raw values stay raw in memory (uint8 for 8-bit data): the data space is applied per batch, so
        # every epoch sees a fresh binarisation / dequantisation.
        self.x_train = torch.from_numpy(np.ascontiguousarray(self.splits.train))
        self.x_val = fixed_space(
            self.splits.val, self.data_space, quantized=self.quantized, seed=self.seed + VAL_SEED_OFFSET
        )
        g = torch.Generator().manual_seed(batch_seed(self.seed, VAL_STREAM, 0, 0))
        self.eps_val = torch.randn((len(self.x_val), 1, self.latent_dim), generator=g)  # (M, K=1, Z)

    def _world(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # A batch (a tensor, or a tuple of tensors) on the device already, as on a CPU, is returned as it is,
        # without Lightning's generic walk of the batch.
        if all(t.device == device for t in (batch if isinstance(batch, tuple) else (batch,))):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> TensorBatches:
        n, size = len(self.x_train), self.batch_size * self._world()  # global batches
        return TensorBatches(EpochBatches(n, size, shuffle=True, seed=self.seed), self.x_train)

    def val_dataloader(self) -> TensorBatches:
        # global batches of (x (N, D), eps (N, 1, Z))
        n, size = len(self.x_val), self.val_batch_size * self._world()
        return TensorBatches(EpochBatches(n, size, shuffle=False, seed=0), self.x_val, self.eps_val)


# --- model ----------------------------------------------------------------------------------------------


class VAEModule(pl.LightningModule):
    """Objective and optimiser around a core `VAE`; the checkpoint carries `VAE`'s constructor args.

    Multi-device training gives the same result as one device with the same global batch, up to float
    rounding: every rank sees the whole global batch, draws its randomness (binarisation / dequantisation,
    and q's noise) for all of it from one generator seeded by (seed, epoch, batch index), and keeps its own
    rows; DDP's gradient average then equals the gradient of the global batch's mean.
    """

    def __init__(
        self,
        vae_config: dict[str, Any],
        train: dict[str, Any],
        data_space: str,
        quantized: bool,
        seed: int = 0,
        data_digest: str | None = None,
    ):
        super().__init__()
        # logger=False: the resolved config reaches MLflow once, through tracking.log_config, which also
        # copes with a resumed run whose config changed (MLflow params cannot change value)
        self.save_hyperparameters(logger=False)
        # One optimiser step per batch, written out in training_step (Lightning's manual optimisation):
        # automatic optimisation does the same through a closure and eight more hooks around it, for features
        # this objective does not use (gradient accumulation and clipping, closures for LBFGS).
        self.automatic_optimization = False
        self.vae = VAE(**vae_config)
        self.train_cfg = train
        self.data_space, self.quantized, self.seed = data_space, quantized, seed
        self.data_digest = data_digest  # sha256 of the training array (checkpoints.DATA_DIGEST_LABEL)

    def bound(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """The training objective per example (B,), in nats: an ELBO (estimator A or B) or an IWAE bound."""
        t = self.train_cfg
        if t["objective"] == "iwae":
            return estimators.iwae_bound(self.vae, x, t["num_samples"], eps)
        return estimators.elbo(self.vae, x, t["num_samples"], t["estimator"], eps)

    def _generator(self, stream: int, epoch: int, index: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(batch_seed(self.seed, stream, epoch, index))

    def _noise(self, g: torch.Generator, num_samples: int, n: int) -> torch.Tensor:
        """q's standard-normal noise for a whole global batch of n: (K, n, Z)."""
        return torch.randn((num_samples, n, self.vae.latent_dim), generator=g, device=self.device)

    def _rank_world(self) -> tuple[int, int]:
        return self.global_rank, self.trainer.world_size

    def _global_means(self, *sums_counts: tuple[torch.Tensor, int]) -> list[float]:
        """For each (per-rank sum, per-rank count): the sum over ranks of the sums / the sum of the counts,
        the exact mean over every example of the epoch; one all-reduce for all of them."""
        sums = torch.stack([total for total, _ in sums_counts])
        counts = torch.tensor([float(n) for _, n in sums_counts], dtype=sums.dtype, device=sums.device)
        both = self.trainer.strategy.reduce(torch.cat([sums, counts]), reduce_op="sum")
        return (both[: len(sums)] / both[len(sums) :]).tolist()

    def on_train_epoch_start(self) -> None:
        self._bound_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._bound_count = 0  # examples this rank saw (a host int: no tensor op a step)

    def shard_loss(
        self, batch: torch.Tensor, epoch: int, batch_idx: int, rank: int, world: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank `rank`'s loss and per-example bound (B,) for a whole global batch of stored pixels (N, D).

        The batch's randomness is drawn for all N rows from one generator seeded by (seed, epoch, batch
        index); this rank keeps its rows of it (`shard`). The loss is this rank's share of the global mean:
        DDP averages gradients over ranks, and (1/world) sum_r [-sum(bound_r) world / N] = -mean over all N,
        whatever the shards' sizes.
        """
        n = len(batch)
        g = self._generator(TRAIN_STREAM, epoch, batch_idx)
        x = to_space(batch, self.data_space, quantized=self.quantized, generator=g)  # (N, D)
        eps = self._noise(g, self.train_cfg["num_samples"], n)  # (K, N, Z)
        bound = self.bound(shard(x, rank, world), shard(eps, rank, world, dim=1))  # (B,)
        return bound.sum() * (-world / n), bound

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # batch: the whole global batch (N, D), the same on every rank
        loss, bound = self.shard_loss(batch, self.current_epoch, batch_idx, *self._rank_world())
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)  # under DDP, also the gradients' all-reduce
        opt.step()
        # A running sum instead of self.log(on_epoch=True) per step: Lightning's per-step logging keeps a
        # result collection per call, a large share of a small model's step.
        self._bound_sum += bound.detach().sum(dtype=torch.float64)
        self._bound_count += len(bound)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_count = 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # a global batch of the fixed validation sample (see VAEData): x (N, D) and q's noise eps (N, 1, Z)
        x, eps = batch
        rank, world = self._rank_world()
        x, eps = shard(x, rank, world), shard(eps, rank, world).transpose(0, 1)  # (B, D), (1, B, Z)
        elbo = estimators.elbo(self.vae, x, 1, "B", eps)  # (B,)
        self._val_sum += elbo.sum(dtype=torch.float64)
        self._val_count += len(elbo)

    def on_validation_epoch_end(self) -> None:
        # Validation runs every epoch after the last training batch, so the epoch's training mean is complete
        # here, and callbacks (EpochHistory, checkpointing) see both numbers at the end of the epoch.
        # Each value is already the mean over all ranks' examples, the same on every rank: sync_dist with
        # max returns it unchanged (a mean of identical values could round) and spares Lightning's warning
        # about unsynchronised epoch-level metrics.
        log = dict(on_epoch=True, sync_dist=True, reduce_fx="max")
        if self.trainer.sanity_checking:
            (val_mean,) = self._global_means((self._val_sum, self._val_count))
            self.log("val/elbo", val_mean, prog_bar=True, **log)
            return
        val_mean, train_mean = self._global_means(
            (self._val_sum, self._val_count), (self._bound_sum, self._bound_count)
        )
        self.log("val/elbo", val_mean, prog_bar=True, **log)
        name = train_key(self.train_cfg["objective"])
        if not math.isfinite(train_mean):
            # Checked once an epoch, on the sum the epoch keeps anyway: a check per step would make every
            # step wait for its loss (a device synchronisation on a GPU). Raised before the
            # checkpoint callbacks run, so best.ckpt keeps the last finite weights.
            raise FloatingPointError(
                f"non-finite training objective ({name} = {train_mean}) in epoch {self.current_epoch}; "
                "lower train.lr, or for a learned-variance Gaussian raise likelihood.min_sigma"
            )
        self.log(name, train_mean, **log)

    def configure_optimizers(self):
        t = self.train_cfg
        opt = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad}[t["optimizer"]]
        # fused: the whole update of a parameter tensor in one kernel instead of ~10 element-wise ops (the
        # bench's "minimal fused" loop shows the gain); the update is the same up to float rounding. Lightning
        # builds the optimiser
        # after moving the module to its device, where torch checks that the kernel exists.
        return opt(self.parameters(), lr=t["lr"], weight_decay=t["weight_decay"], fused=t.get("fused", True))


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
        if trainer.sanity_checking or "val/elbo" not in m:
            return
        self.rows.append(
            {
                "epoch": trainer.current_epoch,
                "train_elbo": float(m[self.train_key]),
                "val_elbo": float(m["val/elbo"]),
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


# --- the stage ------------------------------------------------------------------------------------------


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
            monitor="val/elbo",
            mode="max",
            save_weights_only=True,
            enable_version_counter=False,
        ),
        LastCheckpoint(out_dir / "models" / "last.ckpt", cfg.train.checkpoint_every_s),
        EpochHistory(out_dir / "plots" / "elbo.csv", train_key(cfg.train.objective)),
        StopOnSignal(),
        *extra_callbacks,
        *trial_callbacks(),  # Optuna pruning, when this process is a sweep trial (vaerepro.sweep)
    ]
    if cfg.train.early_stopping:
        callbacks.append(EarlyStopping(monitor="val/elbo", mode="max", patience=cfg.train.patience))
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


@contextlib.contextmanager
def _no_distribution_validation():
    """torch.distributions re-checks every batch's arguments and support (x in {0,1}, scale > 0); the
    config's data-space check and `prepare`'s validation already guarantee both, and the re-checks cost
    a noticeable share of a small model's training step. Restored afterwards."""
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)


def build_module(cfg: Config, data: VAEData) -> VAEModule:
    """The LightningModule for cfg on set-up data (its pixel count, whether it is 8-bit, its digest)."""
    hp = checkpoints.expected_hparams(
        cfg, data.splits.data_dim, data.quantized, checkpoints.data_digest(data.splits.meta)
    )
    return VAEModule(**hp)


def check_resumable(path: Path, module: VAEModule, max_epochs: int) -> dict[str, Any]:
    """The checkpoint to resume from, read and compared with the module the config builds; a
    CheckpointError (nothing touched yet) when it is unreadable or trained something else."""
    ckpt = checkpoints.read(path)
    if "loops" not in ckpt or "optimizer_states" not in ckpt:
        raise checkpoints.CheckpointError(f"{path}: holds weights only, not a training state to resume")
    differ = checkpoints.mismatches(ckpt["hyper_parameters"], dict(module.hparams))
    if differ:
        raise checkpoints.CheckpointError(
            f"{path}: train.resume=true, but the config differs from the training it would continue: "
            + "; ".join(differ)
            + ". Nothing was changed; restore those keys, or train from the start (train.resume=false, "
            "after moving models/ aside)"
        )
    done = len(_saved_curve(ckpt))
    if done > max_epochs:
        raise checkpoints.CheckpointError(
            f"{path}: holds {done} trained epochs, more than train.max_epochs={max_epochs}; nothing was "
            f"changed; set train.max_epochs={done} or more to continue it"
        )
    return ckpt


def config_digest(cfg: Config) -> str:
    """The first 12 hex digits of the sha256 of the resolved config as params.yaml holds it."""
    return hashlib.sha256(config_mod.dump(cfg.to_dict()).encode()).hexdigest()[:12]


class BufferedMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger, except that metrics reach the store in one batch every `flush_every_s`
    seconds (0: at every call), when training ends and when it fails, each with the time and step at which it
    was logged.

    Why: every batch MLflow writes is one SQL transaction of a few milliseconds of Python (SQLAlchemy), and
    Lightning logs twice an epoch (validation end, training epoch end); `synchronous=False` moves that work
    to MLflow's writer thread, which then competes with training for the GIL. Buffered, a training's curve
    shows in the MLflow UI at most `flush_every_s` late, which is how TensorBoard's writer (flush_secs) and
    Lightning's CSVLogger (flush_logs_every_n_steps) treat their files too.
    """

    def __init__(
        self, *args: Any, flush_every_s: float, space: str, synchronous: bool = False, **kwargs: Any
    ):
        super().__init__(*args, synchronous=synchronous, **kwargs)
        self.synchronous = synchronous  # MlflowClient.log_batch's: False sends from MLflow's writer thread
        self.flush_every_s = float(flush_every_s)
        self.space = space  # metric names carry the run's data space (tracking.metric_name)
        self._pending: list = []  # mlflow.entities.Metric, in the order they were logged
        self._last_flush = time.monotonic()

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        # Per-epoch curves against the epoch, not the optimiser step Lightning passes: Lightning adds the
        # epoch to every metrics dict it logs, and epochs are how a VAE's curves are read and compared
        # (the step depends on the batch size and the number of devices).
        if "epoch" in metrics:
            step = int(metrics["epoch"])
        for key, value in metrics.items():
            # the names MLflow accepts, as MLFlowLogger.log_metrics cleans them (no prefix is set here)
            name = tracking.metric_name(re.sub(r"[^a-zA-Z0-9_/. -]+", "", key), self.space)
            if name is not None:
                self._pending.append(
                    Metric(key=name, value=float(value), timestamp=timestamp_ms, step=step or 0)
                )
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        """Send the buffered metrics to the store (one batch; MLflow splits it at its per-batch limit)."""
        self._last_flush = time.monotonic()
        if self._pending:
            pending, self._pending = self._pending, []
            self.experiment.log_batch(run_id=self.run_id, metrics=pending, synchronous=self.synchronous)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:  # Lightning calls it at the end and on an error
        # Only the metrics: whether the run ended, and how, is `train`'s and the pipeline's to say (a run is
        # FINISHED when every stage has finished, KILLED when a signal stopped it, FAILED otherwise).
        self.flush()


def _mlflow_logger(cfg: Config, root: Path, model_dir: Path, resume: bool):
    """Lightning's MLflow logger for this training, on global rank 0 only (the caller's duty); resuming, it
    continues the run recorded in model_dir when that run is in the same store. Returns (logger, uri)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, _ = tracking.ensure_experiment(cfg, root)
    run_id = None
    if resume:
        previous, previous_uri = tracking.read_run_id(model_dir)
        if previous and previous_uri == uri:
            try:
                MlflowClient(uri).get_run(previous)
                run_id = previous
            except MlflowException:
                log.warning("MLflow run %s is not in %s: resuming into a new run", previous, uri)
    logger = BufferedMLFlowLogger(
        flush_every_s=cfg.tracking.flush_every_s,
        space=tracking.space_name(cfg.data_space, cfg.improper),
        experiment_name=cfg.tracking.experiment,
        run_name=cfg.run_name,
        tracking_uri=uri,
        tags=None if run_id else tracking.run_tags(cfg, root),
        log_model=False,
        run_id=run_id,
    )
    if run_id:
        logger.experiment.update_run(run_id, status="RUNNING")
    return logger, uri


def train(
    cfg: Config,
    out_dir: Path,
    *,
    root: Path | None = None,
    enable_progress_bar: bool = True,
    callbacks=(),
    finish_run: bool = True,
) -> dict:
    """The `train` stage: fit on out_dir/prepared, write models/{best,last}.ckpt, metrics/train.json (and its
    headline numbers, train_summary.json) and plots/elbo.csv; log the run to MLflow when tracking is enabled.
    Returns the train metrics.

    Under DDP every process runs this; only global rank 0 writes files and talks to MLflow (one run per
    training). With train.resume and an existing models/last.ckpt, training continues from it (its epoch,
    optimiser state, best score and curve) and in the MLflow run recorded in models/mlflow_run.json; a
    checkpoint that cannot be resumed (unreadable, or trained with another config) is refused before any
    file or run is touched.

    The MLflow run ends FINISHED when training finished and `finish_run` (the pipeline passes False and ends
    it after its last stage), KILLED when a signal stopped it (`Stopped` is raised after the epoch that was
    running, with last.ckpt written), FAILED with the reason as a tag on any other error.
    """
    out_dir = Path(out_dir)
    model_dir = out_dir / "models"
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)
    data = VAEData(
        out_dir / "prepared",
        cfg.data_space,
        cfg.train.batch_size,
        cfg.seed,
        latent_dim=cfg.model.latent_dim,
        val_batch_size=cfg.train.val_batch_size,
    )
    data.setup()
    module = build_module(cfg, data)
    last = model_dir / "last.ckpt"
    ckpt_path = last if cfg.train.resume and last.is_file() else None
    resumed = check_resumable(last, module, cfg.train.max_epochs) if ckpt_path is not None else None
    if ckpt_path is not None:
        log.info("resuming from %s after %d epochs", ckpt_path, len(_saved_curve(resumed)))
    elif cfg.train.resume:
        log.info("train.resume: no %s yet, training from the start", last)
    # The trainer first, without a logger: it knows this process's global rank (from the launcher's
    # environment) before any process group exists, and only rank 0 may create the MLflow run.
    same = SameConfigOnEveryRank(config_digest(cfg))
    trainer = build_trainer(cfg, out_dir, None, [*callbacks, same], enable_progress_bar=enable_progress_bar)

    run = None  # (client, run_id) of this training's MLflow run, on global rank 0
    logger, uri, run_id = None, None, None
    if trainer.is_global_zero:
        model_dir.mkdir(parents=True, exist_ok=True)
        if cfg.tracking.enabled:
            logger, uri = _mlflow_logger(cfg, root or out_dir, model_dir, resume=ckpt_path is not None)
            run_id = logger.run_id
            run = (logger.experiment, run_id)
    try:
        if logger is not None:
            trainer.loggers = [logger]
            tracking.write_run_id(model_dir, run_id, uri)  # now, so that a crashed run can be resumed into
            tracking.log_config(logger.experiment, run_id, cfg)
            if resumed is not None:  # epochs the checkpoint holds that never reached the store (a kill -9)
                keys = (train_key(cfg.train.objective), "val/elbo")
                tracking.complete_curve(*run, _saved_curve(resumed), keys, logger.space)
            else:
                tracking.log_dataset(*run, data.splits.meta, cfg)
        if trainer.is_global_zero:
            # The last training's numbers describe checkpoints this training replaces or extends: a training
            # that stops or fails from here on leaves no train.json rather than one that is no longer true.
            for name in ("train.json", "train_summary.json"):
                (out_dir / "metrics" / name).unlink(missing_ok=True)
        start = time.perf_counter()
        with warnings.catch_warnings(), _no_distribution_validation(), signals.deferred():
            # models/ already holds this run's own mlflow_run.json (and last.ckpt when resuming)
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            # torch's deprecation of an API that Lightning 2.6 calls: not the user's to act on
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        elapsed = time.perf_counter() - start
        if (signum := signals.requested()) is not None:
            done = f"{trainer.current_epoch} of {cfg.train.max_epochs} epochs"
            raise Stopped(signum, f"training stopped after {done}, which {last} holds")

        history = next(c for c in trainer.callbacks if isinstance(c, EpochHistory)).rows
        ckpt = trainer.checkpoint_callback
        best = max(history, key=lambda r: r["val_elbo"]) if history else None
        metrics = {
            "train_elbo": history[-1]["train_elbo"] if history else math.nan,
            "val_elbo": history[-1]["val_elbo"] if history else math.nan,
            "best_val_elbo": float(ckpt.best_model_score) if ckpt.best_model_score is not None else math.nan,
            "epochs": trainer.current_epoch,
            "best_epoch": best["epoch"] if best else -1,
            "train_time_s": elapsed,  # this invocation's: a resumed run counts only its own epochs
        }
        if trainer.is_global_zero:
            # also without tracking: later stages must not add to a run an earlier training left here
            tracking.write_run_id(model_dir, run_id, uri)
            (out_dir / "metrics").mkdir(parents=True, exist_ok=True)
            (out_dir / "metrics" / "train.json").write_text(json.dumps(metrics, indent=2) + "\n")
            summary = {k: metrics[k] for k in SUMMARY_KEYS}
            (out_dir / "metrics" / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if run is not None:
                tracking.log_metrics(*run, metrics, prefix="final/", space=logger.space)
                tracking.describe(*run, cfg, train=metrics)
                logger.experiment.log_artifact(run_id, str(model_dir / "best.ckpt"), "checkpoints")
                if finish_run:
                    tracking.end_run(*run, "FINISHED")
    except BaseException as exc:
        if run is not None:
            tracking.end_run(*run, tracking.status_of(exc, interrupted=trainer.interrupted), reason=exc)
        raise
    return metrics


def _saved_curve(checkpoint: dict[str, Any]) -> list[dict[str, float]]:
    """EpochHistory's rows in a whole-state checkpoint (epoch, train_elbo, val_elbo), under its state key
    (Lightning's default: the class name)."""
    return list(((checkpoint.get("callbacks") or {}).get(EpochHistory.__qualname__) or {}).get("rows", []))
