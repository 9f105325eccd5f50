"""Training: a thin LightningModule and DataModule over the core, and the `train` stage.

Lightning is the trainer (loops, devices/DDP, checkpointing, logging, progress bar); this file only says
what a batch is and what the objective is.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vaerepro import estimators
from vaerepro.config import Config
from vaerepro.data import Splits, fixed_space, load_prepared, to_space
from vaerepro.model import VAE

log = logging.getLogger(__name__)

VAL_SEED_OFFSET = 1  # the validation draw (binarisation / dequantisation) uses seed + 1


# --- data -----------------------------------------------------------------------------------------------


class TensorBatches(Dataset):
    """An in-memory tensor indexed by a whole batch of indices at once.

    A DataLoader over a TensorDataset collates B single items per batch (B Python calls); indexing with
    the batch's index tensor is one vectorised gather.
    """

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.x[idx]


class EpochBatches(Sampler):
    """Yields index tensors, one per batch: a seeded shuffle per epoch, this rank's shard of it.

    Our own because the batches are index tensors (see TensorBatches) and Lightning's automatic
    DistributedSampler replacement works on per-item samplers; sharding here keeps every rank on a disjoint
    slice of the same permutation, equal in size on every rank (the last incomplete global batch is dropped
    when training, as DistributedSampler(drop_last=True) would).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = False,
    ):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def _global_batches(self) -> list[torch.Tensor]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        step = self.batch_size * self.world
        stop = (self.n // step) * step if self.drop_last else self.n
        return [order[i : i + step] for i in range(0, stop, step)]

    def __iter__(self):
        for chunk in self._global_batches():
            # rank r takes every world-th element: shards of one global batch differ in size by at most one
            part = chunk[self.rank :: self.world]
            if len(part):
                yield part

    def __len__(self) -> int:
        return len(self._global_batches())


class VAEData(pl.LightningDataModule):
    def __init__(self, prepared_dir: Path, data_space: str, batch_size: int, seed: int):
        super().__init__()
        self.prepared_dir, self.data_space = Path(prepared_dir), data_space
        self.batch_size, self.seed = batch_size, seed
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

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        sampler = EpochBatches(
            len(self.x_train),
            self.batch_size,
            shuffle=True,
            seed=self.seed,
            rank=rank,
            world=world,
            drop_last=world > 1,
        )
        return DataLoader(TensorBatches(self.x_train), sampler=sampler, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        sampler = EpochBatches(
            len(self.x_val), self.batch_size, shuffle=False, seed=0, rank=rank, world=world
        )
        return DataLoader(TensorBatches(self.x_val), sampler=sampler, batch_size=None)


# --- model ----------------------------------------------------------------------------------------------


class VAEModule(pl.LightningModule):
    """Objective and optimiser around a core `VAE`; the checkpoint carries `VAE`'s constructor args."""

    def __init__(self, vae_config: dict[str, Any], train: dict[str, Any], data_space: str, quantized: bool):
        super().__init__()
        self.save_hyperparameters()
        self.vae = VAE(**vae_config)
        self.train_cfg = train
        self.data_space, self.quantized = data_space, quantized

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        """The training objective per example (B,), in nats: an ELBO (estimator A or B) or an IWAE bound."""
        t = self.train_cfg
        if t["objective"] == "iwae":
            return estimators.iwae_bound(self.vae, x, t["num_samples"])
        return estimators.elbo(self.vae, x, t["num_samples"], t["estimator"])

    def on_train_epoch_start(self) -> None:
        self._bound_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._bound_count = 0

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = to_space(batch, self.data_space, quantized=self.quantized)  # (B, D) fresh draw every batch
        bound = self.bound(x)  # (B,)
        # A running sum instead of self.log(on_epoch=True) per step: Lightning's per-step logging costs
        # ~1 ms a batch, a third of an MNIST MLP step on a CPU (benchmarks/bench.py).
        self._bound_sum += bound.detach().sum()
        self._bound_count += len(x)
        return -bound.mean()

    def validation_step(self, x: torch.Tensor, batch_idx: int) -> None:
        elbo = estimators.elbo(self.vae, x, 1, "B")
        self.log("val/elbo", elbo.mean(), on_epoch=True, batch_size=len(x), sync_dist=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        # Validation runs every epoch after the last training batch, so the epoch's training mean is complete
        # here, and callbacks (EpochHistory, checkpointing) see both numbers at the end of the epoch.
        if self.trainer.sanity_checking or not self._bound_count:
            return
        name = "train/elbo" if self.train_cfg["objective"] == "elbo" else "train/iwae"
        self.log(name, (self._bound_sum / self._bound_count).float(), sync_dist=True)

    def configure_optimizers(self):
        t = self.train_cfg
        opt = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad}[t["optimizer"]]
        return opt(self.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])


class EpochHistory(pl.Callback):
    """One CSV row per epoch (epoch, train_elbo, val_elbo) for `dvc plots`.

    Lightning's CSVLogger writes train and validation metrics on separate rows keyed by step; DVC plots
    want one row per epoch with both series.
    """

    def __init__(self, path: Path, train_key: str):
        self.path, self.train_key = Path(path), train_key
        self.rows: list[dict[str, float]] = []

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
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=["epoch", "train_elbo", "val_elbo"])
                w.writeheader()
                w.writerows(self.rows)


class NonFiniteGuard(pl.Callback):
    """Stop a run whose objective became NaN/inf, with a message, instead of training on garbage."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"non-finite training objective at epoch {trainer.current_epoch}, batch {batch_idx}; "
                "lower train.lr, or for a learned-variance Gaussian raise likelihood.min_sigma"
            )


# --- the stage ------------------------------------------------------------------------------------------


def build_trainer(cfg: Config, out_dir: Path, logger, extra_callbacks=(), enable_progress_bar: bool = True):
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    train_key = "train/elbo" if cfg.train.objective == "elbo" else "train/iwae"
    callbacks = [
        ModelCheckpoint(
            dirpath=out_dir / "models",
            filename="best",
            monitor="val/elbo",
            mode="max",
            save_last=True,
            enable_version_counter=False,
        ),
        EpochHistory(out_dir / "plots" / "elbo.csv", train_key),
        NonFiniteGuard(),
        *extra_callbacks,
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
        use_distributed_sampler=False,  # EpochBatches shards by rank itself
        enable_progress_bar=enable_progress_bar,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        default_root_dir=out_dir,
    )


def train(
    cfg: Config, out_dir: Path, *, root: Path | None = None, enable_progress_bar: bool = True, callbacks=()
) -> dict:
    """The `train` stage: fit on out_dir/prepared, write models/{best,last}.ckpt, metrics/train.json and
    plots/elbo.csv; log the run to MLflow when tracking is enabled. Returns the train metrics."""
    from vaerepro import tracking

    out_dir = Path(out_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)
    data = VAEData(out_dir / "prepared", cfg.data_space, cfg.train.batch_size, cfg.seed)
    data.setup()
    vae_config = {
        "data_dim": int(data.splits.data_dim),
        "latent_dim": cfg.model.latent_dim,
        "hidden_dims": list(cfg.model.hidden_dims),
        "activation": cfg.model.activation,
        "likelihood": cfg.likelihood.model_dump(),
    }
    module = VAEModule(vae_config, cfg.train.model_dump(), cfg.data_space, data.quantized)

    logger, uri = None, None
    if cfg.tracking.enabled:
        from lightning.pytorch.loggers import MLFlowLogger

        root = root or out_dir
        uri, _ = tracking.ensure_experiment(cfg, root)
        logger = MLFlowLogger(
            experiment_name=cfg.tracking.experiment,
            run_name=cfg.run_name,
            tracking_uri=uri,
            tags=tracking.run_tags(cfg, root),
            log_model=False,
            synchronous=False,  # metrics reach the store from a background thread, off the training loop
        )
    trainer = build_trainer(cfg, out_dir, logger, callbacks, enable_progress_bar=enable_progress_bar)
    (out_dir / "models").mkdir(parents=True, exist_ok=True)

    run_id = logger.run_id if logger is not None else None
    if logger is not None and trainer.is_global_zero:
        tracking.log_config(logger.experiment, run_id, cfg)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=data)
    except BaseException:
        if logger is not None and trainer.is_global_zero:
            logger.experiment.set_terminated(run_id, "FAILED")
        raise
    elapsed = time.perf_counter() - start

    history = next(c for c in trainer.callbacks if isinstance(c, EpochHistory)).rows
    ckpt = trainer.checkpoint_callback
    best = max(history, key=lambda r: r["val_elbo"]) if history else None
    metrics = {
        "train_elbo": history[-1]["train_elbo"] if history else math.nan,
        "val_elbo": history[-1]["val_elbo"] if history else math.nan,
        "best_val_elbo": float(ckpt.best_model_score) if ckpt.best_model_score is not None else math.nan,
        "epochs": trainer.current_epoch,
        "best_epoch": best["epoch"] if best else -1,
        "train_time_s": elapsed,
    }
    if trainer.is_global_zero:
        tracking.write_run_id(out_dir / "models", run_id, uri)
        (out_dir / "metrics").mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics" / "train.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if logger is not None:
            tracking.log_metrics(logger.experiment, run_id, metrics, prefix="final/")
            logger.experiment.log_artifact(run_id, str(out_dir / "models" / "best.ckpt"), "checkpoints")
    return metrics
