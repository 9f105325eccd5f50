"""data.split: pooled (today's splits, unchanged to the bit) and official (the source's own test set).

The IDX sources are faked with small files the tests write themselves (test_sources.write_fake_idx):
no network.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from conftest import compose
from test_sources import write_fake_idx
from vaerepro import config as config_mod
from vaerepro import data, sources
from vaerepro.config import ConfigError
from vaerepro.data import DataError

N_TRAIN, N_TEST = 50, 12  # examples in the fake train and t10k files


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """(raw_dir, x (N, 28, 28) uint8, y (N,)) of fake MNIST IDX files; x, y: train file, then t10k."""
    raw_dir = tmp_path / "raw"
    (raw_dir / "mnist").mkdir(parents=True)
    x, y = write_fake_idx(raw_dir / "mnist", monkeypatch, "mnist", n_train=N_TRAIN, n_test=N_TEST, seed=5)
    return raw_dir, x, y


def _digest(index: dict[str, np.ndarray]) -> str:
    """sha256 of the train, val, test indices concatenated, int64 little-endian (split_indices_sha256)."""
    everything = np.concatenate([index[s] for s in data.SPLITS]).astype("<i8")
    return hashlib.sha256(everything.tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------- pooled


# split_indices before data.split existed (commit 0062102), for these arguments: (sizes, _digest)
POOLED_BEFORE = {
    (5000, 0.1, 0.2, 0, None): (
        (3500, 500, 1000),
        "2ac166f542068b2abb1bc3700c4723060e1c22ffe185c6a40789722dc5bd2e22",
    ),
    (70000, 400 / 70000, 10000 / 70000, 0, None): (
        (59600, 400, 10000),
        "49659f918382295e15c1b2c99ee8ae3ea054ba6ba1578ae796f23f0535358d65",
    ),
    (70000, 0.1, 0.2, 7, 600): (
        (420, 60, 120),
        "94bd714770d95baf877b69fc0896fda6ef0f857d24df64e230f09ecc85cf8ee8",
    ),
    (1965, 0.1, 0.2, 3, None): (
        (1375, 197, 393),
        "c61b305ed04a586b5ca09c3f2e3c476b3515913bf4597ed4fe75907db33e4120",
    ),
    (62, 0.1, 0.2, 1, None): (
        (44, 6, 12),
        "0cd7e3efa5d8553d5bf0cea473645ba220ae26dce37adef9648f9e018a4c97c5",
    ),
}


@pytest.mark.parametrize("args", sorted(POOLED_BEFORE, key=str))
def test_pooled_split_is_unchanged_to_the_bit(args):
    n, val, test, seed, max_examples = args
    sizes, digest = POOLED_BEFORE[args]
    for kwargs in ({}, {"split": "pooled", "val_size": None, "n_official_test": 10}):
        index = data.split_indices(
            n, val_fraction=val, test_fraction=test, seed=seed, max_examples=max_examples, **kwargs
        )
        assert tuple(len(index[s]) for s in data.SPLITS) == sizes and _digest(index) == digest
        assert all(index[s].dtype == np.int64 for s in data.SPLITS)


def test_pooled_prepare_of_idx_files_pools_train_and_test(fake_mnist, tmp_path):
    raw_dir, x, y = fake_mnist
    meta = data.prepare("mnist", raw_dir, tmp_path / "prep", seed=2)
    index = data.split_indices(N_TRAIN + N_TEST, seed=2)
    assert meta["split"] == "pooled" and meta["split_indices_sha256"] == _digest(index)
    assert (meta["val_fraction"], meta["test_fraction"], meta["val_size"]) == (0.1, 0.2, None)
    splits = data.load_prepared(tmp_path / "prep")
    assert splits.split == "pooled"
    np.testing.assert_array_equal(splits.test, x.reshape(len(x), -1)[index["test"]])


def test_val_size_replaces_val_fraction_in_pooled_splits():
    assert data.split_sizes(70_000, 0.5, 10_000 / 70_000, val_size=400) == {
        "train": 59_600,
        "val": 400,
        "test": 10_000,
    }
    index = data.split_indices(100, val_fraction=0.1, test_fraction=0.2, val_size=7, seed=0)
    assert [len(index[s]) for s in data.SPLITS] == [73, 7, 20]
    with pytest.raises(DataError, match="train would be empty: 10 examples with val_size=9"):
        data.split_sizes(10, 0.1, 0.2, val_size=9)


# --------------------------------------------------------------------------------------------- official


def test_official_test_split_is_the_t10k_file_in_order(fake_mnist, tmp_path):
    raw_dir, x, y = fake_mnist
    meta = data.prepare("mnist", raw_dir, tmp_path / "prep", split="official", val_size=7, seed=3)
    assert meta["sizes"] == {"train": N_TRAIN - 7, "val": 7, "test": N_TEST}
    assert (meta["split"], meta["val_size"], meta["val_fraction"], meta["test_fraction"]) == (
        "official",
        7,
        None,  # not used: val_size gives the size
        None,  # not used: the test set is the t10k file
    )
    assert meta["n_raw"] == N_TRAIN + N_TEST
    assert json.loads((tmp_path / "prep" / "meta.json").read_text()) == meta
    splits = data.load_prepared(tmp_path / "prep")
    assert splits.split == "official"
    flat = x.reshape(len(x), -1)
    np.testing.assert_array_equal(splits.test, flat[N_TRAIN:])  # the t10k images, in file order
    np.testing.assert_array_equal(splits.y_test, y[N_TRAIN:])
    index = data.split_indices(N_TRAIN + N_TEST, split="official", val_size=7, seed=3, n_official_test=N_TEST)
    np.testing.assert_array_equal(index["test"], np.arange(N_TRAIN, N_TRAIN + N_TEST))
    # train and val: disjoint, together exactly the train file
    both = np.concatenate([index["train"], index["val"]])
    np.testing.assert_array_equal(np.sort(both), np.arange(N_TRAIN))
    for name, xs, ys in (("train", splits.train, splits.y_train), ("val", splits.val, splits.y_val)):
        np.testing.assert_array_equal(xs, flat[index[name]])
        np.testing.assert_array_equal(ys, y[index[name]])
    assert meta["split_indices_sha256"] == _digest(index)


def test_official_split_is_deterministic_in_the_seed(fake_mnist, tmp_path):
    raw_dir, _, _ = fake_mnist
    kwargs = dict(split="official", val_size=5)
    a = data.prepare("mnist", raw_dir, tmp_path / "a", seed=1, **kwargs)
    data.prepare("mnist", raw_dir, tmp_path / "b", seed=1, **kwargs)
    c = data.prepare("mnist", raw_dir, tmp_path / "c", seed=2, **kwargs)
    for name in [*a["files"], "meta.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a["files"]["x_train.npy"] != c["files"]["x_train.npy"]  # another draw of val from train
    assert a["files"]["x_test.npy"] == c["files"]["x_test.npy"]  # the same test set whatever the seed
    pooled = data.prepare("mnist", raw_dir, tmp_path / "p", seed=1)
    # another training set: a checkpoint's data digest (sha256 of x_train.npy) tells them apart
    assert pooled["files"]["x_train.npy"] != a["files"]["x_train.npy"]


def test_official_sizes_from_val_fraction_and_max_examples():
    n, n_test = N_TRAIN + N_TEST, N_TEST

    def sizes(**kwargs):
        index = data.split_indices(n, split="official", n_official_test=n_test, **kwargs)
        assert set(np.concatenate([index["train"], index["val"]])) <= set(range(N_TRAIN))
        np.testing.assert_array_equal(index["test"], np.arange(N_TRAIN, n))  # never subsampled
        return [len(index[s]) for s in data.SPLITS]

    assert sizes(val_fraction=0.1) == [45, 5, N_TEST]  # 0.1 of the 50 training-file examples
    assert sizes(val_fraction=0.1, test_fraction=0.9) == [45, 5, N_TEST]  # test_fraction unused
    assert sizes(val_fraction=0.1, max_examples=20) == [18, 2, N_TEST]  # max_examples: train file only
    assert sizes(val_size=3, max_examples=20) == [17, 3, N_TEST]
    # IWAE (Burda et al. 2016, 5.1; the authors' code): MNIST's 60,000 + 10,000, 400 for validation
    index = data.split_indices(70_000, split="official", val_size=400, n_official_test=10_000)
    assert [len(index[s]) for s in data.SPLITS] == [59_600, 400, 10_000]
    np.testing.assert_array_equal(index["test"], np.arange(60_000, 70_000))


def test_official_train_and_val_are_the_documented_cut_of_one_permutation():
    """The docstring's scheme written out: a permutation of the training files' examples by
    default_rng(seed), its first max_examples kept, cut in order: train first, then val (its last n_val)."""
    n = N_TRAIN + N_TEST
    for seed, max_examples, val_size in ((3, None, 7), (4, 20, 3)):
        index = data.split_indices(
            n,
            split="official",
            val_size=val_size,
            seed=seed,
            max_examples=max_examples,
            n_official_test=N_TEST,
        )
        order = np.random.default_rng(seed).permutation(N_TRAIN)[: max_examples or N_TRAIN]
        np.testing.assert_array_equal(index["train"], order[: len(order) - val_size])
        np.testing.assert_array_equal(index["val"], order[len(order) - val_size :])
        assert index["train"].dtype == index["val"].dtype == np.int64


def test_official_split_errors():
    with pytest.raises(DataError, match="train would be empty: 50 examples of the training files"):
        data.split_indices(62, split="official", val_size=50, n_official_test=12)
    with pytest.raises(DataError, match="val would be empty"):
        data.split_indices(62, split="official", val_fraction=0.001, n_official_test=12)
    with pytest.raises(DataError, match="needs the source's own test set"):
        data.split_indices(62, split="official", val_size=5)
    with pytest.raises(DataError, match="unknown data.split 'random'; allowed: pooled, official"):
        data.split_indices(62, split="random")


@pytest.mark.parametrize("source", ["mnist5k", "frey_faces", "npz"])
def test_sources_without_a_test_set_refuse_official(source, tmp_path):
    message = (
        f"data.split=official: source '{source}' has no official test set "
        "(only mnist, fashion_mnist ship one); use data.split=pooled"
    )
    path = tmp_path / "mine.npz" if source == "npz" else None
    with pytest.raises(DataError) as err:  # refused before any raw file is looked for
        data.prepare(source, tmp_path / "raw", tmp_path / "prep", path=path, split="official")
    assert str(err.value) == message
    assert not (tmp_path / "prep").exists()
    overrides = [f"data={source}", "data.split=official"]
    overrides += [f"data.path={path}"] if path else []
    with pytest.raises(ConfigError) as err:
        config_mod.validate(compose(*overrides))
    assert str(err.value).startswith("data: ") and message in str(err.value)


def test_official_split_in_the_config():
    assert sources.OFFICIAL_TEST_SOURCES == ("mnist", "fashion_mnist")
    assert config_mod.validate(compose()).data.split == "pooled"  # the default: today's splits
    cfg = config_mod.validate(compose("data=mnist", "data.split=official", "data.val_size=400"))
    assert (cfg.data.split, cfg.data.val_size) == ("official", 400)
    # test_fraction is unused by official splits: the fractions' sum is not checked
    config_mod.validate(
        compose("data=mnist", "data.split=official", "data.val_fraction=0.5", "data.test_fraction=0.6")
    )
    for bad, hint in (
        ("data.val_size=0", "greater than or equal to 1"),
        ("data.split=random", "'pooled' or 'official'"),
    ):
        with pytest.raises(ConfigError, match=hint):
            config_mod.validate(compose("data=mnist", bad))
