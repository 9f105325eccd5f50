"""Training: batching, determinism, checkpoints that rebuild the model without Lightning."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from conftest import BIN, TINY, Crash, compose, copy_prepared, tiny_config, val_curve
from vaerepro import checkpoints
from vaerepro.data import load_prepared
from vaerepro.datamodule import (
    RESIDENT_FRACTION,
    VAL_CPU_BATCH,
    VAL_CUDA_BYTES,
    EpochBatches,
    TensorBatches,
    VAEData,
    batch_seed,
    resident,
    resolve_val_batch_size,
    shard,
)
from vaerepro.errors import Stopped
from vaerepro.evaluate import load_vae
from vaerepro.model import VAE, bytes_per_pair
from vaerepro.schedules import iwae_lr
from vaerepro.train import train
from vaerepro.trainer import AtomicCheckpointIO, EpochBar


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_batches_shard_one_permutation(world):
    n, bs = 103, 10
    batches = EpochBatches(n, bs * world, shuffle=True, seed=7)  # global batches
    batches.set_epoch(4)
    shards = [[shard(b, r, world) for b in batches] for r in range(world)]
    seen = torch.cat([b for s in shards for b in s])
    assert sorted(seen.tolist()) == list(range(n))  # disjoint and complete
    assert all(len(s) == len(batches) for s in shards)  # every rank takes the same number of steps
    assert all(len(s[0]) == bs for s in shards)  # per-device batch size
    # a new epoch is a new order; the same epoch is the same order
    again = EpochBatches(n, bs * world, shuffle=True, seed=7)
    again.set_epoch(4)
    assert torch.equal(shard(next(iter(again)), 0, world), shards[0][0])
    again.set_epoch(5)
    assert not torch.equal(shard(next(iter(again)), 0, world), shards[0][0])


def test_shards_of_a_global_batch_differ_in_size_by_at_most_one():
    last = torch.arange(5)  # a short last global batch on 2 or 3 ranks
    assert [len(shard(last, r, 2)) for r in range(2)] == [3, 2]
    assert [shard(last, r, 3).tolist() for r in range(3)] == [[0, 3], [1, 4], [2]]
    noise = torch.arange(2 * 5 * 3).reshape(2, 5, 3)  # (K, N, Z): rows along dim 1
    assert torch.equal(shard(noise, 1, 2, dim=1), noise[:, 1::2])


def test_batch_seed_depends_on_seed_stream_epoch_and_index_only():
    seeds = {batch_seed(s, st, e, i) for s in (0, 1) for st in (0, 1) for e in (0, 1) for i in (0, 1)}
    assert len(seeds) == 16
    assert 0 <= batch_seed(-1, 0, 0, 0) < 2**64  # a negative run seed is fine too


def test_batch_seed_is_numpys_seed_sequence_of_seed_stream_epoch_and_index():
    """Computed in blocks (SEED_BLOCK at a time), each seed is still SeedSequence([seed, stream, epoch,
    index]) (a run's numbers do not depend on the block size), in any order of asking, across block edges."""
    import numpy as np

    from vaerepro.datamodule import SEED_BLOCK

    def reference(s, st, e, i):
        return int(np.random.SeedSequence([s % 2**64, st, e, i]).generate_state(1, dtype=np.uint64)[0])

    indices = [3 * SEED_BLOCK + 1, 0, SEED_BLOCK - 1, SEED_BLOCK, 2 * SEED_BLOCK + 5, 1]
    for s, st, e in ((0, 0, 0), (-1, 1, 7), (2**70, 0, 3)):
        assert [batch_seed(s, st, e, i) for i in indices] == [reference(s, st, e, i) for i in indices]


def test_shard_gradients_average_to_the_global_batch_gradient():
    """One global batch on 1 rank, or on 2 and 3 ranks averaged as DDP does: the same gradient."""
    from vaerepro.train import VAEModule

    cfg = tiny_config()
    vae_config = {"data_dim": 12, "latent_dim": 2, "hidden_dims": [8], "likelihood": {"name": "bernoulli"}}
    torch.manual_seed(0)
    module = VAEModule(vae_config, cfg.train.model_dump(), "binary", True, seed=3)
    batch = torch.randint(0, 256, (7, 12), dtype=torch.uint8)  # 7 examples: uneven shards on 2 and 3 ranks

    def grad(rank, world):
        module.zero_grad()
        loss, bound = module.shard_loss(batch, epoch=1, batch_idx=4, rank=rank, world=world)
        loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in module.parameters()]), bound.detach()

    whole, bound = grad(0, 1)
    for world in (2, 3):
        parts = [grad(r, world) for r in range(world)]
        # every example got the same draws on its rank as on one device
        expected = torch.cat([shard(bound, r, world) for r in range(world)])
        torch.testing.assert_close(torch.cat([b for _, b in parts]), expected)
        torch.testing.assert_close(sum(g for g, _ in parts) / world, whole, rtol=1e-5, atol=1e-6)


def test_tensor_batches_gathers_whole_batches_in_the_samplers_order():
    x = torch.arange(20).reshape(10, 2)
    sampler = EpochBatches(10, 4, shuffle=True, seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    batches = list(TensorBatches(sampler, x))
    assert len(TensorBatches(sampler, x)) == 3 and [len(b) for b in batches] == [4, 4, 2]
    for idx, b in zip(order, batches, strict=True):
        assert torch.equal(b, x[idx])
    # with more tensors: tuples of the same examples of each
    eps = torch.arange(30).reshape(10, 1, 3)  # (N, K, Z)
    for idx, (bx, be) in zip(order, TensorBatches(sampler, x, eps), strict=True):
        assert torch.equal(bx, x[idx]) and torch.equal(be, eps[idx])


def test_batches_on_the_device_already_are_not_moved_others_are(tmp_path):
    data = VAEData(tmp_path, "binary", 4, 0, latent_dim=2)
    x, eps = torch.zeros(4, 3), torch.zeros(4, 1, 2)
    cpu = torch.device("cpu")
    assert data.transfer_batch_to_device(x, cpu, 0) is x
    pair = (x, eps)
    assert data.transfer_batch_to_device(pair, cpu, 0) is pair
    # another device: Lightning's own transfer ("meta" stands in for a GPU here)
    moved = data.transfer_batch_to_device(pair, torch.device("meta"), 0)
    assert [t.device.type for t in moved] == ["meta", "meta"]
    assert [t.shape for t in moved] == [x.shape, eps.shape]


def test_auto_validation_batches_are_one_pass_on_a_gpu_and_1000_on_a_cpu(prepared_tiny):
    # AEVB's MNIST model: 13,568 bytes an image, so the 1 GiB budget holds 79,137 images
    vae = VAE(data_dim=784, latent_dim=20, hidden_dims=[500])
    assert bytes_per_pair(vae) == 13_568 and VAL_CUDA_BYTES // 13_568 == 79_137
    assert resolve_val_batch_size("auto", vae, 10_000, "cpu") == VAL_CPU_BATCH == 1000
    assert resolve_val_batch_size("auto", None, 10_000, "cpu") == 1000  # the model is read on CUDA only
    assert resolve_val_batch_size("auto", vae, 10_000, "cuda") == 10_000  # full MNIST's split in one batch
    assert resolve_val_batch_size("auto", vae, 400, torch.device("cuda", 1)) == 400
    assert resolve_val_batch_size("auto", vae, 200_000, "cuda") == 79_137  # the budget, not free memory
    wide = VAE(data_dim=100_000, latent_dim=20, hidden_dims=[8])  # 1.2 MB an image: 894 fit, but 1,000
    assert bytes_per_pair(wide) == 1_200_224 and VAL_CUDA_BYTES // 1_200_224 == 894
    assert resolve_val_batch_size("auto", wide, 10_000, "cuda") == 1000
    assert resolve_val_batch_size(7, vae, 10_000, "cuda") == resolve_val_batch_size(7, None, 5, "cpu") == 7
    # the datamodule's validation batches: 1,000 a batch on the CPU with the default (auto)
    cfg = tiny_config()
    assert cfg.train.val_batch_size == "auto"
    data = VAEData(
        prepared_tiny / "prepared",
        cfg.data_space,
        cfg.train.batch_size,
        cfg.seed,
        latent_dim=cfg.model.latent_dim,
        val_batch_size="auto",
    )
    data.setup()
    sizes = [len(x) for x, _ in data.val_dataloader()]
    assert sum(sizes) == len(data.x_val) and max(sizes) == min(len(data.x_val), 1000)


@pytest.mark.slow
def test_validation_elbo_does_not_depend_on_the_validation_batch_size(prepared_tiny, tmp_path):
    """Each validation image has its own fixed noise draw: batching it differently changes nothing but
    float rounding, and training not at all."""
    curves = {}
    for size in (7, 1000):  # 7: many uneven batches; 1000: the whole validation split in one
        out = copy_prepared(prepared_tiny, tmp_path / str(size))
        metrics = train(tiny_config(f"train.val_batch_size={size}"), out, enable_progress_bar=False)
        curves[size] = (val_curve(out), metrics["train_elbo"])
    (val_small, train_small), (val_whole, train_whole) = curves[7], curves[1000]
    assert len(val_small) == 3
    torch.testing.assert_close(torch.tensor(val_small), torch.tensor(val_whole), rtol=1e-6, atol=0)
    assert train_small == train_whole


@pytest.mark.slow
def test_training_is_deterministic_and_checkpoint_rebuilds(prepared_tiny, tmp_path):
    cfg = tiny_config()
    a = train(cfg, copy_prepared(prepared_tiny, tmp_path / "a"), enable_progress_bar=False)
    b = train(cfg, copy_prepared(prepared_tiny, tmp_path / "b"), enable_progress_bar=False)
    for k in ("train_elbo", "val_elbo", "best_val_elbo"):
        assert a[k] == b[k], k  # bit-identical on CPU for the same seed
    assert a["epochs"] == 3
    # MNIST under a Bernoulli decoder: ~ -543 nats untrained (784 log 2), ~ -100 when well trained
    assert -450 < a["val_elbo"] < -150

    out = tmp_path / "a"
    assert json.loads((out / "metrics" / "train.json").read_text())["val_elbo"] == a["val_elbo"]
    rows = (out / "plots" / "elbo.csv").read_text().splitlines()
    assert rows[0] == "epoch,train_elbo,val_elbo" and len(rows) == 1 + 3
    val = [float(r.split(",")[2]) for r in rows[1:]]
    assert val[0] < val[1] < val[2]  # every epoch improved the validation bound
    ckpts = {
        name: torch.load(out / "models" / f"{name}.ckpt", map_location="cpu", weights_only=True)
        for name in ("best", "last")
    }
    for ckpt in ckpts.values():
        assert ckpt["hyper_parameters"]["vae_config"]["latent_dim"] == 4
    # every epoch improved, so best is the last epoch's weights; best carries no training state, last does
    assert all(torch.equal(v, ckpts["last"]["state_dict"][k]) for k, v in ckpts["best"]["state_dict"].items())
    assert "optimizer_states" not in ckpts["best"] and len(ckpts["last"]["optimizer_states"]) == 1
    vae = load_vae(out / "models" / "best.ckpt")
    assert vae.config["hidden_dims"] == [64] and vae.likelihood.name == "bernoulli"


def test_the_curve_for_dvc_plots_is_named_by_its_data_space_and_alone_in_its_folder(prepared_tiny, tmp_path):
    """plots/elbo_by_space/ (dvc.yaml plots it: a plot per file name) holds the training's curve under its
    data space's name, the rows of plots/elbo.csv; a training of another space into the same directory
    leaves its own file only, so no plot shows an earlier training's curve beside it."""
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    by_space = out / "plots" / "elbo_by_space"
    for likelihood, space in (("bernoulli", "binary"), ("continuous_bernoulli", "continuous")):
        train(tiny_config("train.max_epochs=2", f"likelihood={likelihood}"), out, enable_progress_bar=False)
        assert [p.name for p in by_space.iterdir()] == [f"{space}.csv"], likelihood
        curve = (out / "plots" / "elbo.csv").read_text()
        assert (by_space / f"{space}.csv").read_text() == curve and len(curve.splitlines()) == 1 + 2


@pytest.mark.slow
def test_different_seed_gives_a_different_run(prepared_tiny, tmp_path):
    a = train(
        tiny_config("train.max_epochs=1"),
        copy_prepared(prepared_tiny, tmp_path / "a"),
        enable_progress_bar=False,
    )
    b = train(
        tiny_config("train.max_epochs=1", "seed=1"),
        copy_prepared(prepared_tiny, tmp_path / "b"),
        enable_progress_bar=False,
    )
    assert a["val_elbo"] != b["val_elbo"]


def test_optimizers_are_the_configured_ones():
    from vaerepro.train import VAEModule

    for name, cls in (("adam", torch.optim.Adam), ("adagrad", torch.optim.Adagrad)):
        cfg = tiny_config(f"train.optimizer={name}", "train.lr=0.02")
        vae_config = {"data_dim": 16, "latent_dim": 2, "hidden_dims": [8]}
        opt = VAEModule(vae_config, cfg.train.model_dump(), "binary", True).configure_optimizers()
        assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.02
        assert opt.param_groups[0]["fused"] is True  # the default: torch's fused kernel


def test_adam_betas_and_eps_reach_the_optimiser_and_default_to_torchs():
    from vaerepro.train import VAEModule

    vae_config = {"data_dim": 16, "latent_dim": 2, "hidden_dims": [8]}
    torchs = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]).defaults
    cases = [
        ((), torchs["betas"], torchs["eps"]),  # the defaults: torch's own, so no run's numbers move
        (("train.adam_betas=[0.5,0.99]", "train.adam_eps=1e-4"), (0.5, 0.99), 1e-4),  # IWAE's epsilon
    ]
    for overrides, betas, eps in cases:
        train_cfg = tiny_config(*overrides).train.model_dump()
        opt = VAEModule(vae_config, train_cfg, "binary", True).configure_optimizers()
        assert type(opt) is torch.optim.Adam  # a constant rate: no scheduler
        assert opt.param_groups[0]["betas"] == betas and opt.param_groups[0]["eps"] == eps
    # an older module's train dict, without the keys: torch's defaults too
    older = {k: v for k, v in train_cfg.items() if k not in ("adam_betas", "adam_eps", "lr_schedule")}
    group = VAEModule(vae_config, older, "binary", True).configure_optimizers().param_groups[0]
    assert (group["betas"], group["eps"]) == (torchs["betas"], torchs["eps"])


class _LearningRates(pl.Callback):
    """The optimiser's learning rate at every training batch, as a set per epoch."""

    def __init__(self):
        self.by_epoch: dict[int, set[float]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.by_epoch.setdefault(trainer.current_epoch, set()).add(lr)


def test_the_iwae_schedule_sets_every_epochs_rate_in_training(prepared_tiny, tmp_path):
    """lr_schedule=iwae: epoch 0 (stage 0, one epoch) at train.lr, epoch 1 (stage 1's first) at
    train.lr x 10^(-1/7), every batch; last.ckpt holds the schedule at the next epoch's position."""
    out, rates = copy_prepared(prepared_tiny, tmp_path), _LearningRates()
    cfg = tiny_config("train.max_epochs=2", "train.lr_schedule=iwae", "train.checkpoint_every_s=0")
    train(cfg, out, enable_progress_bar=False, callbacks=[rates])
    assert rates.by_epoch == {0: {1e-3}, 1: {1e-3 * 10 ** (-1 / 7)}}
    last = torch.load(out / "models" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["lr_schedulers"][0]["last_epoch"] == 2
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == iwae_lr(2) == 1e-3 * 10 ** (-1 / 7)


def test_resume_and_evaluation_refuse_a_checkpoint_trained_otherwise():
    """The new keys are compared like the others; a checkpoint from before them counts as trained with
    their old behaviour (torch's init, a constant rate, torch's Adam); init_std matters under init=normal."""

    def hparams(*overrides):
        return checkpoints.expected_hparams(tiny_config(*overrides), 784, True, "digest")

    now = hparams()
    old = {
        **now,
        "vae_config": {k: v for k, v in now["vae_config"].items() if k not in ("init", "init_std")},
        "train": {
            k: v for k, v in now["train"].items() if k not in ("lr_schedule", "adam_betas", "adam_eps")
        },
    }
    assert checkpoints.mismatches(old, now) == [] and checkpoints.mismatches(now, now) == []
    iwae = hparams("train.lr_schedule=iwae", "train.adam_eps=1e-4", "model.init=glorot")
    assert set(checkpoints.mismatches(old, iwae)) == {
        "model.init: checkpoint 'default', config 'glorot'",
        "train.lr_schedule: checkpoint 'constant', config 'iwae'",
        "train.adam_eps: checkpoint 1e-08, config 0.0001",
    }
    assert checkpoints.mismatches(now, iwae, only=checkpoints.MODEL_KEYS) == [
        "model.init: checkpoint 'default', config 'glorot'"
    ]
    betas = hparams("train.adam_betas=[0.5,0.999]")
    assert checkpoints.mismatches(old, betas) == [
        "train.adam_betas: checkpoint [0.9, 0.999], config [0.5, 0.999]"
    ]
    normal = hparams("model.init=normal")
    assert checkpoints.mismatches(normal, hparams("model.init=normal", "model.init_std=0.1")) == [
        "model.init_std: checkpoint 0.01, config 0.1"
    ]
    assert checkpoints.mismatches(now, hparams("model.init_std=0.1")) == []  # unused under init=default


@pytest.mark.parametrize("name", ["adam", "adagrad"])
def test_fused_optimiser_makes_the_same_updates(name):
    """train.fused changes how the update is computed, not what it is: 20 steps of the fused and the
    default implementation end within float32 rounding of each other."""
    from vaerepro.train import VAEModule

    vae_config = {"data_dim": 16, "latent_dim": 2, "hidden_dims": [8]}
    x = (torch.rand(50, 16, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    params = {}
    for fused in (True, False):
        cfg = tiny_config(f"train.optimizer={name}", "train.lr=0.01", f"train.fused={str(fused).lower()}")
        torch.manual_seed(0)
        module = VAEModule(vae_config, cfg.train.model_dump(), "binary", True)
        start = torch.cat([p.detach().clone().reshape(-1) for p in module.parameters()])
        opt = module.configure_optimizers()
        assert bool(opt.param_groups[0]["fused"]) is fused
        for i in range(20):
            eps = torch.randn(1, 50, 2, generator=torch.Generator().manual_seed(i))
            loss = -module.bound(x, eps).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        params[fused] = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        assert (params[fused] - start).abs().max() > 1e-3  # 20 steps at lr 0.01 moved the weights
    torch.testing.assert_close(params[True], params[False], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_early_stopping_ends_a_run_that_stopped_improving(prepared_tiny, tmp_path):
    # lr 1e-9: the weights barely move, so the validation ELBO stops improving at once
    cfg = tiny_config("train.max_epochs=30", "train.lr=1e-9", "train.early_stopping=true", "train.patience=2")
    m = train(cfg, copy_prepared(prepared_tiny, tmp_path), enable_progress_bar=False)
    assert m["epochs"] < 30
    assert len((tmp_path / "plots" / "elbo.csv").read_text().splitlines()) == 1 + m["epochs"]


def test_non_finite_objective_stops_training_and_keeps_the_last_finite_best(prepared_tiny, tmp_path):
    class Poison(pl.Callback):  # the weights become NaN at the start of epoch 1
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                with torch.no_grad():
                    module.vae.decoder[0].weight.fill_(float("nan"))

    out = copy_prepared(prepared_tiny, tmp_path)
    with pytest.raises(
        FloatingPointError, match=r"non-finite training objective .* in epoch 1; lower train.lr"
    ):
        train(tiny_config(), out, enable_progress_bar=False, callbacks=[Poison()])
    best = torch.load(out / "models" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in best["state_dict"].values())


def test_a_sigterm_before_training_takes_the_signal_back_from_lightning_stops_with_143(
    prepared_tiny, tmp_path, monkeypatch
):
    """From the start of fit until StopOnSignal.on_train_start, Lightning's SIGTERM handler is in place; a
    SIGTERM there makes its loops raise SIGTERMException, a SystemExit with exit status 0. Training turns
    it into Stopped (exit status 143), as every other stop."""
    from vaerepro import signals
    from vaerepro.trainer import StopOnSignal

    take_over = StopOnSignal.on_train_start

    def signalled_first(self, trainer, module):
        os.kill(os.getpid(), signal.SIGTERM)  # handled here, by Lightning's handler and then ours
        take_over(self, trainer, module)

    monkeypatch.setattr(StopOnSignal, "on_train_start", signalled_first)
    previous = signal.getsignal(signal.SIGTERM)
    signals.install()
    out = copy_prepared(prepared_tiny, tmp_path)
    try:
        with pytest.raises(Stopped) as stop:
            train(tiny_config(), out, enable_progress_bar=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.exit_status == 143
    assert str(stop.value) == "stopped by SIGTERM: training stopped during epoch 1 of 3; no epoch was saved"
    assert not (out / "metrics" / "train.json").exists()


@pytest.mark.slow
def test_a_crashed_training_resumes_from_last_ckpt_and_ends_where_an_uninterrupted_one_does(
    prepared_tiny, tmp_path
):
    """With last.ckpt written at every epoch end (checkpoint_every_s=0), a training under IWAE's schedule
    that dies in its fifth epoch (epoch 4, the first of stage 2) resumes from the end of the fourth, at the
    rate an uninterrupted run has there, and ends bit for bit where that run does: weights, optimiser and
    scheduler state, curve."""

    class CrashInEpoch4(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == 4 and batch_idx == 3:
                raise Crash

    settings = ("train.max_epochs=5", "train.checkpoint_every_s=0", "train.lr_schedule=iwae")
    whole_rates, resumed_rates = _LearningRates(), _LearningRates()
    whole = train(
        tiny_config(*settings),
        copy_prepared(prepared_tiny, tmp_path / "whole"),
        enable_progress_bar=False,
        callbacks=[whole_rates],
    )
    assert whole_rates.by_epoch == {e: {iwae_lr(e)} for e in range(5)}  # stages 0, 1, 1, 1, 2
    out = copy_prepared(prepared_tiny, tmp_path / "crashed")
    with pytest.raises(Crash):
        train(tiny_config(*settings), out, enable_progress_bar=False, callbacks=[CrashInEpoch4()])
    saved = torch.load(out / "models" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 3  # the end of the fourth epoch, the last one that finished
    resumed = train(
        tiny_config(*settings, "train.resume=true"),
        out,
        enable_progress_bar=False,
        callbacks=[resumed_rates],
    )
    assert resumed_rates.by_epoch == {4: {1e-3 * 10 ** (-2 / 7)}} == {4: whole_rates.by_epoch[4]}
    for k in ("train_elbo", "val_elbo", "best_val_elbo"):
        assert resumed[k] == whole[k], k
    # train_time_s timed the resumed invocation's epochs only: the record says after how many it resumed
    assert resumed["resumed_after_epochs"] == 4 and "resumed_after_epochs" not in whole
    curve = (out / "plots" / "elbo.csv").read_text()
    assert curve == (tmp_path / "whole" / "plots" / "elbo.csv").read_text() and len(curve.splitlines()) == 6
    ends = [
        torch.load(d / "models" / "last.ckpt", map_location="cpu", weights_only=True)
        for d in (tmp_path / "whole", out)
    ]
    assert _same_weights(ends[0]["state_dict"], ends[1]["state_dict"])
    assert (
        ends[0]["lr_schedulers"] == ends[1]["lr_schedulers"]
        and ends[1]["lr_schedulers"][0]["last_epoch"] == 5
    )
    states = [e["optimizer_states"][0] for e in ends]
    assert states[0]["param_groups"] == states[1]["param_groups"]
    for a, b in zip(states[0]["state"].values(), states[1]["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)  # Adam's moments and step counts


class _Calls(pl.Callback):
    """Counts the calls of training_step per epoch and the minibatches each call held."""

    def __init__(self):
        self.per_epoch: list[int] = []
        self.sizes: list[int] = []

    def on_train_epoch_start(self, trainer, module):
        self.per_epoch.append(0)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.per_epoch[-1] += 1
        self.sizes.append(len(batch))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("model.dropout=0.2", "train.grad_clip_value=0.5")])
def test_several_steps_per_call_train_bit_for_bit_as_one(prepared_tiny, tmp_path, extra):
    """trainer.steps_per_call=M hands training_step M consecutive minibatches at a time: the same optimiser
    steps on the same minibatches with the same draws (data space, q's noise, dropout's masks), so on the CPU
    the same training bit for bit: weights, Adam's state, curve, step count. Lightning calls it
    ceil(steps / M) times an epoch; here the last call holds fewer minibatches, the last one short."""
    n, size, m = len(load_prepared(prepared_tiny / "prepared").train), 50, 4
    steps = math.ceil(n / size)  # optimiser steps an epoch
    assert steps % m != 0 and n % size != 0  # a short last call, whose last minibatch is short too
    settings = (*extra, "train.checkpoint_every_s=0")
    calls = _Calls()
    one = train(
        tiny_config(*settings), copy_prepared(prepared_tiny, tmp_path / "one"), enable_progress_bar=False
    )
    many = train(
        tiny_config(*settings, f"trainer.steps_per_call={m}"),
        copy_prepared(prepared_tiny, tmp_path / "many"),
        enable_progress_bar=False,
        callbacks=[calls],
    )
    assert calls.per_epoch == [math.ceil(steps / m)] * 3
    assert calls.sizes[: calls.per_epoch[0]] == [m * size] * (steps // m) + [n - (steps // m) * m * size]
    for k in ("train_elbo", "val_elbo", "best_val_elbo"):
        assert one[k] == many[k], k
    assert (tmp_path / "one" / "plots" / "elbo.csv").read_text() == (
        tmp_path / "many" / "plots" / "elbo.csv"
    ).read_text()
    a, b = (torch.load(tmp_path / d / "models" / "last.ckpt", weights_only=True) for d in ("one", "many"))
    assert a["global_step"] == b["global_step"] == 3 * steps  # every optimiser step counted
    assert _same_weights(a["state_dict"], b["state_dict"])
    states = (a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"])
    for sa, sb in zip(*(s.values() for s in states), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)  # Adam's moments and step counts


@pytest.mark.slow
def test_a_training_resumes_under_another_steps_per_call(prepared_tiny, tmp_path):
    """trainer.steps_per_call is no part of what is trained: a checkpoint written with one step per call
    resumes with three (and the step-size pilots, one step per call whatever it says, choose the same
    rate), ending bit for bit where an uninterrupted training does."""
    settings = ("train.max_epochs=3", "train.checkpoint_every_s=0", "train.lr_candidates=[0.001,0.003]")
    whole = train(
        tiny_config(*settings), copy_prepared(prepared_tiny, tmp_path / "whole"), enable_progress_bar=False
    )
    out = copy_prepared(prepared_tiny, tmp_path / "resumed")
    train(tiny_config(*settings, "train.max_epochs=2"), out, enable_progress_bar=False)
    resumed = train(
        tiny_config(*settings, "train.resume=true", "trainer.steps_per_call=3"),
        out,
        enable_progress_bar=False,
    )
    assert resumed["lr_selection"] == whole["lr_selection"]
    for k in ("train_elbo", "val_elbo", "best_val_elbo"):
        assert resumed[k] == whole[k], k
    ends = [torch.load(d / "models" / "last.ckpt", weights_only=True) for d in (tmp_path / "whole", out)]
    assert ends[0]["global_step"] == ends[1]["global_step"]
    assert _same_weights(ends[0]["state_dict"], ends[1]["state_dict"])


class _EpochEnds(pl.Callback):
    """The weights, the first parameter's Adam state and the global step at every epoch end."""

    def __init__(self):
        self.weights, self.adam, self.steps = [], [], []

    def on_train_epoch_end(self, trainer, module):
        self.weights.append({k: v.detach().clone() for k, v in module.state_dict().items()})
        state = trainer.optimizers[0].state[next(module.parameters())]
        self.adam.append({k: v.detach().clone() for k, v in state.items()})
        self.steps.append(trainer.global_step)


class _Record(_EpochEnds):
    """_EpochEnds, and whether the checkpoint files existed at every epoch start, once the writes queued
    before it have ended (the files are written in the background: trainer.BackgroundCheckpointIO, whose
    teardown waits for them; its next save starts a new thread)."""

    def __init__(self, models):
        super().__init__()
        self.models, self.existed = models, []

    def on_train_epoch_start(self, trainer, module):
        trainer.strategy.checkpoint_io.teardown()
        self.existed.append({f: (self.models / f).exists() for f in ("best.ckpt", "last.ckpt")})


def _same_weights(saved: dict, expected: dict) -> bool:
    return saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)


@pytest.mark.slow
def test_checkpoints_are_written_at_most_every_interval_and_always_at_the_end(prepared_tiny, tmp_path):
    """With an hour's interval last.ckpt is not written at an epoch end, only at the end of training, while
    best.ckpt is on disk from the first validation on; at the end best.ckpt holds the best validation
    epoch's weights and last.ckpt the final state."""
    out = copy_prepared(prepared_tiny, tmp_path)
    record = _Record(out / "models")
    metrics = train(
        tiny_config("train.checkpoint_every_s=3600"), out, enable_progress_bar=False, callbacks=[record]
    )
    assert [e["last.ckpt"] for e in record.existed] == [False] * 3  # an hour has not passed
    assert [e["best.ckpt"] for e in record.existed] == [False, True, True]
    last = torch.load(out / "models" / "last.ckpt", map_location="cpu", weights_only=True)
    # saved at the end of training, after Lightning counted the third epoch
    steps_per_epoch = -(-len(load_prepared(out / "prepared").train) // 50)
    assert last["epoch"] == 3 and last["global_step"] == 3 * steps_per_epoch
    assert _same_weights(last["state_dict"], record.weights[-1])
    best = torch.load(out / "models" / "best.ckpt", map_location="cpu", weights_only=True)
    assert "optimizer_states" not in best  # weights only
    assert _same_weights(best["state_dict"], record.weights[metrics["best_epoch"]])


@pytest.mark.slow
def test_checkpoints_are_written_by_another_thread_with_the_weights_of_their_epoch(
    prepared_tiny, tmp_path, monkeypatch
):
    """Each write runs on a background thread and takes 0.3 s here, while the next epochs train on: every
    file written holds the weights and Adam state of the epoch end that saved it (a snapshot taken then),
    not those at the time of the write, and the fit returns only once every write has ended."""
    writes, atomic_save = [], AtomicCheckpointIO.save_checkpoint

    def slow_save(self, checkpoint, path, storage_options=None):
        time.sleep(0.3)
        on_main = threading.current_thread() is threading.main_thread()
        writes.append((Path(path).name, on_main, copy.deepcopy(checkpoint)))  # what it writes, after the wait
        atomic_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", slow_save)
    out = copy_prepared(prepared_tiny, tmp_path)
    ends = _EpochEnds()
    train(tiny_config("train.checkpoint_every_s=0"), out, enable_progress_bar=False, callbacks=[ends])
    # last.ckpt at every epoch end, best.ckpt at the improving ones (the first at least): none on the
    # training's thread, each of its epoch end's state
    assert [name for name, _, _ in writes].count("last.ckpt") == len(ends.weights) == 3
    assert "best.ckpt" in [name for name, _, _ in writes] and not any(on_main for _, on_main, _ in writes)
    for name, _, ckpt in writes:
        epoch = ends.steps.index(ckpt["global_step"])
        assert _same_weights(ckpt["state_dict"], ends.weights[epoch]), (name, epoch)
        if name == "last.ckpt":
            saved, adam = ckpt["optimizer_states"][0]["state"][0], ends.adam[epoch]  # the first parameter's
            assert saved.keys() == adam.keys() and all(torch.equal(saved[k], adam[k]) for k in saved), epoch
    # and the files are the last writes, whole
    last = torch.load(out / "models" / "last.ckpt", map_location="cpu", weights_only=True)
    assert _same_weights(last["state_dict"], ends.weights[-1])


@pytest.mark.slow
def test_a_failed_checkpoint_write_fails_the_training_and_keeps_the_earlier_file(
    prepared_tiny, tmp_path, monkeypatch
):
    """A write that fails in the background (a full disk) is not lost: the training raises its error,
    and best.ckpt keeps the last weights written whole."""
    writes, atomic_save = [], AtomicCheckpointIO.save_checkpoint

    def full_after_one(self, checkpoint, path, storage_options=None):
        writes.append(Path(path).name)
        if len(writes) > 1:
            raise OSError(28, "No space left on device")
        atomic_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", full_after_one)
    out = copy_prepared(prepared_tiny, tmp_path)
    ends = _EpochEnds()
    with pytest.raises(OSError, match="No space left on device"):
        train(tiny_config("train.checkpoint_every_s=3600"), out, enable_progress_bar=False, callbacks=[ends])
    assert writes[0] == "best.ckpt" and len(writes) >= 2
    best = torch.load(out / "models" / "best.ckpt", map_location="cpu", weights_only=True)
    assert _same_weights(best["state_dict"], ends.weights[0])  # the first epoch's, whole
    assert sorted(p.name for p in (out / "models").iterdir() if p.suffix == ".tmp") == []
    assert not (out / "metrics" / "train.json").exists()  # no numbers of a training that failed


@pytest.mark.slow
def test_a_crashed_training_leaves_the_best_weights_on_disk(prepared_tiny, tmp_path):
    """best.ckpt on disk holds the best epoch's weights when training stops on an error mid-epoch."""

    class CrashInEpoch2(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == 2 and batch_idx == 1:
                self.best_score = float(trainer.checkpoint_callback.best_model_score)
                raise Crash

    out = copy_prepared(prepared_tiny, tmp_path)
    record, crash = _Record(out / "models"), CrashInEpoch2()
    with pytest.raises(Crash):
        train(
            tiny_config("train.checkpoint_every_s=3600"),
            out,
            enable_progress_bar=False,
            callbacks=[record, crash],
        )
    assert not (out / "models" / "last.ckpt").exists()  # never due, and training did not end
    curve = val_curve(out)
    best_epoch = max(range(len(curve)), key=curve.__getitem__)
    assert len(curve) == 2 and curve[best_epoch] == pytest.approx(crash.best_score)
    best = torch.load(out / "models" / "best.ckpt", map_location="cpu", weights_only=True)
    assert _same_weights(best["state_dict"], record.weights[best_epoch])


@pytest.mark.slow
def test_the_progress_bar_shows_each_epoch_with_its_validation_elbo(prepared_tiny, tmp_path, capsys):
    """Lightning's tqdm bar, one line per epoch ending with that epoch's validation ELBO, and no separate
    validation bar."""
    out = copy_prepared(prepared_tiny, tmp_path)
    train(tiny_config(), out, enable_progress_bar=True)
    shown = capsys.readouterr().out
    rows = (out / "plots" / "elbo.csv").read_text().splitlines()[1:]
    for row in rows:
        epoch, _, val = row.split(",")
        assert f"Epoch {epoch}: 100%" in shown
        assert f"val/elbo={Tqdm.format_num(float(val))}" in shown
    assert "Validation" not in shown


@pytest.mark.slow
def test_the_progress_bar_is_drawn_every_refresh_rate_batches_and_at_each_epoch_end(
    prepared_tiny, tmp_path, capsys
):
    """The counts drawn are the multiples of the refresh rate and the epoch's last batch, each epoch."""
    out = copy_prepared(prepared_tiny, tmp_path)
    train(tiny_config("train.max_epochs=2", "train.batch_size=10"), out, enable_progress_bar=True)
    total = -(-len(load_prepared(out / "prepared").train) // 10)  # 42 batches an epoch
    rate = EpochBar().refresh_rate
    counts = {
        (int(e), int(n))
        for e, n in re.findall(rf"Epoch (\d+):[^|]*\|[^|]*\| (\d+)/{total} ", capsys.readouterr().out)
    }
    expected = {0, *range(rate, total, rate), total}
    assert total > 2 * rate and counts == {(e, n) for e in (0, 1) for n in expected}


OBJECTIVES = [["train.estimator=A"], ["train.objective=iwae", "train.num_samples=5"]]


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_two_stochastic_layers_train_and_evaluate(prepared_tiny, tmp_path, objective):
    """A two-layer model (IWAE's two-layer rows) trains with estimator A or the IWAE bound, its checkpoint
    rebuilds a TwoLayerVAE with z = [z1 | z2], and evaluation gives a finite log p(x) no worse than its ELBO
    (a K-sample importance estimate against the 1-sample bound, on average over the test examples)."""
    from vaerepro.evaluate import evaluate
    from vaerepro.model import TwoLayerVAE

    layers = ["model.stochastic_layers=2", "model.latent_dim_2=3", "model.hidden_dims_2=[32]"]
    cfg = tiny_config(*layers, *objective, "train.max_epochs=1", "eval.num_samples=20")
    out = copy_prepared(prepared_tiny, tmp_path)
    metrics = train(cfg, out, enable_progress_bar=False)
    assert metrics["epochs"] == 1 and torch.isfinite(torch.tensor(metrics["val_elbo"]))
    vae = load_vae(out / "models" / "best.ckpt")
    assert isinstance(vae, TwoLayerVAE) and vae.z_dim == cfg.model.latent_dim + 3
    ev = evaluate(cfg, out, progress=False)
    assert ev["log_px"] >= ev["elbo"] and torch.isfinite(torch.tensor(ev["log_px"]))
    with pytest.raises(checkpoints.CheckpointError, match="stochastic_layers"):
        evaluate(tiny_config(*objective, "train.max_epochs=1"), out, progress=False)  # a one-layer config


def test_training_data_move_to_a_cuda_device_only_when_they_fit(monkeypatch):
    x, eps = torch.zeros(10, 4, dtype=torch.uint8), torch.zeros(10, 1, 2)  # 40 + 80 bytes
    assert all(a is b for a, b in zip(resident(torch.device("cpu"), x, eps), (x, eps), strict=True))
    # a CUDA device whose free memory they would take more than RESIDENT_FRACTION of: left where they are
    # (with room, they move: tests/test_gpu.py)
    free = int(120 / RESIDENT_FRACTION) - 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 10 * free))
    assert all(a is b for a, b in zip(resident(torch.device("cuda"), x, eps), (x, eps), strict=True))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"text\n", "not written by torch.save"),  # torch's unpickler: IndexError
        (b"hello world", "not written by torch.save"),  # KeyError
        (b"\x80\x02}q\x00.", "not written by torch.save"),  # a plain pickle
        (b"", "not written by torch.save"),  # EOFError
        (b"PK\x03\x04garbage", "truncated or damaged"),  # a zip archive's start, cut off
    ],
)
def test_any_unreadable_checkpoint_is_a_checkpoint_error_naming_the_file(tmp_path, data, why):
    """Whatever a file holds, reading it as a checkpoint fails with CheckpointError (the command line's one
    line, exit 2), never with the exception torch's unpickler happens to raise (a traceback)."""
    f = tmp_path / "best.ckpt"
    f.write_bytes(data)
    with pytest.raises(checkpoints.CheckpointError, match=rf"best\.ckpt: not a readable checkpoint, {why}"):
        checkpoints.read(f)


def test_a_checkpoint_vaerepro_did_not_write_is_refused_naming_the_file(tmp_path):
    f = tmp_path / "best.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, f)  # torch reads it: no vaerepro model config
    with pytest.raises(checkpoints.CheckpointError, match=r"best\.ckpt: not a vaerepro checkpoint \(no "):
        checkpoints.read(f)


def test_training_refuses_an_unbounded_likelihood_on_float_data_before_writing(tmp_path):
    """Float pixels in [0, 1] are not dequantized: a Gaussian with a learned sigma and no floor
    (likelihood.scale=log_variance) would have an unbounded density on them. The config alone cannot tell
    (the data's dtype decides), so the train stage refuses it once it has read prepared/, writing nothing."""
    from vaerepro import data
    from vaerepro.formats import DataError

    x = np.random.default_rng(0).random((60, 16)).astype(np.float32)
    x[:, :4] = 0.0  # pixels exactly on a value, as in most float image sets (the background)
    np.savez(tmp_path / "f.npz", x=x)
    out = tmp_path / "run"
    data.prepare("npz", tmp_path, out / "prepared", path=tmp_path / "f.npz")
    own = ("data=npz", f"data.path={tmp_path / 'f.npz'}", "likelihood=gaussian", "train.batch_size=10")
    cfg = tiny_config(*own, "likelihood.scale=log_variance")
    with pytest.raises(DataError, match=r"prepared: likelihood.scale=log_variance \(a learned sigma"):
        train(cfg, out, enable_progress_bar=False)
    assert sorted(p.name for p in out.iterdir()) == ["prepared"]


def test_training_refuses_prepared_data_made_from_another_version_of_the_npz(tmp_path):
    """DVC's prepare stage does not depend on the file data.path names: after that file changes, `dvc
    repro` trains on the old prepared/ unless the stage itself sees the change. It does, by md5."""
    from vaerepro import data
    from vaerepro.formats import DataError

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "f.npz", x=rng.random((60, 16)).astype(np.float32))
    out = tmp_path / "run"
    data.prepare("npz", tmp_path, out / "prepared", path=tmp_path / "f.npz")
    np.savez(tmp_path / "f.npz", x=rng.random((80, 16)).astype(np.float32))  # the user's new version
    cfg = tiny_config(
        "data=npz", f"data.path={tmp_path / 'f.npz'}", "train.batch_size=10", "data.max_examples=null"
    )
    with pytest.raises(DataError, match=r"prepared: made from another version of .*f\.npz \(md5 "):
        train(cfg, out, enable_progress_bar=False)
    assert sorted(p.name for p in out.iterdir()) == ["prepared"]
    data.prepare("npz", tmp_path, out / "prepared", path=tmp_path / "f.npz")  # as the message says
    assert train(cfg, out, enable_progress_bar=False)["epochs"] == 3


STRATEGY_REFUSED = (
    "trainer.strategy: vaerepro trains with auto, single_device or a ddp strategy (ddp, ddp_spawn, ddp_fork, "
    "ddp_notebook, each also with _find_unused_parameters_true or _false), not Lightning's sharded or XLA "
    "ones (fsdp, deepspeed, xla), whose checkpoints its resume is not built for (given: {!r})"
)


@pytest.mark.slow
def test_the_trainer_section_is_checked_against_lightning_and_this_machine(monkeypatch):
    """auto, single_device and Lightning's ddp strategies, in any case as Lightning lowers it (its other
    strategies, and names it does not know, are refused with the config); no GPU accelerator without a CUDA
    device; no float16 mixed precision on the CPU (Lightning trains bfloat16)."""
    from conftest import compose
    from vaerepro import config as config_mod
    from vaerepro.config import ConfigError
    from vaerepro.devices import check_trainer

    def trainer(*overrides):
        return config_mod.validate(compose(*overrides)).trainer

    for name in ("auto", "ddp", "DDP", "ddp_spawn", "ddp_find_unused_parameters_true", "single_device"):
        check_trainer(trainer(f"trainer.strategy={name}"))
    for name in ("fsdp", "deepspeed_stage_2", "xla", "single_tpu", "foo"):
        with pytest.raises(ConfigError) as err:
            trainer(f"trainer.strategy={name}")
        assert str(err.value) == STRATEGY_REFUSED.format(name)
    with pytest.raises(ConfigError, match="trainer.precision=16-mixed: float16 mixed precision runs on CUDA"):
        check_trainer(trainer("trainer.precision=16-mixed"))
    check_trainer(trainer("trainer.precision=bf16-mixed", "train.fused=false"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu: this machine has no CUDA device"):
        check_trainer(trainer("trainer=gpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_trainer(trainer("trainer=gpu", "trainer.devices=2"))
    with pytest.raises(ConfigError, match=r"trainer.devices=4: this machine has 2 CUDA device\(s\)"):
        check_trainer(trainer("trainer=gpu", "trainer.devices=4"))


def test_the_strategies_vaerepro_accepts_are_lightnings_single_process_and_ddp_ones():
    """config.STRATEGIES is written out (importing Lightning to read its registry would cost every config
    validation seconds): each name is Lightning's, and every ddp strategy Lightning registers is in it."""
    from lightning.pytorch.strategies import StrategyRegistry

    from vaerepro.config import STRATEGIES

    known = set(StrategyRegistry.available_strategies())
    assert set(STRATEGIES) - {"auto"} <= known
    assert {n for n in known if n.startswith("ddp")} | {"auto", "single_device"} == set(STRATEGIES)


def test_vaerepro_run_refuses_what_the_check_stage_refuses_before_any_work(tmp_path, monkeypatch):
    """trainer=gpu on a machine without one: before, the train stage refused it after the data were fetched
    and prepared."""
    from vaerepro import cli
    from vaerepro.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tiny_config("trainer=gpu", "eval.device=cpu", raw_dir=tmp_path / "raw")
    with pytest.raises(ConfigError, match="^trainer.accelerator=gpu: this machine has no CUDA device"):
        cli.run_pipeline(cfg, tmp_path / "run", tmp_path, progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "raw").exists()  # nothing fetched or prepared


def test_ddp_without_a_gpu_names_ddp_in_cpu_processes_too(monkeypatch):
    """trainer=ddp on a machine without a GPU said "use trainer=cpu" alone, which drops DDP; the README's
    other way, DDP in CPU processes, is named too."""
    from conftest import compose
    from vaerepro.config import ConfigError, validate
    from vaerepro.devices import check_trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ddp = validate(compose("trainer=ddp", "trainer.devices=2")).trainer
    message = "this machine has no CUDA device; use trainer=cpu, or trainer.accelerator=cpu for DDP in CPU"
    with pytest.raises(ConfigError, match=message):
        check_trainer(ddp)
    check_trainer(validate(compose("trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu")).trainer)


def test_an_mps_accelerator_without_an_mps_device_is_refused(monkeypatch):
    """Lightning's MisconfigurationException traceback when the Trainer was built, before."""
    from conftest import compose
    from vaerepro import config as config_mod
    from vaerepro.config import ConfigError
    from vaerepro.devices import check_trainer

    trainer = config_mod.validate(compose("trainer.accelerator=mps")).trainer
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        check_trainer(trainer)
    assert str(err.value) == (
        "trainer.accelerator=mps: this machine has no MPS device (Apple silicon); use trainer=cpu"
    )
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    check_trainer(trainer)


class SecondTraining(pl.Callback):
    """At the end of the first epoch, runs `vaerepro train` of another config into the same directory."""

    def __init__(self, params: Path, out: Path):
        self.params, self.out, self.proc = params, out, None

    def on_train_epoch_end(self, trainer, pl_module):
        if self.proc is None:
            env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
            env.pop("VAEREPRO_DEBUG", None)
            cmd = ["vaerepro", "train", "--params", str(self.params), "--out", str(self.out)]
            self.proc = subprocess.run(cmd, cwd=self.out, env=env, capture_output=True, text=True, timeout=99)


@pytest.mark.slow
def test_a_second_training_into_the_same_directory_is_refused_while_the_first_trains(prepared_tiny, tmp_path):
    """Two trainings into one models/ at once would each write the other's checkpoints: a train.json, an
    MLflow run's best.ckpt artifact or an evaluation of one model under the other's config. The second is
    refused in one line, and the first ends with its own files."""
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    (out / "dvc.yaml").write_text("stages: {}\n")  # marks the project root
    params = out / "other.yaml"
    params.write_text(yaml.safe_dump(compose(*TINY, "tracking.enabled=false", "model.latent_dim=5")))
    second = SecondTraining(params, out)
    train(tiny_config(), out, enable_progress_bar=False, callbacks=[second])
    lines = [line for line in second.proc.stderr.splitlines() if line.startswith("vaerepro train: ")]
    assert second.proc.returncode == 2 and len(lines) == 1, second.proc.stderr
    assert "Traceback" not in second.proc.stderr, second.proc.stderr
    assert "models" in lines[0] and "another training" in lines[0] and "Traceback" not in lines[0], lines[0]
    recorded = json.loads((out / "metrics" / "train.json").read_text())
    assert recorded["config"]["model"]["latent_dim"] == 4 and recorded["epochs"] == 3
    for name in ("best", "last"):
        saved = torch.load(out / "models" / f"{name}.ckpt", map_location="cpu", weights_only=True)
        assert saved["hyper_parameters"]["vae_config"]["latent_dim"] == 4, name
    train(tiny_config(), out, enable_progress_bar=False)  # the directory is free again once it ended
