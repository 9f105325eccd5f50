"""The prepared splits as Lightning's training sees them: batches in memory, their seeds, validation.

Every rank gets the same global batches, in a seeded order per epoch (`EpochBatches`), and keeps its own rows
of each (`shard`) after the batch's randomness is drawn for all of them from a seed of the batch alone
(`batch_seed`): so a training is the same for any number of devices and after a resume. The batches are
gathered from tensors in memory (`TensorBatches`), on the GPU when they fit (`resident`). `VAEData` is the
LightningDataModule: the raw training pixels (the data space is drawn per batch by the module) and the fixed
validation sample, one draw of the data space and of q's noise, the same every epoch.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from vaerepro.data import TEST_SEED_OFFSET, Splits, fixed_space, load_prepared
from vaerepro.model import VAE, bytes_per_pair

log = logging.getLogger(__name__)

VAL_SEED_OFFSET = 1  # the validation draw (binarisation / dequantisation) uses seed + 1


class EpochBatches:
    """Yields index tensors, one per global batch: a seeded shuffle per epoch (in order when not shuffling).

    Every rank gets the same global batches and keeps its own rows of each (`shard`), after drawing the
    batch's randomness for all of them (see `VAEModule.shard_loss`). Our own sampler because the batches
    are index tensors (see TensorBatches), and Lightning's DistributedSampler would give each rank its own
    examples without telling it the global batch they belong to.
    """

    def __init__(
        self, n: int, batch_size: int, *, shuffle: bool, seed: int, device: torch.device | None = None
    ):
        """device: where the index tensors go (the data's device; default the CPU). The permutation is drawn
        on the CPU whatever the device, so every device sees the same batches, and moved once an epoch."""
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        yield from order.to(self.device).split(self.batch_size)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


class TensorBatches:
    """The batches of an in-memory tensor in the order of `sampler` (index tensors, one per batch), each
    taken with one vectorised gather; Lightning iterates over it as over a DataLoader.

    Not a DataLoader over a TensorDataset: that collates B single items per batch (B Python calls). Nor a
    DataLoader over this gather: its own per-batch bookkeeping (fetcher, collate, a profiler range) does
    nothing these data need: they are tensors in memory already (on a CUDA device, in its memory when they
    fit: `resident`), with no workers to feed and nothing to pin. Lightning takes any iterable with a length;
    it finds ``sampler`` and ``batch_sampler`` under a DataLoader's names, and calls ``sampler.set_epoch`` at
    every epoch start.
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


# On a CUDA device, the training split and the validation sample are kept there when they take at most this
# fraction of its free memory (MNIST's 50,000 uint8 images: 39 MB): every batch is then gathered on the
# device, with no host-to-device copy a step. Larger data stay in host memory, each batch copied over as it
# is used.
RESIDENT_FRACTION = 0.25


def resident(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` moved to ``device`` when it is a CUDA device with room for them (RESIDENT_FRACTION of its
    free memory), else as they are (on the CPU, where they are already)."""
    if device.type != "cuda":
        return tensors
    need = sum(t.nbytes for t in tensors)
    free = torch.cuda.mem_get_info(device)[0]
    if need > RESIDENT_FRACTION * free:
        log.info(
            "data kept in host memory: %.0f MiB > %.0f%% of the %.0f MiB free on %s",
            need / 2**20,
            100 * RESIDENT_FRACTION,
            free / 2**20,
            device,
        )
        return tensors
    return tuple(t.to(device) for t in tensors)


# train.val_batch_size=auto: 1,000 images a batch on a CPU; on a CUDA device the whole split per device in
# one batch while its activations (model.bytes_per_pair, one sample an image) take at most VAL_CUDA_BYTES
# (AEVB's MNIST model: 13,568 bytes an image, so ~79,000 images). Each validation batch is one pass of
# Lightning's loop (hooks, fetching, logging), which costs more than its kernels on a GPU: an H200
# validated full MNIST's 10,000 images in 16.5 ms as 10 batches of 1,000 and in 3.9 ms as one. A fixed budget,
# not the free memory, so that every rank of a DDP run cuts the split the same way.
VAL_CPU_BATCH = 1000
VAL_CUDA_BYTES = 2**30


def resolve_val_batch_size(
    setting: int | str, vae: VAE | None, num_examples: int, device: torch.device | str
) -> int:
    """train.val_batch_size as a number of images per batch and device: `setting` itself, or for "auto"
    VAL_CPU_BATCH on a CPU and on CUDA all `num_examples` (the split's images per device) up to the
    VAL_CUDA_BYTES budget for `vae` (read on CUDA only), never fewer than VAL_CPU_BATCH."""
    if setting != "auto":
        return int(setting)
    if torch.device(device).type != "cuda":
        return VAL_CPU_BATCH
    fit = VAL_CUDA_BYTES // bytes_per_pair(vae)
    return max(1, min(num_examples, max(VAL_CPU_BATCH, fit)))


def shard(t: torch.Tensor, rank: int, world: int, dim: int = 0) -> torch.Tensor:
    """Rank r's rows of a global batch along `dim`: r, r + world, r + 2 world, ... (sizes differ by <= 1)."""
    if world == 1:
        return t  # all of them (slicing would add an op to every training step)
    return t[(slice(None),) * dim + (slice(rank, None, world),)]


# TEST_STREAM: q's noise for the test curve's fixed sample (train.test_curve)
TRAIN_STREAM, VAL_STREAM, DROPOUT_STREAM, TEST_STREAM = 0, 1, 2, 3
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
    the number of devices. Batch sizes are per device.

    With `test_curve`, also a fixed sample of the test split drawn the same way (x_test, eps_test), for
    trainer.TestCurve: the evaluate stage's draw of the data space (seed + TEST_SEED_OFFSET) and q's noise
    from a stream of its own. load_prepared reads every split anyway; the test split is drawn only then."""

    def __init__(
        self,
        prepared_dir: Path,
        data_space: str,
        batch_size: int,
        seed: int,
        *,
        latent_dim: int,
        val_batch_size: int | str | None = None,
        test_curve: bool = False,
    ):
        super().__init__()
        self.prepared_dir, self.data_space = Path(prepared_dir), data_space
        self.batch_size, self.seed = batch_size, seed
        self.latent_dim, self.val_batch_size = latent_dim, val_batch_size or batch_size
        self.test_curve = test_curve
        self.splits: Splits | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        self.splits = load_prepared(self.prepared_dir)
        self.quantized = bool(self.splits.quantized)
        # Raw values stay raw in memory (uint8 for 8-bit data): the data space is applied per batch, so
        # every epoch sees a fresh binarisation / dequantisation.
        self.x_train = torch.from_numpy(np.ascontiguousarray(self.splits.train))
        self.x_val, self.eps_val = self._fixed_sample(self.splits.val, VAL_SEED_OFFSET, VAL_STREAM)
        if self.test_curve:
            self.x_test, self.eps_test = self._fixed_sample(self.splits.test, TEST_SEED_OFFSET, TEST_STREAM)

    def _fixed_sample(
        self, raw: np.ndarray, seed_offset: int, stream: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draw of the data space for each image of a split, x (M, D), and one of q's noise for each,
        eps (M, K=1, Z), from generators of their own (the global ones are not touched)."""
        x = fixed_space(raw, self.data_space, quantized=self.quantized, seed=self.seed + seed_offset)
        g = torch.Generator().manual_seed(batch_seed(self.seed, stream, 0, 0))
        return x, torch.randn((len(x), 1, self.latent_dim), generator=g)

    def _world(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # A batch (a tensor, or a tuple of tensors) on the device already, as on a CPU, is returned as it is,
        # without Lightning's generic walk of the batch.
        if all(t.device == device for t in (batch if isinstance(batch, tuple) else (batch,))):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> TensorBatches:
        # global batches, each of the module's steps_per_call consecutive minibatches of the epoch's order
        # (VAEModule.training_step splits them): the order split by M N, then by N, is the order split by N
        n, size = len(self.x_train), self.batch_size * self._world() * self._steps_per_call()
        (x,) = resident(self._device(), self.x_train)
        return TensorBatches(EpochBatches(n, size, shuffle=True, seed=self.seed, device=x.device), x)

    def _steps_per_call(self) -> int:
        # the module's: trainer.steps_per_call for the training, 1 for the step-size pilots (their trainer
        # stops at max_steps only between calls, and records a loss per call). The module splits what this
        # gives, so it alone says how much to give
        module = self.trainer.lightning_module if self.trainer is not None else None
        return getattr(module, "steps_per_call", 1)

    def val_dataloader(self) -> TensorBatches:
        # global batches of (x (N, D), eps (N, 1, Z)), N = the per-device size times the devices
        n, world, device = len(self.x_val), self._world(), self._device()
        module = self.trainer.lightning_module if self.trainer is not None else None
        per_device = resolve_val_batch_size(
            self.val_batch_size, getattr(module, "vae", None), math.ceil(n / world), device
        )
        size = per_device * world
        x, eps = resident(device, self.x_val, self.eps_val)
        return TensorBatches(EpochBatches(n, size, shuffle=False, seed=0, device=x.device), x, eps)

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
