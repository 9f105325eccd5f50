"""A validation ELBO that becomes NaN or infinite while the epoch's training objective is finite: the
weights of the epoch's last optimiser step diverged, and validation is the first to see them. Reached with
full-batch training (one step an epoch, every step the last) at a rate that diverges: here 420 training
digits in one batch of 500 at lr 1000 (Adam's first step moves every weight by about lr) give a training
ELBO of -551 nats and a NaN validation ELBO in epoch 0; at lr 10, epoch 0 is finite (-1e29 nats) and
epoch 1's validation ELBO is -inf.

Before the check, the NaN epoch was chosen as the best one (ModelCheckpoint takes NaN for -inf and saves
when it has no best yet): best.ckpt held its weights, train.json said best_epoch 0, best_val_elbo
-Infinity and val_elbo NaN (neither is JSON), MLflow got val/elbo = nan, and the training ended as a
success (with early stopping too, which stops on a non-finite value). Now training stops at that epoch as
it does on a non-finite training objective: FloatingPointError, one line, nothing recorded of the epoch."""

from __future__ import annotations

import pytest
import torch

from conftest import copy_prepared, curve, tiny_config
from vaerepro.train import train

FULL_BATCH = ("train.batch_size=500", "train.checkpoint_every_s=0")


class Tracker:
    """A tracker (train.RunTracker) without a store: what train tells it."""

    def __init__(self):
        self.calls = []

    def open(self, **kwargs):
        self.calls.append("open")

    def finish(self, metrics):
        self.calls.append("finish")

    def fail(self, exc, *, interrupted):
        self.calls.append(("fail", type(exc).__name__))


@pytest.mark.parametrize("early_stopping", [False, True])
def test_a_nan_validation_elbo_in_the_first_epoch_stops_training_and_is_never_the_best(
    prepared_tiny, tmp_path, early_stopping
):
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    cfg = tiny_config(*FULL_BATCH, "train.lr=1000", f"train.early_stopping={str(early_stopping).lower()}")
    tracker = Tracker()
    with pytest.raises(FloatingPointError) as err:
        train(cfg, out, enable_progress_bar=False, tracker=tracker)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(
        "non-finite validation ELBO (val/elbo = nan) in epoch 0, after a finite training"
    ), msg
    assert "lower train.lr" in msg
    assert tracker.calls == ["open", ("fail", "Diverged")]
    assert not (out / "models" / "best.ckpt").exists()  # no epoch had a validation ELBO to be the best
    assert (
        not (out / "metrics" / "train.json").exists()
        and not (out / "metrics" / "train_summary.json").exists()
    )
    assert curve(out) == []


def test_an_infinite_validation_elbo_after_finite_epochs_keeps_the_last_finite_best(prepared_tiny, tmp_path):
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    with pytest.raises(
        FloatingPointError, match=r"non-finite validation ELBO \(val/elbo = -inf\) in epoch 1,"
    ):
        train(tiny_config(*FULL_BATCH, "train.lr=10"), out, enable_progress_bar=False)
    (row,) = curve(out)  # epoch 0 only, finite
    assert row["epoch"] == 0 and torch.isfinite(torch.tensor([row["train_elbo"], row["val_elbo"]])).all()
    best = torch.load(out / "models" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in best["state_dict"].values())
    assert not (out / "metrics" / "train.json").exists()
