"""train.test_curve: the test-set ELBO during training (AEVB's Figure 2), at 10 points a decade of training
samples seen and at the last epoch, in plots/test_curve.csv; for plotting only, so training is bit for bit
the same with it on or off, and a resumed training continues the file; the reproduction card draws it."""

from __future__ import annotations

import csv
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Checkpoint

from conftest import copy_prepared, tiny_config
from test_reproduce import _result
from vaerepro import estimators
from vaerepro.data import TEST_SEED_OFFSET, fixed_space, load_prepared
from vaerepro.datamodule import TEST_STREAM, batch_seed
from vaerepro.evaluate import load_vae
from vaerepro.reproductions import card
from vaerepro.reproductions import presets as P
from vaerepro.reproductions.results import SeedResult
from vaerepro.train import train
from vaerepro.trainer import grid_index, on_test_grid

N_TINY = 420  # training images of the tiny split: 600 digits, 10 % validation and 20 % test held out


def _rows(out) -> list[dict[str, str]]:
    with (out / "plots" / "test_curve.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _weights(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "models" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


# --- the grid -----------------------------------------------------------------------------------------
def test_the_grid_is_ten_points_a_decade_by_hand():
    # 10^(k/10) <= s: 10^3 = 1000 is point 30 exactly, 10^3.1 = 1258.9 is point 31
    assert [grid_index(s) for s in (1, 9, 10, 999, 1000, 1258, 1259, 10**8 - 1, 10**8)] == [
        0, 9, 10, 29, 30, 30, 31, 79, 80,
    ]  # fmt: skip
    # N = 1000: samples 1000 (point 30), 2000 (33), 3000 (34), 4000 (36), 5000 (36: 10^3.7 = 5011.9),
    # 6000 (37), 7000 (38), 8000 (39: 10^3.9 = 7943.3), 9000 (39), 10,000 (40)
    assert [e for e in range(10) if on_test_grid(e, 1000)] == [0, 1, 2, 3, 5, 6, 7, 9]
    # AEVB's MNIST run (49,000 training images, 2,041 epochs to 10^8 samples): epoch e is on the grid when it
    # is the first whose samples (e + 1) x 49,000 reach some 10^(k/10), k = 47 ... 80; a few dozen points
    n = 49_000
    first = {math.ceil(10 ** (k / 10) / n) - 1 for k in range(47, 81)}
    on = [e for e in range(2041) if on_test_grid(e, n)]
    assert on == sorted(first | {0}) and 25 < len(on) < 40


@pytest.mark.slow
def test_rows_are_the_grid_epochs_and_the_last_and_the_last_is_the_test_elbo(prepared_tiny, tmp_path):
    """Nine epochs of 420 images: samples 420 (point 26), 840 (29), 1260 (31: 10^3.1 = 1258.9), 1680 (32),
    2100 (33), 2520 (34: 10^3.4 = 2511.9), 2940 (34), 3360 (35), 3780 (35): rows at epochs 0-5 and 7 for the
    grid, and at 8, the last. The last row is the mean ELBO of last.ckpt's weights over the test split's
    fixed draw (the evaluate stage's binarisation, q's noise from the test stream), computed here in one
    batch where the training used batches of 7."""
    out = copy_prepared(prepared_tiny, tmp_path)
    cfg = tiny_config("train.max_epochs=9", "train.test_curve=true", "train.val_batch_size=7")
    train(cfg, out, enable_progress_bar=False)
    rows = _rows(out)
    assert len(load_prepared(out / "prepared").train) == N_TINY
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4, 5, 7, 8]
    assert [int(r["samples_seen"]) for r in rows] == [N_TINY * (int(r["epoch"]) + 1) for r in rows]
    assert not on_test_grid(8, N_TINY)  # the last epoch's row is there for being the last

    splits = load_prepared(out / "prepared")
    # the evaluate stage's binarisation of the test split (data.TEST_SEED_OFFSET)
    x = fixed_space(splits.test, cfg.data_space, quantized=splits.quantized, seed=cfg.seed + TEST_SEED_OFFSET)
    g = torch.Generator().manual_seed(batch_seed(cfg.seed, TEST_STREAM, 0, 0))
    eps = torch.randn((len(x), 1, cfg.model.latent_dim), generator=g)  # (M, 1, Z): one draw per image
    vae = load_vae(out / "models" / "last.ckpt")  # eval mode
    with torch.no_grad():
        elbo = estimators.elbo(vae, x, 1, "B", eps.transpose(0, 1))  # (M,), one point's noise each
    assert float(rows[-1]["test_elbo"]) == pytest.approx(elbo.double().mean().item(), rel=1e-6, abs=0)
    # MNIST under a Bernoulli decoder: 784 log 2 = -543 nats untrained; every row a real bound
    assert all(-543 < float(r["test_elbo"]) < -150 for r in rows)


class _StopAfterEpoch6(pl.Callback):
    """Asks the training to stop at the end of epoch 6 (2940 samples, off the grid) during the epoch, as a
    signal or a pruned trial does."""

    def on_validation_end(self, trainer, module):
        trainer.should_stop = trainer.current_epoch == 6


class _StopAfterEpoch6Late(Checkpoint):
    """The same, decided where early stopping decides: at the epoch's end, after every callback that is not
    a Checkpoint or EarlyStopping (Lightning runs those last), so after the test curve's."""

    def on_train_epoch_end(self, trainer, module):
        trainer.should_stop = trainer.current_epoch == 6


@pytest.mark.slow
@pytest.mark.parametrize("stopper", [_StopAfterEpoch6, _StopAfterEpoch6Late])
def test_a_training_that_stops_early_has_a_row_at_its_last_epoch(prepared_tiny, tmp_path, stopper):
    """Rows at the grid epochs 0-5 and at epoch 6, the last: seen at its end when asked for during the epoch,
    at the end of training (the same weights) when decided after it."""
    out = copy_prepared(prepared_tiny, tmp_path)
    cfg = tiny_config("train.max_epochs=30", "train.test_curve=true")
    assert train(cfg, out, enable_progress_bar=False, callbacks=[stopper()])["epochs"] == 7
    assert [int(r["epoch"]) for r in _rows(out)] == [0, 1, 2, 3, 4, 5, 6]
    assert not on_test_grid(6, N_TINY)


class _GlobalRng(pl.Callback):
    """The global CPU generator's state at each epoch start and at the end of training."""

    def __init__(self):
        self.states: list[torch.Tensor] = []

    def on_train_epoch_start(self, trainer, module):
        self.states.append(torch.random.get_rng_state())

    def on_train_end(self, trainer, module):
        self.states.append(torch.random.get_rng_state())


@pytest.mark.slow
def test_off_by_default_and_on_trains_bit_for_bit_the_same(prepared_tiny, tmp_path):
    """With dropout (eval mode for the curve, train mode back for the next batch) and the global generator
    untouched: the same weights, the same plots/elbo.csv; off, no plots/test_curve.csv (an older one is
    removed)."""
    assert tiny_config().train.test_curve is False
    runs = {}
    for on in (False, True):
        out = copy_prepared(prepared_tiny, tmp_path / str(on))
        (out / "plots").mkdir()
        (out / "plots" / "test_curve.csv").write_text("epoch,samples_seen,test_elbo\n0,1,-1.0\n")  # stale
        rng = _GlobalRng()
        cfg = tiny_config("model.dropout=0.2", f"train.test_curve={str(on).lower()}")
        train(cfg, out, enable_progress_bar=False, callbacks=[rng])
        runs[on] = (out, rng.states)
    (off, rng_off), (on, rng_on) = runs[False], runs[True]
    assert not (off / "plots" / "test_curve.csv").exists()
    assert [int(r["epoch"]) for r in _rows(on)] == [0, 1, 2]  # 420, 840, 1260: each on the grid
    a, b = _weights(off), _weights(on)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (off / "plots" / "elbo.csv").read_bytes() == (on / "plots" / "elbo.csv").read_bytes()
    assert len(rng_on) == len(rng_off) == 4 and all(map(torch.equal, rng_on, rng_off))


@pytest.mark.slow
@pytest.mark.parametrize(("first", "total"), [(1, 3), (7, 9)])
def test_a_resumed_training_continues_the_file_as_an_uninterrupted_one_writes_it(
    prepared_tiny, tmp_path, first, total
):
    """Stopped after `first` epochs and resumed to `total`: the file of an uninterrupted training, byte for
    byte. After 7 epochs the last row (epoch 6, 2940 samples) is off the grid; resumed past it, it goes."""
    whole = copy_prepared(prepared_tiny, tmp_path / "whole")
    train(tiny_config(f"train.max_epochs={total}", "train.test_curve=true"), whole, enable_progress_bar=False)
    out = copy_prepared(prepared_tiny, tmp_path / "resumed")
    train(tiny_config(f"train.max_epochs={first}", "train.test_curve=true"), out, enable_progress_bar=False)
    assert int(_rows(out)[-1]["epoch"]) == first - 1
    cfg = tiny_config(f"train.max_epochs={total}", "train.test_curve=true", "train.resume=true")
    train(cfg, out, enable_progress_bar=False)
    assert (out / "plots" / "test_curve.csv").read_text() == (whole / "plots" / "test_curve.csv").read_text()


@pytest.mark.slow
def test_test_curve_may_change_on_resume_and_changes_no_training(prepared_tiny, tmp_path, recwarn):
    """On for epoch 0, off for epoch 1, on for epoch 2, each a resumption: never refused, no warning about
    the checkpoint's test-curve rows, weights bit for bit those of a training without the curve; the file
    is gone while off, and holds the last part's rows only (the off part's checkpoint has none)."""
    plain = copy_prepared(prepared_tiny, tmp_path / "plain")
    train(tiny_config(), plain, enable_progress_bar=False)
    out = copy_prepared(prepared_tiny, tmp_path / "switched")
    for epochs, on in ((1, "true"), (2, "false"), (3, "true")):
        cfg = tiny_config(f"train.max_epochs={epochs}", f"train.test_curve={on}", "train.resume=true")
        train(cfg, out, enable_progress_bar=False)
        assert (out / "plots" / "test_curve.csv").exists() == (on == "true")
    assert [int(r["epoch"]) for r in _rows(out)] == [2]
    assert not [w for w in recwarn if "ckpt_path" in str(w.message)]
    a, b = _weights(plain), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- the card -------------------------------------------------------------------------------------------
def test_seed_result_reads_the_test_curve_when_there(tmp_path):
    assert SeedResult.read(0, tmp_path).test_curve == []
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "test_curve.csv").write_text(
        "epoch,samples_seen,test_elbo\n0,420,-499.5\n8,3780,-227.25\n"
    )
    assert SeedResult.read(0, tmp_path).test_curve == [
        {"epoch": 0.0, "samples_seen": 420.0, "test_elbo": -499.5},
        {"epoch": 8.0, "samples_seen": 3780.0, "test_elbo": -227.25},
    ]


@pytest.mark.slow
def test_the_card_draws_each_seeds_test_curve_dotted_against_samples(tmp_path, monkeypatch):
    result = _result(tmp_path, P.PRESETS["aevb-frey-z2"], [900.0], smoke=True)
    without = card._curves_against_samples(result)
    assert "test set once, after training" in without.caption and "dotted" not in without.caption

    rows = [{"epoch": 0.0, "samples_seen": 1375.0, "test_elbo": 880.0}]
    rows.append({"epoch": 2.0, "samples_seen": 4125.0, "test_elbo": 890.0})
    result.seeds[0].test_curve = rows
    figures = []  # the matplotlib figure, kept by the png call that would render it
    with monkeypatch.context() as m:
        m.setattr(card, "png", lambda fig: figures.append(fig) or b"png")
        fig = card._curves_against_samples(result)
    assert "dotted, the test-set ELBO during training, as the paper's figure has it" in fig.caption
    assert "test set once" not in fig.caption
    (line,) = [ln for ln in figures[0].axes[0].lines if ln.get_label() == "seed 0 test"]
    assert line.get_linestyle() == ":" and line.get_color() == "C0"
    assert list(line.get_xdata()) == [1375.0, 4125.0] and list(line.get_ydata()) == [880.0, 890.0]

    paths = card.write_card(result)
    md = paths["md"].read_text()
    assert "dotted, the test-set ELBO during training" in md
    assert (result.plan.card_dir / "aevb-frey-z2_figures" / "bound_against_samples.png").is_file()
