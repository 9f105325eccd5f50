"""Your own data (data=npz): what prepare records for each kind of file, and the refusals that keep a
result from being labelled with data it was not computed on."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import yaml

from conftest import TINY, compose
from vaerepro import cli, data, sources
from vaerepro.formats import DataError

GREY = np.random.default_rng(0).integers(0, 256, (40, 28, 28)).astype(np.uint8)


@pytest.mark.parametrize(
    ("x", "quantized", "dtype", "image_shape"),
    [
        (GREY, True, "uint8", [28, 28]),
        (GREY.astype(np.int64), True, "uint8", [28, 28]),
        (GREY.reshape(40, 784), True, "uint8", [28, 28]),
        ((GREY / 255).astype(np.float32), False, "float32", [28, 28]),
        (GREY / 255, False, "float32", [28, 28]),
        (GREY > 127, False, "float32", [28, 28]),
        (GREY.reshape(40, 784)[:, :560], True, "uint8", [1, 560]),
    ],
    ids=["uint8", "int64", "flat", "float32", "float64", "bool", "flat_not_square"],
)
def test_prepare_records_what_each_kind_of_file_is(tmp_path, x, quantized, dtype, image_shape):
    """Only 8-bit levels are quantized (dequantised, 8 bits/dim added in the continuous space); float and
    bool pixels are used as is; D is the pixel count whatever the file's shape."""
    np.savez(tmp_path / "mine.npz", x=x)
    meta = data.prepare("npz", tmp_path, tmp_path / "prepared", path=tmp_path / "mine.npz")
    assert (meta["quantized"], meta["dtype"], meta["image_shape"]) == (quantized, dtype, image_shape)
    assert meta["data_dim"] == math.prod(image_shape)
    assert data.dim_log_jacobian("continuous", meta["quantized"]) == (math.log(256) if quantized else 0.0)
    assert data.dim_log_jacobian("binary", meta["quantized"]) == 0.0
    assert meta["files"]["x_test.npy"] == sources.file_sha256(tmp_path / "prepared" / "x_test.npy")
    # what the check stage knows before prepare reads the data: the same, from the header of x alone
    assert data.stored_quantized("npz", tmp_path / "mine.npz") is quantized


def test_labels_under_another_name_are_not_guessed_but_named_in_a_warning(tmp_path, caplog):
    """An .npz with x and its labels under another name than y: prepared without labels, as the file says,
    with one warning naming the other arrays and how to save the labels; none when there is nothing else."""
    labels = np.arange(len(GREY)) % 10
    np.savez(tmp_path / "other.npz", x=GREY, labels=labels, mean=GREY.mean(0))
    np.savez(tmp_path / "plain.npz", x=GREY)
    with caplog.at_level("WARNING", logger="vaerepro.formats"):
        meta = data.prepare("npz", tmp_path, tmp_path / "p1", path=tmp_path / "other.npz")
    assert meta["has_labels"] is False
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "vaerepro.formats"]
    assert "other.npz: no array 'y', so no labels" in warning and "'labels', 'mean'" in warning
    assert "numpy.savez(path, x=x, y=labels)" in warning and "\n" not in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="vaerepro.formats"):
        plain = data.prepare("npz", tmp_path, tmp_path / "p2", path=tmp_path / "plain.npz")
    assert plain["has_labels"] is False
    assert not [r for r in caplog.records if r.name == "vaerepro.formats"]


def test_a_timedelta_x_is_refused_in_one_line_not_read_as_grey_levels(tmp_path):
    """numpy files timedelta64 under np.integer; int() of its minimum raised a TypeError (a traceback)."""
    np.savez(tmp_path / "mine.npz", x=np.zeros((4, 3), "m8[s]"))
    with pytest.raises(DataError, match=r"mine\.npz: unsupported x dtype timedelta64\[s\]"):
        data.load_raw("npz", tmp_path, path=tmp_path / "mine.npz")
    np.savez(tmp_path / "mine.npz", x=np.zeros((4, 3), np.uint8), y=np.zeros(4, "m8[s]"))
    with pytest.raises(DataError, match=r"mine\.npz: y must hold integer labels, got dtype timedelta64"):
        data.load_raw("npz", tmp_path, path=tmp_path / "mine.npz")


def _prepared_from_a(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "a.npz", x=rng.integers(0, 256, (30, 16)).astype(np.uint8))
    np.savez(tmp_path / "b.npz", x=rng.random((30, 16)).astype(np.float32))
    return data.prepare("npz", tmp_path, tmp_path / "prepared", path=tmp_path / "a.npz")


def test_prepared_data_from_another_file_is_refused(tmp_path):
    """The md5 check looked the file up by name only: prepared/ made from a.npz passed for data.path=b.npz,
    so the stages trained and evaluated a.npz's data under b.npz's name (data.path in the run's params)."""
    meta, prepared = _prepared_from_a(tmp_path), tmp_path / "prepared"
    made = re.escape(f"prepared: made from {tmp_path / 'a.npz'}, not {tmp_path / 'b.npz'} (md5 ")
    with pytest.raises(DataError, match=made):
        data.check_prepared_from(meta, "npz", tmp_path / "b.npz", prepared)
    (tmp_path / "copy.npz").write_bytes((tmp_path / "a.npz").read_bytes())  # the same bytes, moved: fine
    data.check_prepared_from(meta, "npz", tmp_path / "copy.npz", prepared)
    data.check_prepared_from(meta, "npz", tmp_path / "a.npz", prepared)


def test_prepared_data_is_checked_against_the_file_as_prepare_reads_its_path(tmp_path, monkeypatch):
    """The check hashed data.path as typed: `~/a.npz` (or a path relative to the working directory) was no
    file to it, so train and evaluate took a.npz's old splits after a.npz changed; and a data.path naming a
    file that is not there passed too, the old splits then reported under that name."""
    meta, prepared = _prepared_from_a(tmp_path), tmp_path / "prepared"
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    data.check_prepared_from(meta, "npz", "~/a.npz", prepared)  # the file prepare read, unchanged: fine
    data.check_prepared_from(meta, "npz", "a.npz", prepared)
    np.savez(tmp_path / "a.npz", x=np.zeros((30, 16), np.uint8))  # changed after prepare
    again = re.escape(f"prepared: made from another version of {tmp_path / 'a.npz'} (md5 ")
    for typed in ("~/a.npz", "a.npz", "./sub/../a.npz"):
        with pytest.raises(DataError, match=again):
            data.check_prepared_from(meta, "npz", typed, prepared)
    missing = re.escape(
        f"prepared: made from {tmp_path / 'a.npz'}, but the config has data.path={tmp_path / 'gone.npz'}, "
        "which does not exist; prepare it again"
    )
    with pytest.raises(DataError, match=missing):
        data.check_prepared_from(meta, "npz", "~/gone.npz", prepared)
    (tmp_path / "a.npz").unlink()  # the file prepare read, deleted since: nothing tells another file
    data.check_prepared_from(meta, "npz", tmp_path / "a.npz", prepared)


def test_prepared_data_from_another_source_is_refused(tmp_path):
    """prepared/ of the user's .npz passed for data=mnist5k (and any other source): the run was tagged
    source mnist5k with data.dvc's data version, over numbers of the user's file."""
    meta, prepared = _prepared_from_a(tmp_path), tmp_path / "prepared"
    made = re.escape(f"prepared: made from data source 'npz' ({tmp_path / 'a.npz'}), but the config has ")
    with pytest.raises(DataError, match=made + "data.source='mnist5k'"):
        data.check_prepared_from(meta, "mnist5k", None, prepared)
    data.check_prepared_from(meta, "npz", tmp_path / "a.npz", prepared)


def test_cli_train_refuses_prepared_data_of_another_file_writing_nothing(tmp_path, capsys):
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "a.npz", x=rng.integers(0, 256, (60, 16)).astype(np.uint8))
    np.savez(tmp_path / "b.npz", x=rng.random((60, 16)).astype(np.float32))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # marks the project root
    params = tmp_path / "params.yaml"
    own = (*TINY, "data.max_examples=null", "tracking.enabled=false", "data=npz", "train.batch_size=10")
    params.write_text(yaml.safe_dump(compose(*own, f"data.path={tmp_path / 'a.npz'}")))
    assert cli.main(["prepare", "--params", str(params), "--out", str(tmp_path)]) == 0
    params.write_text(yaml.safe_dump(compose(*own, f"data.path={tmp_path / 'b.npz'}")))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(["train", "--params", str(params), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        f"vaerepro train: {tmp_path / 'prepared'}: made from {tmp_path / 'a.npz'}, not "
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_check_refuses_an_unbounded_likelihood_on_float_npz_data_before_prepare(tmp_path, capsys):
    """The check stage (DVC's first, before any stage's outputs are deleted) reads the header of the user's
    x: a learned sigma without a floor on float pixels is refused there in one line naming the file and the
    key, as train would refuse it later; on 8-bit levels (dequantized) it passes. A file that cannot say
    (missing, text) is left to prepare, which says why."""
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "float.npz", x=rng.random((60, 16)).astype(np.float32))
    np.savez(tmp_path / "levels.npz", x=rng.integers(0, 256, (60, 16)).astype(np.uint8))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # marks the project root
    params = tmp_path / "params.yaml"
    own = (*TINY, "tracking.enabled=false", "data=npz", "likelihood=gaussian")
    own = (*own, "likelihood.scale=log_variance")
    for name, status in (("float.npz", 2), ("levels.npz", 0), ("missing.npz", 0)):
        params.write_text(yaml.safe_dump(compose(*own, f"data.path={tmp_path / name}")))
        assert cli.main(["check", "--params", str(params), "--out", str(tmp_path)]) == status, name
    err = capsys.readouterr().err.strip().splitlines()
    refusals = [line for line in err if line.startswith("vaerepro check: ")]
    assert len(refusals) == 1 and refusals[0].startswith(
        f"vaerepro check: {tmp_path / 'float.npz'}: likelihood.scale=log_variance (a learned sigma without a "
        "floor) on data that are not dequantized"
    ), err
    (tmp_path / "text.npz").write_text("x,y\n1,2\n")
    assert data.stored_quantized("npz", tmp_path / "text.npz") is None
    assert data.stored_quantized("npz", None) is None and data.stored_quantized("mnist5k", None) is True


def test_an_npz_that_changes_while_prepare_reads_it_is_refused(tmp_path, monkeypatch):
    """The md5 was taken after the arrays were read: a file rewritten in between (a script still writing
    it) got the new version's md5 over the old version's arrays, so the later md5 check passed."""
    path = tmp_path / "mine.npz"
    np.savez(path, x=GREY)
    read = sources.read_npz

    def read_then_rewrite(p, **kw):
        arrays = read(p, **kw)
        np.savez(path, x=GREY[:20] > 127)  # the new version lands after the read
        return arrays

    monkeypatch.setattr(sources, "read_npz", read_then_rewrite)
    with pytest.raises(DataError, match=r"mine\.npz: the file changed while it was being read"):
        data.prepare("npz", tmp_path, tmp_path / "prepared", path=path)
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize(
    ("made", "asked", "named"),
    [
        ({"seed": 0}, {"seed": 1}, "data.split_seed=0, but the config has data.split_seed=1"),
        ({"val_size": 10}, {}, "data.val_size=10, but the config has data.val_size=null"),
        ({"max_examples": 50}, {}, "data.max_examples=50, but the config has data.max_examples=null"),
        ({"test_fraction": 0.3}, {}, "data.test_fraction=0.3, but the config has data.test_fraction=0.2"),
    ],
)
def test_prepared_splits_made_with_other_settings_are_refused(tmp_path, made, asked, named):
    """A prepared/ whose splits were made otherwise holds other training and test examples than the run's
    params say (vaerepro train or evaluate by hand after changing data.*): refused, naming the setting."""
    np.savez(tmp_path / "mine.npz", x=GREY)
    settings = dict(
        seed=0, split="pooled", val_size=None, val_fraction=0.1, test_fraction=0.2, max_examples=None
    )
    meta = data.prepare(
        "npz", tmp_path, tmp_path / "prepared", path=tmp_path / "mine.npz", **{**settings, **made}
    )
    same = data.split_settings(**{**settings, **made})
    data.check_prepared_from(meta, "npz", tmp_path / "mine.npz", tmp_path / "prepared", same)  # as made: fine
    with pytest.raises(
        DataError, match=re.escape(f"{tmp_path / 'prepared'}: its splits were made with {named}")
    ):
        data.check_prepared_from(
            meta,
            "npz",
            tmp_path / "mine.npz",
            tmp_path / "prepared",
            data.split_settings(**{**settings, **asked}),
        )


@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_train_and_evaluate_refuse_prepared_splits_of_another_split_seed(tmp_path, capsys, stage):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # marks the project root
    np.savez(tmp_path / "mine.npz", x=GREY)
    params = tmp_path / "params.yaml"
    own = (
        *TINY,
        "data.max_examples=null",
        "tracking.enabled=false",
        "data=npz",
        f"data.path={tmp_path / 'mine.npz'}",
    )
    params.write_text(yaml.safe_dump(compose(*own)))
    assert cli.main(["prepare", "--params", str(params), "--out", str(tmp_path)]) == 0
    params.write_text(yaml.safe_dump(compose(*own, "data.split_seed=3")))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main([stage, "--params", str(params), "--out", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(
        f"vaerepro {stage}: {tmp_path / 'prepared'}: its splits were made with data.split_seed=0"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_fetch_of_your_npz_makes_the_data_dvc_tracks_for_dvc_repro(tmp_path, capsys):
    """With data=npz, `vaerepro fetch` (what `make repro` runs first) made nothing, so on a fresh clone
    `dvc repro` stopped at data.dvc ("missing data 'source': data") before any stage. It now makes data/ as
    data.dvc records it (the embedded digits, byte for byte), and prints your file's path as before."""
    from conftest import ROOT

    np.savez(tmp_path / "mine.npz", x=np.zeros((60, 16), np.uint8))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # marks the project root
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(compose("data=npz", f"data.path={tmp_path / 'mine.npz'}")))
    assert cli.main(["fetch", "--params", str(params)]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'mine.npz'}\n"
    recorded = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    assert recorded["path"] == "data" and data.dir_md5(tmp_path / "data") == recorded["md5"]
