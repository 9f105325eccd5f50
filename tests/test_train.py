"""Training: batching, determinism, checkpoints that rebuild the model without Lightning."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import copy_prepared, tiny_config
from vaerepro.evaluate import load_vae
from vaerepro.train import EpochBatches, TensorBatches, train


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_batches_shard_one_permutation(world):
    n, bs = 103, 10
    shards = [EpochBatches(n, bs, shuffle=True, seed=7, rank=r, world=world) for r in range(world)]
    for s in shards:
        s.set_epoch(4)
    seen = torch.cat([b for s in shards for b in s])
    assert sorted(seen.tolist()) == list(range(n))  # disjoint and complete
    assert all(len(list(s)) == len(s) for s in shards)
    first = [next(iter(s)) for s in shards]
    assert all(len(b) == bs for b in first)  # per-device batch size
    # a new epoch is a new order; the same epoch is the same order
    again = EpochBatches(n, bs, shuffle=True, seed=7, rank=0, world=world)
    again.set_epoch(4)
    assert torch.equal(next(iter(again)), first[0])
    again.set_epoch(5)
    assert not torch.equal(next(iter(again)), first[0])


def test_epoch_batches_drop_last_keeps_ranks_in_step():
    shards = [EpochBatches(25, 4, shuffle=False, seed=0, rank=r, world=2, drop_last=True) for r in range(2)]
    lens = [[len(b) for b in s] for s in shards]
    assert lens[0] == lens[1] == [4, 4, 4]


def test_tensor_batches_gathers_a_whole_batch():
    x = torch.arange(20).reshape(10, 2)
    idx = torch.tensor([3, 1, 4])
    assert torch.equal(TensorBatches(x)[idx], x[idx])


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
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = torch.load(out / "models" / name, map_location="cpu", weights_only=True)
        assert ckpt["hyper_parameters"]["vae_config"]["latent_dim"] == 4
    vae = load_vae(out / "models" / "best.ckpt")
    assert vae.config["hidden_dims"] == [64] and vae.likelihood.name == "bernoulli"


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


@pytest.mark.slow
def test_early_stopping_ends_a_run_that_stopped_improving(prepared_tiny, tmp_path):
    # lr 1e-9: the weights barely move, so the validation ELBO stops improving at once
    cfg = tiny_config("train.max_epochs=30", "train.lr=1e-9", "train.early_stopping=true", "train.patience=2")
    m = train(cfg, copy_prepared(prepared_tiny, tmp_path), enable_progress_bar=False)
    assert m["epochs"] < 30
    assert len((tmp_path / "plots" / "elbo.csv").read_text().splitlines()) == 1 + m["epochs"]
