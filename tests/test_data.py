"""Tests of vaerepro.data: splits, prepare and load_prepared, data spaces. Known answers, no network.

Where the raw files come from (downloads, checksums, file formats) is tested in test_sources.py.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import pytest
import torch

from test_sources import MNIST5K_MD5, sha256
from vaerepro import data
from vaerepro.data import DataError
from vaerepro.likelihoods import DATA_SPACES

# The embedded digits, read once for the module (raw_dir: the session fixture in conftest.py that fetches
# them); test_sources.py has the same small fixture.


@pytest.fixture(scope="module")
def mnist5k(raw_dir) -> data.RawData:
    return data.load_raw("mnist5k", raw_dir)


# --------------------------------------------------------------------------------------------- splits


def test_split_sizes_known_answers():
    assert data.split_sizes(5000, 0.1, 0.2) == {"train": 3500, "val": 500, "test": 1000}
    assert data.split_sizes(7, 0.1, 0.2) == {"train": 5, "val": 1, "test": 1}  # 0.7 -> 1, 1.4 -> 1
    assert data.split_sizes(25, 0.1, 0.1) == {"train": 19, "val": 3, "test": 3}  # 2.5 rounds half up
    with pytest.raises(DataError, match="val would be empty"):
        data.split_sizes(4, 0.1, 0.3)
    with pytest.raises(DataError, match="train would be empty"):
        data.split_sizes(10, 0.5, 0.5)
    with pytest.raises(DataError, match=r"test_fraction must lie in \[0, 1\)"):
        data.split_sizes(10, 0.1, 1.5)


def test_prepare_writes_disjoint_covering_splits(raw_dir, mnist5k, tmp_path):
    meta = data.prepare("mnist5k", raw_dir, tmp_path / "prep", seed=3)
    assert meta["sizes"] == {"train": 3500, "val": 500, "test": 1000}
    assert meta["image_shape"] == [28, 28] and meta["data_dim"] == 784 and meta["quantized"] is True
    assert meta["raw_files"] == MNIST5K_MD5 and meta["seed"] == 3
    idx = data.split_indices(5000, val_fraction=0.1, test_fraction=0.2, seed=3)
    everything = np.concatenate([idx["train"], idx["val"], idx["test"]])
    np.testing.assert_array_equal(np.sort(everything), np.arange(5000))  # disjoint and covering
    assert meta["split_indices_sha256"] == hashlib.sha256(everything.astype("<i8").tobytes()).hexdigest()

    splits = data.load_prepared(tmp_path / "prep")
    assert splits.meta == meta
    assert splits.image_shape == (28, 28) and splits.data_dim == 784 and splits.quantized
    flat = mnist5k.x.reshape(5000, 784)
    for name, x, y in (
        ("train", splits.train, splits.y_train),
        ("val", splits.val, splits.y_val),
        ("test", splits.test, splits.y_test),
    ):
        assert x.dtype == np.uint8 and x.shape == (meta["sizes"][name], 784)
        np.testing.assert_array_equal(x, flat[idx[name]])
        np.testing.assert_array_equal(y, mnist5k.y[idx[name]])
    for name, digest in meta["files"].items():
        assert sha256(tmp_path / "prep" / name) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prep"]  # no temporary directory left
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "prep").stat().st_mode & 0o777 == 0o777 & ~umask  # not a temp dir's 0o700


def test_prepare_is_deterministic_in_the_seed(raw_dir, tmp_path):
    kwargs = dict(max_examples=1000, val_fraction=0.15, test_fraction=0.15)
    a = data.prepare("mnist5k", raw_dir, tmp_path / "a", seed=1, **kwargs)
    data.prepare("mnist5k", raw_dir, tmp_path / "b", seed=1, **kwargs)
    c = data.prepare("mnist5k", raw_dir, tmp_path / "c", seed=2, **kwargs)
    assert a["sizes"] == {"train": 700, "val": 150, "test": 150} and a["max_examples"] == 1000
    for name in [*a["files"], "meta.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a["split_indices_sha256"] != c["split_indices_sha256"]
    assert a["files"]["x_train.npy"] != c["files"]["x_train.npy"]
    idx = data.split_indices(5000, seed=1, **kwargs)
    assert len(np.unique(np.concatenate(list(idx.values())))) == 1000  # a subsample, then disjoint splits


def test_load_prepared_detects_tampering(raw_dir, tmp_path):
    out = tmp_path / "prep"
    data.prepare("mnist5k", raw_dir, out, max_examples=100)
    x_val = out / "x_val.npy"
    blob = bytearray(x_val.read_bytes())
    blob[-1] ^= 1
    x_val.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"x_val\.npy: sha256 mismatch, expected [0-9a-f]{64}, got"):
        data.load_prepared(out)
    data.prepare("mnist5k", raw_dir, out, max_examples=100)  # prepare replaces the directory
    (out / "y_test.npy").unlink()
    with pytest.raises(DataError, match=r"y_test\.npy: file not found"):
        data.load_prepared(out)
    (out / "meta.json").unlink()
    with pytest.raises(DataError, match=r"meta\.json: file not found"):
        data.load_prepared(out)


def test_failed_prepare_leaves_existing_output_untouched(raw_dir, tmp_path):
    out = tmp_path / "prep"
    data.prepare("mnist5k", raw_dir, out, max_examples=50)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match="val would be empty"):
        data.prepare("mnist5k", raw_dir, out, max_examples=3)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.full((10, 4), 2.0))
    with pytest.raises(DataError, match="bad.npz"):
        data.prepare("npz", raw_dir, out, path=bad)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz", "prep"]


# --------------------------------------------------------------------------------------------- data spaces


def test_binary_space_is_a_bernoulli_draw_of_the_grey_levels():
    levels = torch.tensor([0, 1, 51, 128, 204, 254, 255], dtype=torch.uint8)
    x = levels.repeat(20000, 1)  # (B, D)
    g = torch.Generator().manual_seed(0)
    b = data.to_space(x, "binary", quantized=True, generator=g)
    assert b.dtype == torch.float32 and b.shape == x.shape
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    p = levels.double() / 255
    se = torch.sqrt(p * (1 - p) / len(x)).clamp_min(1e-12)
    assert ((b.double().mean(0) - p).abs() <= 5 * se).all()  # 0 -> all zeros, 255 -> all ones exactly
    # float data in [0, 1] is its own probability
    f = data.to_space(torch.full((20000, 1), 0.3), "binary", quantized=False, generator=g)
    assert abs(f.mean().item() - 0.3) < 5 * math.sqrt(0.21 / 20000)


def test_continuous_space_dequantises_into_each_levels_cell():
    v = torch.arange(256, dtype=torch.uint8).repeat(200, 1)  # (200, 256)
    y = data.to_space(v, "continuous", quantized=True, generator=torch.Generator().manual_seed(0))
    assert y.dtype == torch.float32
    lo, hi = v.float() / 256, (v.float() + 1) / 256
    assert ((y >= lo) & (y < hi)).all()
    assert abs((y - lo).mean().item() * 256 - 0.5) < 0.01  # u ~ U[0, 1): mean 1/2
    f = torch.rand(4, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(data.to_space(f, "continuous", quantized=False), f)  # float data unchanged


def test_continuous_space_stays_below_the_upper_edge(monkeypatch):
    # u = 1 - 2**-24 is a legal U[0, 1) draw, but 255 + u rounds to 256 in float32: the clamp keeps y < 1
    monkeypatch.setattr(torch, "rand", lambda shape, **kwargs: torch.full(shape, 1 - 2**-24))
    y = data.to_space(torch.tensor([[0, 255]], dtype=torch.uint8), "continuous", quantized=True)
    assert (y < torch.tensor([[1 / 256, 1.0]])).all()
    assert y[0, 1].item() == np.nextafter(np.float32(1.0), np.float32(0.0))


def test_fixed_space_is_reproducible(mnist5k):
    x = mnist5k.x[:64].reshape(64, -1)  # numpy (B, D) uint8
    for space in DATA_SPACES:
        a = data.fixed_space(x, space, quantized=True, seed=7)
        b = data.fixed_space(torch.from_numpy(x.copy()), space, quantized=True, seed=7)
        c = data.fixed_space(x, space, quantized=True, seed=8)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_space_and_jacobian():
    with pytest.raises(ValueError, match="unknown data space 'gaussian'; allowed: binary, continuous"):
        data.to_space(torch.zeros(1, 2), "gaussian", quantized=False)
    assert data.dim_log_jacobian("continuous", True) == pytest.approx(5.545177444479562)  # 8 bits in nats
    assert data.dim_log_jacobian("continuous", False) == 0.0
    assert data.dim_log_jacobian("binary", True) == 0.0
    with pytest.raises(ValueError, match="allowed: binary, continuous"):
        data.dim_log_jacobian("discrete", True)
