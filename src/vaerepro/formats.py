"""File formats: the bytes of one raw file -> numpy arrays, as stored.

- ``read_idx``: an IDX file (LeCun's MNIST format), gzip-compressed or not; ``read_idx_pair`` reads an
  images file and its labels file together;
- ``read_frey``: the Frey Face ``frey_rawface.mat`` (MATLAB);
- ``read_npz``: the user's own ``.npz``, read from its zip directly, with a cap on what it decompresses to
  (``DEFAULT_MAX_NPZ_BYTES``).

A reader knows a format, not where its file came from: source names, URLs, checksums and downloads live in
``sources``, which builds on this module (this one imports nothing else of vaerepro's but ``errors``).

Every bad input raises ``DataError`` (a ``ValueError``) whose message names the file and the problem.
Only numpy and the standard library are imported at module level; scipy (the Frey faces ``.mat``) is
imported where it is needed.
"""

from __future__ import annotations

import gzip
import logging
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from vaerepro.errors import UserError

log = logging.getLogger(__name__)

# Default cap on what a user's .npz may decompress to, in bytes (8 GiB): a few-KB compressed file can expand
# to fill memory (a zip bomb, or just an unintended huge array), so the zip headers are checked first.
DEFAULT_MAX_NPZ_BYTES = 8 * 2**30


class DataError(UserError, ValueError):
    """A bad input (missing, unreadable, corrupt, invalid); the message names the file and the problem."""


# --------------------------------------------------------------------------------------------- IDX


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path, *, name: str | None = None) -> np.ndarray:
    """Parse an IDX file, gzip-compressed or not, as LeCun's MNIST page defines it (``name``: for messages).

    Header: two zero bytes, a type code, the number of dims, then each dim as a big-endian uint32; the data
    must fill exactly the product of the dims (a truncated or padded file is rejected).
    """
    path = Path(path)
    name = name or str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except OSError as exc:  # a directory, no permission: not a corrupt file, so not called one
        raise DataError(f"{path}: cannot read the file ({_one_line(exc)})") from exc
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise DataError(f"{name}: corrupt gzip file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{name}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{name}: corrupt IDX header ({ndim} dims, {len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{name}: IDX data has {len(raw) - header} bytes, "
            f"expected {expected} for shape {shape} (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An IDX images file, (N, H, W), and its labels file, (N,), checked to match; labels as int64."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(
            f"{images_path}: expected (N, H, W) images and (N,) labels, "
            f"got {images.shape} and {labels.shape} ({labels_path.name})"
        )
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}")
    return images, labels.astype(np.int64)


# --------------------------------------------------------------------------------------------- Frey faces


def read_frey(path: Path, *, name: str | None = None) -> np.ndarray:
    """``frey_rawface.mat``: variable ``ff`` of shape (560, N), one 28x20 face (row-major) per column."""
    import scipy.io

    name = name or str(path)
    try:
        mat = scipy.io.loadmat(path)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError... on corrupt files
        raise DataError(f"{name}: not a readable .mat file ({exc})") from exc
    ff = mat.get("ff")
    if ff is None:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{name}: no variable 'ff' (found {found})")
    if ff.ndim != 2 or ff.shape[0] != 28 * 20:
        raise DataError(f"{name}: 'ff' should have shape (560, N), got {ff.shape}")
    return np.ascontiguousarray(ff.T.reshape(-1, 28, 20))  # (N, 28, 20)


# --------------------------------------------------------------------------------------------- npz


_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first local header, or the end record of an empty zip
_PREVIEW_BYTES = 16  # how much of a file that is not an .npz its message quotes
_SAVEZ_HINT = "an .npz is a zip of .npy arrays, written by numpy.savez"
_NPY_HEADER_READERS = {  # .npy format version -> header reader (3.0 only holds structured dtypes: refused)
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
# What reading a corrupt zip member can raise: zlib/CRC errors, short reads, an unsupported compression
# method (NotImplementedError) or an encrypted member (RuntimeError), numpy's header ValueErrors.
_MEMBER_ERRORS = (
    ValueError,
    OSError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    RuntimeError,
)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _human_bytes(n: int) -> str:
    """``n`` bytes in binary units with one decimal, e.g. ``954.8 KiB`` or ``8.0 GiB``."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def read_npz(
    path: Path, *, max_npz_bytes: int = DEFAULT_MAX_NPZ_BYTES
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``x`` (and ``y`` if present, else None) from the user's .npz at ``path``, as stored.

    Reads the zip directly rather than through ``np.load``: every failure gets a message saying what the
    file is (numpy calls any non-zip, non-.npy bytes "pickled data"), and the members' decompressed sizes
    (``ZipInfo.file_size``, bytes) are checked against ``max_npz_bytes`` before anything is decompressed.
    """
    if path.is_dir():
        raise DataError(f"{path}: a directory, not an .npz file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            head = f.read(_PREVIEW_BYTES)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({_one_line(exc)})") from exc
    if not head:
        raise DataError(f"{path}: empty file (0 bytes), not an .npz archive ({_SAVEZ_HINT})")
    if head.startswith(np.lib.format.MAGIC_PREFIX):
        raise DataError(
            f"{path}: not an .npz archive but a single .npy array (numpy.save); "
            "write x (and y) with numpy.savez(path, x=x, y=y)"
        )
    if not head.startswith(_ZIP_MAGICS):
        raise DataError(f"{path}: not an .npz archive (it starts with {head!r}; {_SAVEZ_HINT})")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        # e.g. a file cut short loses the zip's central directory, stored at its end
        raise DataError(
            f"{path}: truncated or corrupt .npz archive: it starts like a zip, but zipfile cannot read it "
            f"({_one_line(exc)})"
        ) from exc
    with zf:
        # numpy.savez names the members "<key>.npy"; like np.load, accept "<key>" too
        members = {}
        for info in zf.infolist():
            members.setdefault(info.filename.removesuffix(".npy"), info)
        if "x" not in members:
            raise DataError(f"{path}: no array 'x' in the archive (found {sorted(members)})")
        if "y" not in members and (others := sorted(set(members) - {"x"})):
            # labels are read from y only (guessing among other arrays could take the wrong one); without
            # them the evaluation has no kNN accuracy and the report no per-class figures, so say so
            log.warning(
                "%s: no array 'y', so no labels (no kNN accuracy, no per-class figures); the archive also "
                "holds %s: save the labels as y (numpy.savez(path, x=x, y=labels)) to use them",
                path,
                ", ".join(repr(k) for k in others),
            )
        keys = ["x", "y"] if "y" in members else ["x"]
        total = sum(members[k].file_size for k in keys)  # decompressed bytes, from the zip's headers
        if total > max_npz_bytes:
            names, verb = " and ".join(keys), "decompress" if len(keys) > 1 else "decompresses"
            raise DataError(
                f"{path}: {names} {verb} to {total} bytes ({_human_bytes(total)}), "
                f"over data.max_npz_bytes={max_npz_bytes}; raise data.max_npz_bytes or shrink the file"
            )
        return tuple(_read_npz_member(path, zf, members[k], k) if k in members else None for k in ("x", "y"))


def npz_x_dtype(path: Path) -> np.dtype | None:
    """The dtype the .npy header of ``x`` in the .npz at ``path`` declares, read without its data, or None
    when the file cannot say (missing, not a zip, no ``x``, a damaged header): ``read_npz`` then reports
    what is wrong, when the data are prepared. For the refusals that need to know whether the data are 8-bit
    levels before they are prepared (cli.stage_check)."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = {info.filename.removesuffix(".npy"): info for info in zf.infolist()}
            with zf.open(members["x"]) as f:
                return _NPY_HEADER_READERS[np.lib.format.read_magic(f)](f)[2]
    except (KeyError, *_MEMBER_ERRORS):
        return None


def npz_keys(path: Path) -> set[str] | None:
    """The names of the arrays in the .npz at ``path`` ("x", "y", ...), read from the zip's directory
    without decompressing anything, or None when the file cannot say (missing, not a zip): ``read_npz``
    then reports what is wrong, when the data are prepared. For the sweep's refusal of a kNN objective
    on data without labels (sweep.space.refuse_unlabelled)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return {info.filename.removesuffix(".npy") for info in zf.infolist()}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None


def _read_npz_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> np.ndarray:
    """The .npy array in member ``info`` (named ``key`` in messages) of the open archive ``zf``.

    The header is checked before numpy reads the data: no object arrays (they would need pickle), and the
    shape it claims must fit in the member's decompressed size, so a corrupt header cannot make numpy
    allocate more than the size cap already allowed.
    """
    try:
        with zf.open(info) as f:
            try:
                version = np.lib.format.read_magic(f)
            except ValueError as exc:
                raise DataError(
                    f"{path}: {key} in the archive is not an .npy array ({_one_line(exc)})"
                ) from exc
            if version not in _NPY_HEADER_READERS:
                raise DataError(f"{path}: {key} uses .npy format version {version}, unsupported")
            shape, _fortran, dtype = _NPY_HEADER_READERS[version](f)
            if dtype.hasobject:
                raise DataError(
                    f"{path}: {key} holds Python objects (dtype {dtype}); object arrays are not supported "
                    "(store numbers: uint8 0..255 or float in [0, 1], integer labels)"
                )
            claimed, held = math.prod(shape) * dtype.itemsize, info.file_size - f.tell()  # bytes
            if claimed > held:
                raise DataError(
                    f"{path}: {key} is corrupt: its .npy header says shape {shape} {dtype} ({claimed} bytes) "
                    f"but it holds {held} bytes"
                )
            f.seek(0)  # read_array parses the header again; seeking back re-reads only these few bytes
            return np.lib.format.read_array(f, allow_pickle=False)
    except DataError:
        raise
    except _MEMBER_ERRORS as exc:
        raise DataError(f"{path}: {key} in the archive is corrupt or unreadable ({_one_line(exc)})") from exc
