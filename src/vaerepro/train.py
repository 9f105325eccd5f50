"""Training: a thin LightningModule over the core, and the `train` stage.

Lightning is the trainer (loops, devices/DDP, checkpointing, logging, progress bar; set up in trainer.py);
this file says what the objective of a batch is and what the stage writes (the batches: datamodule.py;
whether a training may go on from its last.ckpt: train_resume.py). Experiment tracking and sweep pruning
come from whoever starts a training (`tracker`, `callbacks`): this file imports neither.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import signal
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vaerepro import checkpoints, estimators, signals, stepsize
from vaerepro import config as config_mod
from vaerepro.config import Config
from vaerepro.cudagraph import StepGraph
from vaerepro.data import (
    check_bounded,
    check_prepared_from,
    config_split_settings,
    file_sha256,
    to_space,
)
from vaerepro.datamodule import DROPOUT_STREAM, TRAIN_STREAM, VAEData, batch_seed, shard
from vaerepro.devices import check_trainer, device_text
from vaerepro.errors import Diverged, Stopped, UserError
from vaerepro.files import try_lock, write_json
from vaerepro.likelihoods import space_name
from vaerepro.model import build_vae
from vaerepro.train_resume import (
    check_resumable,
    check_same_batches,
    check_same_numerics,
    numerics,
    saved_curve,
)
from vaerepro.trainer import (
    VAL_KEY,
    EpochHistory,
    SameConfigOnEveryRank,
    TestCurve,
    build_optimizer,
    build_trainer,
    check_launcher_world,
    fused_adagrad_runs,
    lightning_lines_held,
    train_key,
)
from vaerepro.versions import git_commit, versions

log = logging.getLogger(__name__)


# what a training whose objective or validation ELBO became non-finite can change (VAEModule)
DIVERGED_HINT = (
    "lower train.lr, or for a learned-variance Gaussian raise likelihood.min_sigma "
    "(likelihood.scale=softplus)"
)


# --- model ----------------------------------------------------------------------------------------------

# SplitMix64's increment (2^64 / the golden ratio): added rank times to a batch's dropout seed, so that every
# rank draws the masks of its own rows from a seed of its own
_RANK_STRIDE = 0x9E3779B97F4A7C15


# torch.compile's modes that capture CUDA graphs, and the same mode without them. Under DDP a mode with graphs
# compiles without them: no machine here has two GPUs to prove graphs per rank equal to eager training, and
# torch has open reports of DDP with CUDA-graph modes crashing or failing (pytorch/pytorch#128218, #140395).
# Each rank still compiles its objective, which tests/test_ddp.py proves equal to eager training.
WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def compile_mode(configured: str | None, world_size: int) -> str | None:
    """The torch.compile mode a training with trainer.compile=`configured` on `world_size` processes uses:
    the configured one, or under DDP (world_size > 1) its counterpart without CUDA graphs."""
    if world_size > 1:
        return WITHOUT_CUDA_GRAPHS.get(configured, configured)
    return configured


class VAEModule(pl.LightningModule):
    """Objective and optimiser around a core `VAE`; the checkpoint carries `VAE`'s constructor args.

    Multi-device training gives the same result as one device with the same global batch, up to float
    rounding: every rank sees the whole global batch, draws its randomness (binarisation / dequantisation,
    and q's noise) for all of it from one generator seeded by (seed, epoch, batch index), and keeps its own
    rows; DDP's gradient average then equals the gradient of the global batch's mean. Dropout (model.dropout
    > 0) is the exception: each rank draws the masks of its own rows only (`_dropout_rng`), so a multi-device
    training with dropout is as valid as, but not the same draw as, a one-device one.
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
        # this objective does not use (gradient accumulation, closures for LBFGS); clipping
        # (train.grad_clip_value) is Lightning's clip_gradients call in training_step.
        self.automatic_optimization = False
        self.vae = build_vae(vae_config)
        self.vae.validate_args = False  # see VAE.validate_args: the data were checked before training
        self.train_cfg = train
        self.data_space, self.quantized, self.seed = data_space, quantized, seed
        self.data_digest = data_digest  # sha256 of the training array (checkpoints.DATA_DIGEST_LABEL)
        # trainer.compile: a torch.compile mode for the objective, or None (eager). Not a hyperparameter: it
        # changes how the same numbers are computed, so a checkpoint resumes under either
        self.compile_mode: str | None = None
        self._compiled = None  # torch.compile(self.bound), made in on_fit_start
        # trainer.cuda_graph: the whole step as one CUDA graph (cudagraph.py) on one CUDA device; like
        # compile_mode, not a hyperparameter. step_graph is made in on_fit_start
        self.cuda_graph = False
        self.step_graph: StepGraph | None = None
        # trainer.steps_per_call: consecutive minibatches per call of training_step, each its own optimiser
        # step; not a hyperparameter either (the same training for any value; VAEData gathers them)
        self.steps_per_call = 1

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The number of processes, beside train.batch_size (per device, in the hyper-parameters): the global
        # batch, which a resume compares (check_same_batches) instead of the per-device batch size
        checkpoint[checkpoints.WORLD_SIZE_KEY] = self.trainer.world_size
        # the arithmetic, which a resume must keep (check_same_numerics)
        checkpoint[checkpoints.NUMERICS_KEY] = numerics(self.trainer)

    def on_fit_start(self) -> None:
        # Compiled here, in the process that trains (every DDP rank, after a spawn), not when the module is
        # built: a compiled function does not pickle. dynamic=False: one graph per batch shape (the full
        # batch, and a smaller last one), each specialised, which CUDA graphs need anyway.
        # The compiled code is keyed by this module's identity: every training in the process (seeds of a
        # reproduction, tests) would add its graphs to the same code object's cache until torch's recompile
        # limit (8) silently sends it back to eager. torch.compiler.reset() drops earlier trainings' graphs.
        mode = compile_mode(self.compile_mode, self.trainer.world_size)
        if mode != self.compile_mode and self.trainer.is_global_zero:
            log.warning(
                "trainer.compile=%s under DDP (%d processes): each rank compiles the objective with mode %s, "
                "without CUDA graphs (docs/scaling.md)",
                self.compile_mode,
                self.trainer.world_size,
                mode,
            )
        if self._graphed():
            clip = self.train_cfg.get("grad_clip_value")
            self.step_graph = StepGraph(
                self._graph_loss, self.train_cfg["batch_size"], self.parameters(), clip
            )
        elif self.cuda_graph and self.trainer.is_global_zero:
            log.warning("trainer.cuda_graph %s: the steps run eagerly", self._eager_because())
        if mode is not None:
            torch.compiler.reset()
            self._compiled = torch.compile(self.bound, mode=mode, dynamic=False)
            # The first torch.compile in a process turns torch.distributions' argument checks off for the
            # whole process (dynamo's TorchPatcher: Distribution.set_default_validate_args(False)) and never
            # turns them back on; back to torch's default (__debug__), so that an evaluation after this
            # training in the same process (`vaerepro run`) checks as it does without trainer.compile. The
            # objective's own distributions are built with validate_args=False (vae.validate_args) and are
            # not affected.
            torch.distributions.Distribution.set_default_validate_args(__debug__)

    def _graphed(self) -> bool:
        """trainer.cuda_graph, on one CUDA device (the config refuses it off CUDA) where nothing keeps the
        steps eager (_eager_because)."""
        return self.cuda_graph and self.device.type == "cuda" and self._eager_because() is None

    def _eager_because(self) -> str | None:
        """Why a training that asks for the step as one CUDA graph runs its steps eagerly here, or None:
        under DDP (the gradients' all-reduce between backward and the update is not captured), or Adagrad
        on a torch without its fused kernel for the device (the graph's update: CapturableAdagrad)."""
        if self.trainer.world_size > 1:
            return f"under DDP ({self.trainer.world_size} processes; docs/scaling.md)"
        if self.train_cfg["optimizer"] == "adagrad" and not fused_adagrad_runs(self.device):
            return (
                f"with train.optimizer=adagrad: torch {torch.__version__} has no fused Adagrad kernel for "
                f"{self.device.type}, which the graph's update needs"
            )
        return None

    def objective(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """`bound` (B,), nats, compiled when trainer.compile is set. The randomness (x's data space, eps) is
        drawn outside, eagerly, from the batch's seeded generator, so compiled and eager training see the
        same draws. Under "reduce-overhead" each call is a new step of the CUDA graphs: the bound it returns
        is valid until the next call (the caller sums it within the step)."""
        if self._compiled is None:
            return self.bound(x, eps)
        torch.compiler.cudagraph_mark_step_begin()  # a new training step (a no-op without CUDA graphs)
        return self._compiled(x, eps)

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
        return torch.randn((num_samples, n, self.vae.z_dim), generator=g, device=self.device)

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
        index); this rank keeps its rows of it (`shard`). Dropout's masks, drawn by the network for this
        rank's rows, come from a generator seeded by (seed, epoch, batch index, rank) (`_dropout_rng`). The
        loss is this rank's share of the global mean:
        DDP averages gradients over ranks, and (1/world) sum_r [-sum(bound_r) world / N] = -mean over all N,
        whatever the shards' sizes.
        """
        n = len(batch)
        x, eps = self.draws(batch, epoch, batch_idx)
        with self._dropout_rng(epoch, batch_idx, rank):
            bound = self.objective(shard(x, rank, world), shard(eps, rank, world, dim=1))  # (B,)
        return bound.sum() * (-world / n), bound

    def draws(self, batch: torch.Tensor, epoch: int, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The randomness of a global batch of stored pixels (N, D), from one generator seeded by (seed,
        epoch, batch index): the batch in the data space x (N, D) and q's noise eps (K, N, Z)."""
        g = self._generator(TRAIN_STREAM, epoch, batch_idx)
        x = to_space(batch, self.data_space, quantized=self.quantized, generator=g)  # (N, D)
        return x, self._noise(g, self.train_cfg["num_samples"], len(batch))

    def _graph_loss(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """shard_loss on one process, for drawn x (N, D) and eps (K, N, Z): what the CUDA graph captures
        (no dropout: the config refuses it with trainer.cuda_graph)."""
        bound = self.objective(x, eps)  # (N,)
        return bound.sum() * (-1 / len(x)), bound

    @contextlib.contextmanager
    def _dropout_rng(self, epoch: int, batch_idx: int, rank: int) -> Iterator[None]:
        """Run the block on torch's global generators (the CPU's and this module's device's) seeded by (seed,
        epoch, batch index, rank), and put them back afterwards; a model without dropout runs it as it is.

        Why: nn.Dropout draws its masks from the global generator, which Lightning's checkpoints do not
        hold. Seeded per batch, the masks are a function of the batch like its other randomness (data space,
        q's noise), so a resumed training ends where an uninterrupted one does, and nothing else that draws
        from the global generator moves them. The masks' backward pass reuses them and draws nothing.
        """
        if self.vae.dropout == 0:
            yield
            return
        seed = (batch_seed(self.seed, DROPOUT_STREAM, epoch, batch_idx) + rank * _RANK_STRIDE) % 2**64
        device = [] if self.device.type == "cpu" else [self.device]
        with torch.random.fork_rng(devices=device, device_type=self.device.type if device else "cuda"):
            torch.random.default_generator.manual_seed(seed)
            if device:
                torch.get_device_module(self.device).manual_seed(seed)  # the rank's device, the current one
            yield

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """steps_per_call = M optimiser steps, one per global minibatch of `batch` (M N, D, the same on every
        rank; fewer at the epoch's end): minibatch j of call i is the epoch's minibatch i M + j, seeded and
        stepped as it would be alone (M = 1), so the training is the same for any M. Lightning's loop around
        a call (hooks, fetching, progress) then runs once per M steps; it counts every optimiser step
        (global_step). Returns the last step's loss."""
        size = self.train_cfg["batch_size"] * self.trainer.world_size  # N, the global minibatch
        first = batch_idx * self.steps_per_call
        for j, minibatch in enumerate(batch.split(size)):
            loss = self._optimiser_step(minibatch, first + j)
        return loss

    def _optimiser_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """One optimiser step on the epoch's global minibatch number `batch_idx`, stored pixels (N, D)."""
        opt, graph = self.optimizers(), self.step_graph
        if graph is not None and graph.takes(len(batch)):  # trainer.cuda_graph: the step as one graph
            loss, bound = graph.step(*self.draws(batch, self.current_epoch, batch_idx), opt)  # (), (N,)
        else:
            with graph.eager_step(len(batch)) if graph is not None else contextlib.nullcontext():
                loss, bound = self.shard_loss(batch, self.current_epoch, batch_idx, *self._rank_world())
                opt.zero_grad()
                self.manual_backward(loss)  # under DDP, also the gradients' all-reduce
                clip = self.train_cfg.get("grad_clip_value")  # absent from an older module's train dict
                if clip is not None:
                    # each element of the (all-reduced) gradient into [-clip, clip], as the continuous-
                    # Bernoulli code's tf.clip_by_value(grad, -1.0, 1.0) before Adam's apply_gradients;
                    # Lightning's public clipping for manual optimisation (Trainer(gradient_clip_val=...)
                    # is automatic optimisation's)
                    self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="value")
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
        elbo = self.fixed_elbo(x, eps)  # (B,)
        self._val_sum += elbo.sum(dtype=torch.float64)
        self._val_count += len(elbo)

    def fixed_elbo(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The ELBO per example (B,), nats, of points x (B, D) under q's noise eps (1, B, Z) drawn in
        advance: the validation's, and the test curve's (trainer.TestCurve). Estimator B (analytic KL) for
        one stochastic layer; two layers have no closed-form KL: A."""
        estimator = "B" if self.vae.stochastic_layers == 1 else "A"
        return estimators.elbo(self.vae, x, 1, estimator, eps)

    def on_validation_epoch_end(self) -> None:
        # Validation runs every epoch after the last training batch, so the epoch's training mean is complete
        # here, and callbacks (EpochHistory, checkpointing) see both numbers at the end of the epoch.
        # Each value is already the mean over all ranks' examples, the same on every rank: sync_dist with
        # max returns it unchanged (a mean of identical values could round) and spares Lightning's warning
        # about unsynchronised epoch-level metrics.
        log = dict(on_epoch=True, sync_dist=True, reduce_fx="max")
        if self.trainer.sanity_checking:
            (val_mean,) = self._global_means((self._val_sum, self._val_count))
            self.log(VAL_KEY, val_mean, prog_bar=True, **log)
            return
        val_mean, train_mean = self._global_means(
            (self._val_sum, self._val_count), (self._bound_sum, self._bound_count)
        )
        # Both checked once an epoch, on the sums the epoch keeps anyway: a check per step would make every
        # step wait for its loss (a device synchronisation on a GPU). Raised before anything records the
        # epoch (the logger, elbo.csv) and before the checkpoint callbacks run, so best.ckpt keeps the last
        # finite weights: a NaN validation ELBO would otherwise be logged and, in the first epoch, chosen as
        # the best one (ModelCheckpoint takes it for -inf and saves it when it has no best yet). The same on
        # every rank (global means), so every rank stops.
        name, epoch = train_key(self.train_cfg["objective"]), self.current_epoch
        if not math.isfinite(train_mean):
            raise Diverged(
                f"non-finite training objective ({name} = {train_mean}) in epoch {epoch}; {DIVERGED_HINT}"
            )
        if not math.isfinite(val_mean):
            # the training mean is finite: the epoch's last optimiser steps gave weights whose ELBO is not
            # (the training objective would be non-finite too from the next epoch's first step)
            raise Diverged(
                f"non-finite validation ELBO ({VAL_KEY} = {val_mean}) in epoch {epoch}, after a finite "
                f"training objective ({name} = {train_mean:.6g}): its last optimiser steps diverged; "
                + DIVERGED_HINT
            )
        self.log(VAL_KEY, val_mean, prog_bar=True, **log)
        self.log(name, train_mean, **log)

    def on_train_epoch_end(self) -> None:
        # the learning-rate schedule's step, here because manual optimisation steps no scheduler: after this
        # epoch's validation and before last.ckpt is written (Lightning runs checkpoint callbacks after this
        # hook), so epoch e trains at the schedule's rate for e, resumed or not
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def configure_optimizers(self):
        return build_optimizer(self.parameters(), self.train_cfg, capturable=self._graphed())


# --- the stage ------------------------------------------------------------------------------------------


def build_module(cfg: Config, data: VAEData) -> VAEModule:
    """The LightningModule for cfg on set-up data (its pixel count, whether it is 8-bit, its digest)."""
    hp = checkpoints.expected_hparams(
        cfg, data.splits.data_dim, data.quantized, checkpoints.data_digest(data.splits.meta)
    )
    return VAEModule(**hp)


def config_digest(cfg: Config) -> str:
    """The first 12 hex digits of the sha256 of the resolved config as params.yaml holds it."""
    return hashlib.sha256(config_mod.dump(cfg.to_dict()).encode()).hexdigest()[:12]


class RunTracker(Protocol):
    """What `train` asks of experiment tracking, on global rank 0 only (tracking.training.TrainingRun is
    vaerepro's, for MLflow): `open` before fitting, with the resumed checkpoint's curve (None when training
    from the start), prepared/meta.json and the (training, validation) metric keys, returns the Lightning
    logger to attach or None, and the rate train.lr_candidates' pilots chose (None without them); `finish`
    with the stage's metrics once its files are written; `fail` on any error (interrupted:
    trainer.interrupted, true when fit ended on any exception; with SystemExit it marks a Ctrl-C)."""

    def open(
        self,
        *,
        resumed_curve: Sequence[Mapping[str, Any]] | None,
        data_meta: Mapping[str, Any],
        keys,
        chosen_lr: float | None = None,
    ) -> Any: ...

    def finish(self, metrics: Mapping[str, Any]) -> None: ...

    def fail(self, exc: BaseException, *, interrupted: bool) -> None: ...


def train(
    cfg: Config,
    out_dir: Path,
    *,
    enable_progress_bar: bool = True,
    callbacks: Sequence[pl.Callback] = (),
    tracker: RunTracker | None = None,
    root: Path | None = None,
) -> dict:
    """The `train` stage: fit on out_dir/prepared, write models/{best,last}.ckpt, metrics/train.json (and its
    headline numbers, train_summary.json) and plots/elbo.csv; with train.test_curve, plots/test_curve.csv
    too. Returns the train metrics.

    Under DDP every process runs this; only global rank 0 writes files and uses `tracker` (one run per
    training). `callbacks` join the trainer's own (a sweep trial's pruning). With train.resume and an
    existing models/last.ckpt, training continues from it (its epoch, optimiser state, best score and curve);
    a checkpoint that cannot be resumed (unreadable, or trained with another config) is refused before any
    file or run is touched. A signal stops training after the epoch that was running, with last.ckpt
    written, and raises `Stopped`. With train.lr_candidates, the rate is first chosen by AEVB's pilots
    (stepsize.choose; resuming, the checkpoint's choice) and recorded in train.json as `lr_selection`.
    `root`: the project whose git commit train.json records as `commit` (versions.git_commit; None records
    none).
    """
    out_dir = Path(out_dir)
    commit = git_commit(Path(root)) if root is not None else None  # the code this process started from
    model_dir = out_dir / "models"
    check_trainer(cfg.trainer)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)
    data = VAEData(
        out_dir / "prepared",
        cfg.data_space,
        cfg.train.batch_size,
        cfg.seed,
        latent_dim=cfg.model.latent_dim + (cfg.model.latent_dim_2 or 0),  # z = [z1 | z2]: q's noise
        val_batch_size=cfg.train.val_batch_size,
        test_curve=cfg.train.test_curve,
    )
    data.setup()
    # a learned Gaussian sigma without a floor on pixels that may sit exactly on a value: unbounded
    prepared, meta = out_dir / "prepared", data.splits.meta
    check_bounded(cfg.likelihood_object(), cfg.data_space, bool(data.splits.quantized), prepared)
    check_prepared_from(meta, cfg.data.source, cfg.data.path, prepared, config_split_settings(cfg.data))
    last = model_dir / "last.ckpt"
    ckpt_path = last if cfg.train.resume and last.is_file() else None
    saved = checkpoints.read(last) if ckpt_path is not None else None
    # train.lr_candidates: the rate a pilot per candidate chooses, or the one a resumed checkpoint recorded
    # (stepsize.py); the module then trains at it as if train.lr were set to it. The pilots leave the global
    # random state as they found it, so the module's initial weights are the seed's.
    selection = stepsize.choose(cfg, data, functools.partial(build_module, data=data), saved=saved)
    module = build_module(cfg if selection is None else stepsize.at_rate(cfg, selection["chosen"]), data)
    module.compile_mode = cfg.trainer.compile  # the pilots above run eagerly: each is 100 steps
    module.cuda_graph = uses_cuda_graph(cfg)
    module.steps_per_call = cfg.trainer.steps_per_call
    resumed = check_resumable(last, saved, module, cfg.train.max_epochs) if saved is not None else None
    # The trainer first, without a logger: it knows this process's global rank (from the launcher's
    # environment) before any process group exists, and only rank 0 may create the tracking run.
    same = SameConfigOnEveryRank(config_digest(cfg))
    record = [stepsize.SelectionRecord(selection)] if selection is not None else []  # kept in last.ckpt
    extra = [*callbacks, same, *record]
    test_curve_csv = out_dir / "plots" / "test_curve.csv"
    if cfg.train.test_curve:  # the test-set ELBO at log-spaced epochs, for plotting and the reproduction card
        n, size = len(data.x_train), cfg.train.val_batch_size
        extra.append(TestCurve(test_curve_csv, data.x_test, data.eps_test, n_train=n, batch_size=size))
    with lightning_lines_held():  # printed once the checks that need the Trainer have passed
        trainer = build_trainer(cfg, out_dir, None, extra, enable_progress_bar=enable_progress_bar)
        check_launcher_world(trainer.num_devices * trainer.num_nodes, cfg.trainer)  # world_size is torchrun's
        if resumed is not None:  # the world size is the trainer's: devices x nodes, "auto" resolved
            check_same_batches(last, resumed, len(data.x_train), cfg.train.batch_size, trainer.world_size)
            check_same_numerics(last, resumed, numerics(trainer))
        held = hold(out_dir, model_dir) if trainer.is_global_zero else None  # before anything is written
    if ckpt_path is not None:
        log.info("resuming from %s after %d epochs", ckpt_path, len(saved_curve(resumed)))
    elif cfg.train.resume:
        log.info("train.resume: no %s yet, training from the start", last)
    tracker = tracker if trainer.is_global_zero else None
    if trainer.is_global_zero:
        model_dir.mkdir(parents=True, exist_ok=True)
    # what this invocation runs on and with (a resume may run elsewhere): the device of rank 0 and the number
    # of processes, the software, and the project's commit; train.json records it, the MLflow run's tags too
    environment = {
        "device": device_text(trainer.strategy.root_device, trainer.world_size),
        "versions": versions(),
        "commit": commit,
    }
    try:
        if tracker is not None:  # first: a tracking store that is refused leaves every file as it was
            curve = saved_curve(resumed) if resumed is not None else None
            keys = (train_key(cfg.train.objective), VAL_KEY)
            chosen_lr = None if selection is None else selection["chosen"]
            logger = tracker.open(
                resumed_curve=curve,
                data_meta=data.splits.meta,
                keys=keys,
                chosen_lr=chosen_lr,
                environment=environment,
            )
            if logger is not None:
                trainer.loggers = [logger]
        if trainer.is_global_zero:
            # The last training's numbers describe checkpoints this training replaces or extends: a training
            # that stops or fails from here on leaves no train.json rather than one that is no longer true.
            for name in ("train.json", "train_summary.json"):
                (out_dir / "metrics" / name).unlink(missing_ok=True)
            if not cfg.train.test_curve:  # the file exists only while the curve is on (an older training's)
                test_curve_csv.unlink(missing_ok=True)
        start = time.perf_counter()
        with warnings.catch_warnings(), signals.deferred():
            # models/ already holds this run's own mlflow_run.json (and last.ckpt when resuming)
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            # torch's deprecation of an API that Lightning 2.6 calls: not the user's to act on
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            # resumed with train.test_curve turned off: the checkpoint's test-curve rows are meant to be left
            warnings.filterwarnings(
                "ignore", message=r"Be aware that when using `ckpt_path`.*\['TestCurve'\]\.$"
            )
            try:
                trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
            except SIGTERMException:
                # A SIGTERM between the start of fit, where Lightning installs its own handler, and
                # StopOnSignal.on_train_start, which hands the signal back to vaerepro.signals, also set
                # Lightning's flag; its loops then stop at the first batch with SIGTERMException, a SystemExit
                # with no code (exit status 0, which a scheduler reads as success). No public API clears the
                # flag, so the stop is one all the same: exit 143, no epoch of this training saved.
                epoch = trainer.current_epoch  # 0-based: the epochs a resumed checkpoint held
                saved = f"{last} holds the {epoch} before it" if last.is_file() else "no epoch was saved"
                where = f"training stopped during epoch {epoch + 1} of {cfg.train.max_epochs}; {saved}"
                raise Stopped(signal.SIGTERM, where) from None
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
        if resumed is not None:  # the epochs the checkpoint held: train_time_s timed only the ones after them
            metrics["resumed_after_epochs"] = len(saved_curve(resumed))
        if selection is not None:
            metrics["lr_selection"] = selection  # stepsize.choose: candidates, pilot bounds, the chosen rate
        if trainer.is_global_zero:
            # which weights these numbers describe: the report checks that eval.json evaluated this file,
            # so a training run again after its evaluation never shows beside the old evaluation's numbers
            best_ckpt = model_dir / "best.ckpt"
            metrics["best_checkpoint_sha256"] = file_sha256(best_ckpt) if best_ckpt.is_file() else None
            metrics["config"] = cfg.to_dict()  # what it ran under (report.recorded_config prints it)
            metrics.update(environment)  # device, versions, commit
            write_json(out_dir / "metrics" / "train.json", metrics)  # whole or not at all, as every file
            # DVC's metrics of training: the best validation ELBO (nats per example, under the data space's
            # name as binary.best_val_elbo, like eval_summary.json's numbers), how many epochs ran and the
            # best one's index (from 0, as in plots/elbo.csv); train.json keeps the whole record
            summary = {
                space_name(cfg.data_space, cfg.improper): {"best_val_elbo": metrics["best_val_elbo"]},
                "epochs": metrics["epochs"],
                "best_epoch": metrics["best_epoch"],
            }
            write_json(out_dir / "metrics" / "train_summary.json", summary)
            log.info(
                "best validation ELBO = %.3f nats/example (%s) at epoch %d (from 0) of %d; in %s",
                metrics["best_val_elbo"],
                cfg.numbers_of,
                metrics["best_epoch"],
                metrics["epochs"],
                out_dir / "metrics" / "train.json",
            )
        if tracker is not None:
            tracker.finish(metrics)
    except BaseException as exc:
        if tracker is not None:
            tracker.fail(exc, interrupted=trainer.interrupted)
        raise
    finally:
        if held is not None:
            os.close(held)  # releases the lock
    return metrics


def hold(out_dir: Path, model_dir: Path) -> int:
    """An exclusive lock on out_dir, held while this training writes there (the caller closes the returned
    descriptor). Two trainings into one models/ at once would each overwrite the other's checkpoints: a
    train.json, an MLflow run's best.ckpt or a later evaluation would describe the other model. The lock is
    an flock on the directory itself, which adds no file to the user's directory or to DVC's outputs; an
    evaluation holds the same one (cli.stage_evaluate), as it reads the best.ckpt a training replaces."""
    if (fd := try_lock(out_dir)) is None:
        raise UserError(
            f"{model_dir}: another training or an evaluation is running in this directory now (a "
            "`vaerepro train`, `vaerepro evaluate`, `vaerepro run` or `dvc repro`); nothing was changed: "
            "wait for it to end, or train elsewhere"
        )
    return fd


def uses_cuda_graph(cfg: Config) -> bool:
    """Whether training asks for the whole step as one CUDA graph: trainer.cuda_graph=true (the config
    refuses it where it cannot run), or auto where nothing conflicts and nothing is unchecked on a GPU
    (else logged, and eager). Under DDP the module still runs the steps eagerly (VAEModule._graphed)."""
    setting, conflicts = cfg.trainer.cuda_graph, cfg.cuda_graph_conflicts()
    if setting == "auto":
        conflicts += cfg.cuda_graph_unproven()
    if setting == "auto" and conflicts:
        log.info("trainer.cuda_graph=auto: eager training steps, for %s", "; ".join(conflicts))
    return setting is True or (setting == "auto" and not conflicts)
