"""AEVB's step-size selection (train.lr_candidates): the pilots' bounds, the choice, and a training at the
chosen rate that is the training `train.lr=<chosen>` gives, resumed or not."""

from __future__ import annotations

import json
import math
import random
import shutil

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from conftest import compose, copy_prepared, tiny_config
from vaerepro import checkpoints, estimators, stepsize
from vaerepro import config as config_mod
from vaerepro.config import ConfigError
from vaerepro.data import load_prepared, to_space
from vaerepro.datamodule import TRAIN_STREAM, EpochBatches, VAEData, batch_seed
from vaerepro.document import differences
from vaerepro.model import build_vae
from vaerepro.train import build_module, train

# AEVB's own set, with its optimiser (Adagrad); 12 pilot steps cross the tiny split's epoch of 9 batches
# (420 training digits in batches of 50), so the pilots also run the reshuffled batches of epoch 1.
PAPER = ("train.optimizer=adagrad", "train.lr_candidates=[0.01,0.02,0.1]", "train.lr_pilot_steps=12")
EPOCHS = "train.max_epochs=2"
TRAIN_JSON_KEYS = {
    "train_elbo",
    "val_elbo",
    "best_val_elbo",
    "epochs",
    "best_epoch",
    "train_time_s",
    "best_checkpoint_sha256",
    "config",
    "device",
    "versions",
    "commit",
}


def _load(out, name):
    return torch.load(out / "models" / name, map_location="cpu", weights_only=True)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def selected(prepared_tiny, tmp_path_factory):
    """A 2-epoch training with AEVB's step-size selection: (out_dir, train.json)."""
    out = copy_prepared(prepared_tiny, tmp_path_factory.mktemp("selected"))
    train(tiny_config(*PAPER, EPOCHS), out, enable_progress_bar=False)
    return out, json.loads((out / "metrics" / "train.json").read_text())


@pytest.fixture(scope="module")
def plain(prepared_tiny, tmp_path_factory, selected):
    """The same training at train.lr=<the rate the selection chose>, without candidates: (out_dir,
    train.json)."""
    chosen = selected[1]["lr_selection"]["chosen"]
    out = copy_prepared(prepared_tiny, tmp_path_factory.mktemp("plain"))
    train(
        tiny_config("train.optimizer=adagrad", f"train.lr={chosen}", EPOCHS), out, enable_progress_bar=False
    )
    return out, json.loads((out / "metrics" / "train.json").read_text())


def _hand_pilot(cfg: config_mod.Config, prepared, lr: float, steps: int) -> float:
    """The pilot written out without Lightning or the training module: the weights the seed draws first,
    torch's fused Adagrad at `lr`, the sampler's batches with each batch's seeded binarisation and q noise,
    the ELBO (estimator B) per example, `steps` steps; the mean over steps of each batch's mean bound."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    splits = load_prepared(prepared / "prepared")
    # the VAE the config describes (its constructor arguments, as a checkpoint records them)
    vae = build_vae(checkpoints.expected_hparams(cfg, splits.data_dim, True, None)["vae_config"])
    opt = torch.optim.Adagrad(vae.parameters(), lr=lr, fused=True)
    x_train = torch.from_numpy(np.ascontiguousarray(splits.train))  # (N, 784) uint8
    sampler = EpochBatches(len(x_train), cfg.train.batch_size, shuffle=True, seed=cfg.seed)
    means, epoch = [], 0
    while len(means) < steps:
        sampler.set_epoch(epoch)
        for i, idx in enumerate(sampler):
            g = torch.Generator().manual_seed(batch_seed(cfg.seed, TRAIN_STREAM, epoch, i))
            x = to_space(x_train[idx], "binary", quantized=True, generator=g)  # (B, 784)
            eps = torch.randn((1, len(idx), cfg.model.latent_dim), generator=g)  # (K=1, B, Z)
            bound = estimators.elbo(vae, x, 1, "B", eps)  # (B,) nats
            opt.zero_grad()
            (-bound.mean()).backward()
            opt.step()
            means.append(bound.detach().to(torch.float64).mean().item())
            if len(means) == steps:
                break
        epoch += 1
    return sum(means) / steps


def test_pilot_bounds_are_a_hand_written_pilots_and_the_best_is_chosen(selected, prepared_tiny):
    out, metrics = selected
    record = metrics["lr_selection"]
    assert record["candidates"] == [0.01, 0.02, 0.1] and record["pilot_steps"] == 12
    cfg = tiny_config(*PAPER, EPOCHS)
    expected = [_hand_pilot(cfg, prepared_tiny, lr, 12) for lr in (0.01, 0.02, 0.1)]
    # the same float32 steps up to the rounding of the loss's scale (-sum/N in training, -mean here)
    np.testing.assert_allclose(record["pilot_bounds"], expected, rtol=1e-6, atol=0)
    assert record["chosen"] == record["candidates"][int(np.argmax(expected))]
    # the binarised digits' ELBO at a random init is about -543 nats (784 ln 2): the chosen pilot improves on
    # it (here Adagrad at 0.1 overshoots: about -5,750 nats over its 12 steps)
    assert max(record["pilot_bounds"]) > -543


def test_a_selection_trains_what_train_lr_set_to_the_chosen_rate_trains(selected, plain):
    (out_s, sel), (out_p, pla) = selected, plain
    assert set(sel) == TRAIN_JSON_KEYS | {"lr_selection"} and set(pla) == TRAIN_JSON_KEYS
    # the same numbers; the checkpoints' bytes differ (the selected one records its lr_selection), and so do
    # their digests
    other = ("lr_selection", "train_time_s", "best_checkpoint_sha256", "config")
    same = [{k: v for k, v in d.items() if k not in other} for d in (sel, pla)]
    assert same[0] == same[1]
    # each records the configuration it ran under: the selected one its candidates, the plain one the rate
    assert differences(sel["config"], pla["config"]) == {
        "train.lr": (pla["config"]["train"]["lr"], sel["config"]["train"]["lr"]),
        "train.lr_candidates": (None, [0.01, 0.02, 0.1]),
        "train.lr_pilot_steps": (100, 12),
    }
    assert (out_s / "plots" / "elbo.csv").read_text() == (out_p / "plots" / "elbo.csv").read_text()
    for name in ("best.ckpt", "last.ckpt"):  # bit for bit on the CPU
        assert _same_weights(_load(out_s, name)["state_dict"], _load(out_p, name)["state_dict"]), name
    # the checkpoint says what ran: the chosen rate, and the candidates it was chosen from
    hp = _load(out_s, "best.ckpt")["hyper_parameters"]["train"]
    assert hp["lr"] == sel["lr_selection"]["chosen"] and hp["lr_candidates"] == [0.01, 0.02, 0.1]


def test_a_training_without_candidates_records_no_selection(plain):
    out, metrics = plain
    assert "lr_selection" not in metrics
    assert stepsize.recorded(_load(out, "last.ckpt")) is None
    assert tiny_config().train.lr_candidates is None and tiny_config().train.lr_pilot_steps == 100


def _choose(prepared_tiny, *overrides):
    """stepsize.choose as train.train calls it, on the tiny data and config with `overrides`."""
    cfg = tiny_config(*overrides)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = VAEData(prepared_tiny / "prepared", cfg.data_space, cfg.train.batch_size, cfg.seed, latent_dim=4)
    data.setup()
    return stepsize.choose(cfg, data, lambda c: build_module(c, data))


def test_a_rate_that_cannot_move_the_weights_loses_and_the_first_of_equal_ones_wins(prepared_tiny):
    # 1e-9: the weights stay at their init (about -543 nats); Adam at 0.05 learns within 5 steps
    moving = _choose(prepared_tiny, "train.lr_candidates=[1e-9,0.05]", "train.lr_pilot_steps=5")
    assert moving["chosen"] == 0.05
    assert moving["pilot_bounds"][1] > moving["pilot_bounds"][0] + 20
    # Adam's first steps move each weight by about lr; 1e-30 and 2e-30 are below half a float32 ulp of any
    # weight larger than ~1e-23 in size, so both pilots keep the initial weights and score the same bound:
    # a tie, which the first candidate wins in either order
    for rates in ([2e-30, 1e-30], [1e-30, 2e-30]):
        tie = _choose(prepared_tiny, f"train.lr_candidates=[{rates[0]},{rates[1]}]", "train.lr_pilot_steps=3")
        assert tie["pilot_bounds"][0] == tie["pilot_bounds"][1] and tie["chosen"] == rates[0]


def test_the_pilots_leave_the_global_random_state_as_they_found_it(prepared_tiny):
    cfg = tiny_config("train.lr_candidates=[0.001,0.01]", "train.lr_pilot_steps=2")
    data = VAEData(prepared_tiny / "prepared", cfg.data_space, cfg.train.batch_size, cfg.seed, latent_dim=4)
    data.setup()
    pl.seed_everything(5, verbose=False)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # noqa: NPY002
    stepsize.choose(cfg, data, lambda c: build_module(c, data))
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())  # noqa: NPY002
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]


def test_best_index_is_the_highest_finite_score_the_first_of_equal_ones():
    assert stepsize.best_index([-300.0, -200.0, -250.0]) == 1
    assert stepsize.best_index([-200.0, -300.0, -200.0]) == 0
    assert stepsize.best_index([math.nan, -500.0, -math.inf]) == 1  # a diverged pilot loses
    with pytest.raises(FloatingPointError, match="train.lr_candidates"):
        stepsize.best_index([math.nan, math.inf])


def test_a_resumed_selection_is_not_run_again_and_ends_as_an_uninterrupted_one(
    selected, prepared_tiny, tmp_path, monkeypatch
):
    out = copy_prepared(prepared_tiny, tmp_path / "resumed")
    train(tiny_config(*PAPER, "train.max_epochs=1"), out, enable_progress_bar=False)

    def no_pilot(*args, **kwargs):
        raise AssertionError("the pilot ran again")

    monkeypatch.setattr(stepsize, "pilot", no_pilot)
    metrics = train(tiny_config(*PAPER, EPOCHS, "train.resume=true"), out, enable_progress_bar=False)
    whole_out, whole = selected
    assert metrics["lr_selection"] == whole["lr_selection"]
    assert json.loads((out / "metrics" / "train.json").read_text())["lr_selection"] == whole["lr_selection"]
    assert (out / "plots" / "elbo.csv").read_text() == (whole_out / "plots" / "elbo.csv").read_text()
    assert _same_weights(_load(out, "last.ckpt")["state_dict"], _load(whole_out, "last.ckpt")["state_dict"])


def test_resuming_refuses_a_checkpoint_selected_otherwise(selected, plain, tmp_path):
    """A checkpoint trained without candidates, resumed with them, and the other way round: refused before
    anything is touched, naming train.lr_candidates."""
    chosen = selected[1]["lr_selection"]["chosen"]
    cases = [
        (plain[0], (*PAPER, EPOCHS)),
        (selected[0], ("train.optimizer=adagrad", f"train.lr={chosen}", EPOCHS)),
    ]
    for i, (src, overrides) in enumerate(cases):
        out = tmp_path / str(i)
        shutil.copytree(src, out)
        before = (out / "models" / "last.ckpt").read_bytes()
        with pytest.raises(checkpoints.CheckpointError, match=r"train\.lr_candidates: checkpoint"):
            train(tiny_config(*overrides, "train.resume=true"), out, enable_progress_bar=False)
        assert (out / "models" / "last.ckpt").read_bytes() == before


@pytest.mark.slow
def test_the_pilot_length_is_compared_only_with_candidates():
    def hp(*overrides):
        return checkpoints.expected_hparams(tiny_config(*overrides), 784, True, "digest")

    assert checkpoints.mismatches(hp(), hp("train.lr_pilot_steps=5")) == []
    with_candidates = ("train.lr_candidates=[0.01,0.1]",)
    assert checkpoints.mismatches(hp(*with_candidates), hp(*with_candidates, "train.lr_pilot_steps=5")) == [
        "train.lr_pilot_steps: checkpoint 100, config 5"
    ]
    # a checkpoint from before the keys existed trained at train.lr, without a selection
    older = hp()
    older["train"] = {k: v for k, v in older["train"].items() if not k.startswith("lr_")}
    older["train"]["lr_schedule"] = "constant"
    assert checkpoints.mismatches(older, hp()) == []
    assert checkpoints.mismatches(older, hp(*with_candidates)) == [
        "train.lr_candidates: checkpoint None, config [0.01, 0.1]"
    ]


@pytest.mark.parametrize(
    ("overrides", "hint"),
    [
        (["train.lr_candidates=[0.01]"], "at least 2 items"),
        (["train.lr_candidates=[0.01,-0.1]"], "greater than 0"),
        (["train.lr_candidates=[0.01,0]"], "greater than 0"),
        (["train.lr_candidates=[0.01,inf]"], "finite number"),
        (["train.lr_candidates=[0.01,0.1,0.01]"], "repeated rate(s) 0.01"),
        (["train.lr_candidates=[0.01,0.1]", "trainer.devices=2"], "runs on one device"),
        (["train.lr_candidates=[0.01,0.1]", "trainer.num_nodes=2"], "runs on one device"),
        (["train.lr_candidates=[0.01,0.1]", "trainer.accelerator=gpu", "trainer.devices=auto"], "one device"),
    ],
)
def test_bad_candidates_name_the_key(overrides, hint):
    with pytest.raises(ConfigError) as err:
        config_mod.validate(compose(*overrides))
    msg = str(err.value)
    assert "train.lr_candidates" in msg and hint in msg and "\n" not in msg, msg


def test_pilot_steps_must_be_positive_and_one_device_is_fine():
    with pytest.raises(
        ConfigError, match=r"train\.lr_pilot_steps: Input should be greater than or equal to 1"
    ):
        config_mod.validate(compose("train.lr_pilot_steps=0"))
    cfg = config_mod.validate(compose("train.lr_candidates=[0.01,0.02,0.1]", "trainer.devices=auto"))
    assert cfg.train.lr_candidates == [0.01, 0.02, 0.1] and cfg.trainer.accelerator == "cpu"
    assert config_mod.validate(compose("trainer.devices=2")).train.lr_candidates is None


@pytest.mark.slow
def test_the_chosen_rate_is_an_mlflow_param_of_the_run(prepared_tiny, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from vaerepro.tracking.training import TrainingRun

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    cfg = tiny_config(
        "train.lr_candidates=[1e-9,0.05]", "train.lr_pilot_steps=5", "train.max_epochs=1", tracking=True
    )
    train(cfg, out, enable_progress_bar=False, tracker=TrainingRun(cfg, tmp_path, out / "models"))
    run_id = json.loads((out / "models" / "mlflow_run.json").read_text())["run_id"]
    params = MlflowClient(uri).get_run(run_id).data.params
    assert params["train/lr_selected"] == "0.05"
    # train.lr, the column runs are compared by, is the rate training ran at, not the unused configured one
    assert params["train.lr_candidates"] == "[1e-09, 0.05]" and params["train.lr"] == "0.05"
    assert cfg.train.lr == 0.001


@pytest.mark.slow
def test_a_training_that_fails_after_the_pilots_shows_the_chosen_rate(prepared_tiny, tmp_path, monkeypatch):
    """The chosen rate is logged when the run opens, after the pilots: a training that then fails (here
    while writing its records, after fitting) or is killed is FAILED with train.lr the rate it ran at."""
    from mlflow import MlflowClient

    from vaerepro import train as train_mod
    from vaerepro.tracking.training import TrainingRun

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def broken(path):
        raise OSError(f"{path}: disk gone")

    monkeypatch.setattr(train_mod, "file_sha256", broken)
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    cfg = tiny_config(
        "train.lr_candidates=[1e-9,0.05]", "train.lr_pilot_steps=5", "train.max_epochs=1", tracking=True
    )
    with pytest.raises(OSError, match="disk gone"):
        train(cfg, out, enable_progress_bar=False, tracker=TrainingRun(cfg, tmp_path, out / "models"))
    run_id = json.loads((out / "models" / "mlflow_run.json").read_text())["run_id"]
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.params["train.lr"] == run.data.params["train/lr_selected"] == "0.05"


@pytest.mark.slow
def test_a_resumed_run_that_holds_the_configured_rate_as_train_lr_finishes(
    prepared_tiny, tmp_path, monkeypatch
):
    """A training run logged by vaerepro before train.lr became the pilots' choice holds the configured
    train.lr (0.001). Resumed, its training finished and then failed in MLflow (train.lr cannot change to
    0.05) with a traceback; the chosen rate goes to the tag changed.train.lr, as other changed values do."""
    import sqlite3

    from mlflow import MlflowClient

    from vaerepro.tracking.training import TrainingRun

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    chosen = ("train.lr_candidates=[1e-9,0.05]", "train.lr_pilot_steps=5")
    cfg = tiny_config(*chosen, "train.max_epochs=1", tracking=True)
    train(cfg, out, enable_progress_bar=False, tracker=TrainingRun(cfg, tmp_path, out / "models"))
    run_id = json.loads((out / "models" / "mlflow_run.json").read_text())["run_id"]
    with sqlite3.connect(db) as con:  # as an earlier vaerepro logged it: the configured, unused rate
        con.execute("UPDATE params SET value = '0.001' WHERE key = 'train.lr' AND run_uuid = ?", (run_id,))
    more = tiny_config(*chosen, "train.max_epochs=2", "train.resume=true", tracking=True)
    train(more, out, enable_progress_bar=False, tracker=TrainingRun(more, tmp_path, out / "models"))
    assert json.loads((out / "models" / "mlflow_run.json").read_text())["run_id"] == run_id  # went on in it
    run = MlflowClient(f"sqlite:///{db}").get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train/lr_selected"] == "0.05"
    assert run.data.tags["changed.train.lr"] == "0.05"
