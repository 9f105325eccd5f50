"""Tests of where raw data comes from (vaerepro.sources, vaerepro.formats): the embedded digits, downloads and
their checksums, IDX and Frey Face files, the user's .npz. Known answers, no network (http.server on 127.0.0.1
serves files).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import logging
import os
import re
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from vaerepro import data, formats, sources
from vaerepro.data import DataError

# Known answers for the embedded digits as fetch() writes them; data.dvc commits the directory hash.
MNIST5K_MD5 = {
    "images.npy": "179e44b3e52961266f3dfc67b6a6ec64",
    "labels.npy": "74b1d3b5ef4c4c243bb63ebf028eefbe",
}
MNIST5K_DIR_MD5 = "aa5bb5f99cc9aecc458d5a1c3d59c90a.dir"  # `dvc add raw/mnist5k` gives this value
RAW_DIR_MD5 = "f40ad384861156816402f4233eba7380.dir"  # data.dvc: the raw dir holding only mnist5k/


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


# --------------------------------------------------------------------------------------------- mnist5k


# raw_dir: the session fixture in conftest.py (the embedded digits fetched once)


@pytest.fixture(scope="module")
def mnist5k(raw_dir) -> data.RawData:
    return data.load_raw("mnist5k", raw_dir)


def test_mnist5k_is_the_5000_embedded_digits(raw_dir, mnist5k):
    assert mnist5k.x.shape == (5000, 28, 28) and mnist5k.x.dtype == np.uint8
    assert mnist5k.y.shape == (5000,) and mnist5k.y.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(mnist5k.y), [500] * 10)  # labels 0..9, 500 each
    assert mnist5k.x.max() == 255 and mnist5k.x.min() == 0
    assert mnist5k.image_shape == (28, 28) and mnist5k.quantized and mnist5k.source == "mnist5k"
    assert mnist5k.files == MNIST5K_MD5
    assert sorted(p.name for p in (raw_dir / "mnist5k").iterdir()) == ["images.npy", "labels.npy"]
    assert data.dir_md5(raw_dir / "mnist5k") == MNIST5K_DIR_MD5
    assert data.dir_md5(raw_dir) == RAW_DIR_MD5


def test_mnist5k_fetch_is_byte_identical_and_idempotent(raw_dir, tmp_path):
    other = data.fetch("mnist5k", tmp_path / "raw")
    assert other == tmp_path / "raw" / "mnist5k"
    for name in MNIST5K_MD5:
        assert sha256(other / name) == sha256(raw_dir / "mnist5k" / name)
    stamp = (other / "images.npy").stat().st_mtime_ns
    data.fetch("mnist5k", tmp_path / "raw")  # valid files are kept as they are
    assert (other / "images.npy").stat().st_mtime_ns == stamp
    # a damaged file is refused by load_raw, and rewritten by fetch
    (other / "labels.npy").write_bytes(b"damaged")
    with pytest.raises(DataError, match="labels.npy: md5 mismatch"):
        data.load_raw("mnist5k", tmp_path / "raw")
    data.fetch("mnist5k", tmp_path / "raw")
    assert data.dir_md5(other) == MNIST5K_DIR_MD5
    assert not list(other.glob("*.part"))
    umask = os.umask(0)
    os.umask(umask)
    assert (other / "images.npy").stat().st_mode & 0o777 == 0o666 & ~umask  # not a temp file's 0o600


def test_unknown_source_and_misplaced_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown data source 'cifar'; allowed: mnist5k, mnist"):
        data.fetch("cifar", tmp_path)
    with pytest.raises(DataError, match="needs path"):
        data.load_raw("npz", tmp_path)
    with pytest.raises(DataError, match="only for source 'npz'"):
        data.load_raw("mnist5k", tmp_path, path=tmp_path / "a.npz")
    with pytest.raises(DataError, match="url= is only for"):
        data.fetch("mnist5k", tmp_path, url="http://127.0.0.1:1/")
    with pytest.raises(DataError, match="file not found"):
        data.load_raw("mnist", tmp_path)


# --------------------------------------------------------------------------------------------- downloads


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the test's files; under /short/ it promises more bytes than it sends (a dropped connection)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path.startswith("/short/"):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\x00" * 10)
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """(served dir, base URL, list of requested paths) of an http.server on 127.0.0.1, in a thread."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # never send local requests through a proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(root))
    )
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}/", httpd.requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def idx_gz(array: np.ndarray) -> bytes:
    """An IDX file (uint8 data) as LeCun's page specifies it, gzip-compressed."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def write_fake_idx(root: Path, monkeypatch, source: str, n_train=20, n_test=10, seed=0):
    """Fake IDX files in ``root``, their md5s put in the checksum table; returns the pooled (x, y)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n_train + n_test, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=n_train + n_test).astype(np.int64)
    parts = {"train": slice(0, n_train), "test": slice(n_train, None)}
    for split, (images_name, labels_name) in data.IDX_FILES.items():
        for name, array in ((images_name, x[parts[split]]), (labels_name, y[parts[split]])):
            blob = idx_gz(array)
            (root / name).write_bytes(blob)
            monkeypatch.setitem(sources.MD5[source], name, md5(blob))
    return x, y


@pytest.mark.parametrize("source", ["mnist", "fashion_mnist"])
def test_idx_download_round_trip(source, server, monkeypatch, tmp_path):
    root, url, requests = server
    x, y = write_fake_idx(root, monkeypatch, source)
    target = data.fetch(source, tmp_path / "raw", url=url)
    assert target == tmp_path / "raw" / source
    assert sorted(requests) == sorted("/" + n for n in data.MD5[source])
    raw = data.load_raw(source, tmp_path / "raw")
    np.testing.assert_array_equal(raw.x, x)  # train then test, pooled
    np.testing.assert_array_equal(raw.y, y)
    assert raw.y.dtype == np.int64 and raw.image_shape == (28, 28) and raw.quantized
    assert raw.files == data.MD5[source]
    requests.clear()
    data.fetch(source, tmp_path / "raw", url=url)  # idempotent: valid files are not downloaded again
    assert requests == []
    assert not list(target.glob("*.part"))


def test_idx_sources_default_to_known_checksums():
    assert data.MD5["mnist"]["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert data.MD5["fashion_mnist"]["t10k-labels-idx1-ubyte.gz"] == "bb300cfdad3c16e7a12e480ee83cd310"
    assert data.DEFAULT_URLS["mnist"] == "https://ossci-datasets.s3.amazonaws.com/mnist/"


def test_md5_mismatch_raises_and_leaves_nothing(server, monkeypatch, tmp_path):
    root, url, _ = server
    write_fake_idx(root, monkeypatch, "mnist")
    name = "train-labels-idx1-ubyte.gz"
    actual = md5((root / name).read_bytes())
    monkeypatch.setitem(sources.MD5["mnist"], name, "0" * 32)
    with pytest.raises(DataError) as info:
        data.fetch("mnist", tmp_path / "raw", url=url)
    assert name in str(info.value) and "0" * 32 in str(info.value) and actual in str(info.value)
    assert not (tmp_path / "raw" / "mnist" / name).exists()
    assert not list((tmp_path / "raw" / "mnist").glob("*.part"))


def test_corrupt_download_never_replaces_a_file(server, monkeypatch, tmp_path):
    root, url, _ = server
    write_fake_idx(root, monkeypatch, "mnist")
    name = "t10k-images-idx3-ubyte.gz"
    bad = gzip.compress(b"\x08\x03\x00\x00" + bytes(100), mtime=0)  # wrong magic number
    (root / name).write_bytes(bad)
    monkeypatch.setitem(sources.MD5["mnist"], name, md5(bad))
    target = tmp_path / "raw" / "mnist"
    target.mkdir(parents=True)
    (target / name).write_bytes(b"an older, damaged copy")
    with pytest.raises(DataError, match=rf"mnist/{name}: not an IDX file \(bad magic number 08030000\)"):
        data.fetch("mnist", tmp_path / "raw", url=url)
    assert (target / name).read_bytes() == b"an older, damaged copy"
    assert not list(target.glob("*.part"))


def test_truncated_and_failed_downloads(server, monkeypatch, tmp_path):
    _, url, _ = server
    monkeypatch.setitem(sources.MD5, "frey_faces", {"frey_rawface.mat": None})
    with pytest.raises(DataError, match=r"frey_rawface\.mat: truncated download .* \(10 of 100000 bytes\)"):
        data.fetch("frey_faces", tmp_path / "raw", url=url + "short/")
    with pytest.raises(DataError, match=r"frey_rawface\.mat: download from .* failed \(HTTP Error 404"):
        data.fetch("frey_faces", tmp_path / "raw", url=url + "missing/")
    assert list((tmp_path / "raw" / "frey_faces").iterdir()) == []


def test_read_idx_rejects_corrupt_files(tmp_path):
    good = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "a-idx3-ubyte.gz"
    path.write_bytes(idx_gz(good))
    np.testing.assert_array_equal(data.read_idx(path), good)
    header = bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big")  # int32 big-endian, uncompressed
    (tmp_path / "b").write_bytes(header + np.array([1, -2, 70000], dtype=">i4").tobytes())
    np.testing.assert_array_equal(data.read_idx(tmp_path / "b"), [1, -2, 70000])
    cases = {
        "truncated": (
            gzip.compress(gzip.decompress(idx_gz(good))[:-1]),
            "IDX data has 23 bytes, expected 24",
        ),
        "padded": (gzip.compress(gzip.decompress(idx_gz(good)) + b"\0"), "(truncated or corrupt)"),
        "magic": (gzip.compress(b"\x00\x00\x07\x03" + bytes(30)), "bad magic number 00000703"),
        "gzip": (idx_gz(good)[:-8], "corrupt gzip file"),
        "empty": (b"", "bad magic number empty"),
        "header": (gzip.compress(b"\x00\x00\x08\x03\x00\x00"), "corrupt IDX header"),
    }
    for name, (blob, message) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / name))}: .*{re.escape(message)}"):
            data.read_idx(tmp_path / name)


def test_frey_faces_download(server, tmp_path, caplog):
    root, url, _ = server
    faces = np.random.default_rng(1).integers(0, 256, size=(7, 28, 20), dtype=np.uint8)
    scipy.io.savemat(root / "frey_rawface.mat", {"ff": faces.reshape(7, 560).T})  # one face per column
    with caplog.at_level(logging.WARNING, logger="vaerepro.sources"):
        data.fetch("frey_faces", tmp_path / "raw", url=url + "frey_rawface.mat")  # a file URL works too
    assert "frey_rawface.mat: no known md5, checksum not checked" in caplog.text
    raw = data.load_raw("frey_faces", tmp_path / "raw")
    np.testing.assert_array_equal(raw.x, faces)
    assert raw.y is None and raw.image_shape == (28, 20) and raw.quantized
    meta = data.prepare("frey_faces", tmp_path / "raw", tmp_path / "prep")
    assert meta["sizes"] == {"train": 5, "val": 1, "test": 1} and meta["data_dim"] == 560
    splits = data.load_prepared(tmp_path / "prep")
    assert splits.y_train is None and splits.image_shape == (28, 20)
    assert sorted(meta["files"]) == ["x_test.npy", "x_train.npy", "x_val.npy"]


# --------------------------------------------------------------------------------------------- npz


def test_npz_uint8_images_with_labels(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(12, 5, 7), dtype=np.uint8)
    y = np.arange(12) % 3
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    assert data.fetch("npz", tmp_path / "raw", path=tmp_path / "mine.npz") == tmp_path / "mine.npz"
    raw = data.load_raw("npz", tmp_path / "raw", path=tmp_path / "mine.npz")
    np.testing.assert_array_equal(raw.x, x)
    np.testing.assert_array_equal(raw.y, y)
    assert raw.y.dtype == np.int64 and raw.image_shape == (5, 7) and raw.quantized
    assert raw.files == {"mine.npz": md5((tmp_path / "mine.npz").read_bytes())}


@pytest.mark.parametrize(("d", "image_shape"), [(16, (4, 4)), (10, (1, 10))])
def test_npz_float_vectors_without_labels(tmp_path, d, image_shape):
    x = np.random.default_rng(0).random((20, d))  # float64 in [0, 1)
    x[0, 0], x[1, 1] = 0.0, 1.0
    np.savez(tmp_path / "f.npz", x=x)
    raw = data.load_raw("npz", tmp_path, path=tmp_path / "f.npz")
    assert raw.x.dtype == np.float32 and raw.x.shape == (20, *image_shape) and not raw.quantized
    np.testing.assert_array_equal(raw.x.reshape(20, d), x.astype(np.float32))
    assert raw.y is None and raw.image_shape == image_shape
    meta = data.prepare("npz", tmp_path, tmp_path / "prep", path=tmp_path / "f.npz")
    splits = data.load_prepared(tmp_path / "prep")
    assert meta["quantized"] is False and splits.train.dtype == np.float32 and splits.y_val is None


def test_npz_integer_levels_become_uint8(tmp_path):
    np.savez(tmp_path / "i.npz", x=np.array([[0, 255, 17, 3]], dtype=np.int16), y=np.array([2.0]))
    raw = data.load_raw("npz", tmp_path, path=tmp_path / "i.npz")
    assert raw.x.dtype == np.uint8 and raw.quantized and raw.image_shape == (2, 2)
    np.testing.assert_array_equal(raw.x.ravel(), [0, 255, 17, 3])
    assert raw.y.tolist() == [2] and raw.y.dtype == np.int64


def _npz_bytes(**arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _npy_overstated() -> bytes:
    """A valid .npy header claiming shape (10**12,) uint8 (1 TB) over 12 bytes of data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": (10**12,)})
    return buffer.getvalue() + bytes(12)


def _save(**arrays):
    return lambda path: np.savez(path, **arrays)


def _write(blob: bytes):
    return lambda path: path.write_bytes(blob)


def _zip(**members: bytes):
    """A zip archive holding ``members`` (name -> bytes), as a writer for BAD_NPZ."""

    def write(path):
        with zipfile.ZipFile(path, "w") as zf:
            for name, blob in members.items():
                zf.writestr(name, blob)

    return write


NOT_AN_NPZ = "not an .npz archive"
SAVEZ_HINT = "an .npz is a zip of .npy arrays, written by numpy.savez"

BAD_NPZ = {
    "missing": (None, "file not found"),
    # Files that are not zips at all: say what they start with, never numpy's "pickled data" message.
    "garbage": (
        _write(b"not a zip archive"),
        f"{NOT_AN_NPZ} (it starts with b'not a zip archiv'; {SAVEZ_HINT})",
    ),
    "text": (
        _write(b"hello, this is not an array\n"),
        f"{NOT_AN_NPZ} (it starts with b'hello, this is n'; {SAVEZ_HINT})",
    ),
    "csv": (_write(b"x0,x1,x2\n0.1,0.2,0.3\n"), f"{NOT_AN_NPZ} (it starts with b'x0,x1,x2\\n0.1,0.2';"),
    "binary": (_write(b"\x80\x04\x95\x00\x00"), f"{NOT_AN_NPZ} (it starts with b'\\x80\\x04\\x95"),
    "empty_file": (_write(b""), f"empty file (0 bytes), {NOT_AN_NPZ} ({SAVEZ_HINT})"),
    "single_npy": (
        lambda p: p.write_bytes(_npy_bytes(np.zeros((3, 4), np.uint8))),
        f"{NOT_AN_NPZ} but a single .npy array (numpy.save)",
    ),
    "single_npy_object": (
        lambda p: p.write_bytes(_npy_bytes(np.array([1, "a"], dtype=object))),
        f"{NOT_AN_NPZ} but a single .npy array (numpy.save)",
    ),
    # Zips that are cut short or are not .npz archives.
    "truncated_zip": (
        lambda p: p.write_bytes(_npz_bytes(x=np.zeros((3, 4)))[:-30]),
        "truncated or corrupt .npz archive",
    ),
    "truncated_half": (
        lambda p: p.write_bytes((b := _npz_bytes(x=np.zeros((30, 4))))[: len(b) // 2]),
        "truncated or corrupt .npz archive",
    ),
    "zip_of_csv": (_zip(**{"data.csv": b"1,2\n3,4\n"}), "no array 'x' in the archive (found ['data.csv'])"),
    "x_not_npy": (
        _zip(**{"x.npy": b"hello, this is not an array\n"}),
        "x in the archive is not an .npy array",
    ),
    "x_header_overstates": (
        _zip(**{"x.npy": _npy_overstated()}),  # refused before numpy allocates 1 TB
        "x is corrupt: its .npy header says shape (1000000000000,) uint8 (1000000000000 bytes) "
        "but it holds 12 bytes",
    ),
    "bad_crc": (
        lambda p: p.write_bytes(_npz_bytes(x=np.zeros((3, 4), np.uint8)).replace(bytes(12), b"\x01" * 12, 1)),
        "x in the archive is corrupt or unreadable (Bad CRC-32",
    ),
    "no_x": (_save(images=np.zeros((3, 4), np.uint8)), "no array 'x' in the archive (found ['images'])"),
    "ndim4": (_save(x=np.zeros((2, 3, 4, 5), np.uint8)), "got ndim 4"),
    "ndim1": (_save(x=np.zeros(5, np.uint8)), "got ndim 1"),
    "empty": (_save(x=np.zeros((0, 28, 28), np.uint8)), "x is empty"),
    "above_one": (_save(x=np.full((3, 4), 2.0)), "float x must lie in [0, 1], found range [2.0, 2.0]"),
    # a rounding above 1 shows as such, and is not taken for 8-bit levels
    "just_above_one": (
        _save(x=np.array([[0.5, np.nextafter(np.float32(1), np.float32(2))]], np.float32)),
        "found range [0.5, 1.0000001192092896]",
    ),
    "directory": (lambda p: p.mkdir(), "a directory, not an .npz file"),
    "negative": (_save(x=np.full((3, 4), -0.5)), "float x must lie in [0, 1]"),
    "nan": (_save(x=np.array([[0.5, np.nan]])), "x contains NaN or inf"),
    "inf": (_save(x=np.array([[0.5, np.inf]])), "x contains NaN or inf"),
    "int_range": (
        _save(x=np.array([[0, 300]], np.int16)),
        "must hold grey levels 0..255, found range 0..300",
    ),
    "int_negative": (_save(x=np.array([[-1, 3]], np.int64)), "found range -1..3"),
    # binary images stored as integers would be read as grey levels 0..255: nearly black
    "int_binary": (_save(x=np.array([[0, 1], [1, 1]], np.uint8)), "uint8) holds only 0 and 1, which would"),
    "int64_binary": (_save(x=np.eye(4, dtype=np.int64)), "store binary images as bool or as float 0.0/1.0"),
    "huge_images": (_save(x=np.zeros((2, 1001, 1000), np.uint8)), "images of 1,001,000 pixels"),
    "complex": (_save(x=np.zeros((2, 4), np.complex64)), "unsupported x dtype complex64"),
    # Arrays of Python objects: the only case where pickling is the real story.
    "object": (
        _save(x=np.array([[1, "a"]], dtype=object)),
        "x holds Python objects (dtype object); object arrays are not supported",
    ),
    "y_object": (
        _save(x=np.zeros((2, 4), np.uint8), y=np.array([1, "a"], dtype=object)),
        "y holds Python objects (dtype object); object arrays are not supported",
    ),
    "y_length": (_save(x=np.zeros((3, 4), np.uint8), y=np.arange(4)), "y has shape (4,), expected (3,)"),
    "y_ndim": (_save(x=np.zeros((3, 4), np.uint8), y=np.zeros((3, 1), int)), "y has shape (3, 1)"),
    "y_float": (_save(x=np.zeros((2, 4), np.uint8), y=np.array([0.5, 1.0])), "y must hold integer labels"),
}


@pytest.mark.parametrize("case", BAD_NPZ)
def test_npz_bad_inputs_raise_naming_file_and_problem(case, tmp_path):
    write, problem = BAD_NPZ[case]
    path = tmp_path / f"{case}.npz"
    if write is not None:
        write(path)
    with pytest.raises(DataError) as info:
        data.load_raw("npz", tmp_path, path=path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and problem in message
    assert "\n" not in message  # one line: the CLI prints it as is
    # numpy's "contains pickled (object) data" for non-.npy bytes would send the user the wrong way
    assert "pickle" not in message.removeprefix(str(path)).lower()
    assert isinstance(info.value, ValueError)


# A small file that expands a lot: 1,000,000 zero bytes compress to about 1 KB.
BIG_X = np.zeros((1000, 1000), np.uint8)


def _npy_size(array):
    return len(_npy_bytes(array))  # what the zip member holds once decompressed: .npy header + data


def test_npz_over_max_npz_bytes_is_refused_from_the_zip_headers(tmp_path, monkeypatch):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x=BIG_X)
    assert path.stat().st_size < 10_000
    size = _npy_size(BIG_X)

    def no_decompression(*args, **kwargs):
        raise AssertionError("a member was opened: the size check must come from the zip headers alone")

    with monkeypatch.context() as m:
        m.setattr(zipfile.ZipFile, "open", no_decompression)
        with pytest.raises(DataError) as info:
            data.load_raw("npz", tmp_path, path=path, max_npz_bytes=1000)
    assert str(info.value) == (
        f"{path}: x decompresses to {size} bytes (976.7 KiB), over data.max_npz_bytes=1000; "
        "raise data.max_npz_bytes or shrink the file"
    )
    # through prepare as well: refused before anything is written
    with pytest.raises(DataError, match=r"x decompresses to \d+ bytes .*over data\.max_npz_bytes=1000;"):
        data.prepare("npz", tmp_path, tmp_path / "prep", path=path, max_npz_bytes=1000)
    assert not (tmp_path / "prep").exists()
    # the limit is inclusive: exactly the decompressed size loads, one byte less does not
    raw = data.load_raw("npz", tmp_path, path=path, max_npz_bytes=size)
    assert raw.x.shape == (1000, 1, 1000) and raw.quantized  # (N, D), D not a square: (N, 1, D)
    with pytest.raises(DataError, match=f"x decompresses to {size} bytes"):
        data.load_raw("npz", tmp_path, path=path, max_npz_bytes=size - 1)


def test_npz_max_npz_bytes_counts_x_and_y(tmp_path):
    x, y = np.zeros((10, 4), np.uint8), np.arange(10)
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    total = _npy_size(x) + _npy_size(y)
    raw = data.load_raw("npz", tmp_path, path=tmp_path / "xy.npz", max_npz_bytes=total)
    assert raw.y.tolist() == list(range(10))
    with pytest.raises(DataError, match=f"x and y decompress to {total} bytes"):
        data.load_raw("npz", tmp_path, path=tmp_path / "xy.npz", max_npz_bytes=total - 1)


def test_max_npz_bytes_defaults_to_8_gib_and_is_set_through_the_config():
    from pydantic import ValidationError

    from conftest import compose
    from vaerepro import config as config_mod

    assert data.DEFAULT_MAX_NPZ_BYTES == 8 * 2**30  # 8 GiB
    cfg = config_mod.validate(compose("data=npz", "data.path=/tmp/mine.npz", "data.max_npz_bytes=1000"))
    assert cfg.data.max_npz_bytes == 1000
    assert config_mod.validate(compose("data=npz", "data.path=/tmp/mine.npz")).data.max_npz_bytes == 8 * 2**30
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        config_mod.DataConfig(max_npz_bytes=0)


def test_an_idx_path_that_is_a_directory_is_not_called_a_corrupt_gzip_file(tmp_path):
    # the file cannot be read at all: saying its gzip is corrupt sends the user after the wrong problem
    folder = tmp_path / "train-images-idx3-ubyte.gz"
    folder.mkdir()
    with pytest.raises(DataError) as err:
        formats.read_idx(folder)
    assert str(err.value).startswith(f"{folder}: cannot read the file (")
    assert "gzip" not in str(err.value)


def test_a_url_without_a_scheme_is_a_data_error_and_leaves_nothing(tmp_path):
    """data.url=example.com/frey/ (no http://) was urllib's ValueError traceback."""
    with pytest.raises(DataError) as info:
        data.fetch("frey_faces", tmp_path / "raw", url="example.com/frey/")
    dest = tmp_path / "raw" / "frey_faces" / "frey_rawface.mat"
    assert str(info.value) == (
        f"{dest}: download from example.com/frey/frey_rawface.mat failed (unknown url type: "
        "'example.com/frey/frey_rawface.mat'); set data.url to a mirror, or put the file there yourself "
        "(under data.raw_dir)"
    )
    assert list((tmp_path / "raw" / "frey_faces").iterdir()) == []
