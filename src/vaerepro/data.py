"""Data: raw arrays -> validated images -> deterministic splits -> data spaces.

The steps, each a plain function:

1. ``fetch(source, raw_dir)`` (from ``sources``) puts the raw files under ``raw_dir/<source>/``;
   ``load_raw(source, raw_dir)`` reads them back and ``validate_arrays`` checks and normalises the images
   ((N, H, W) uint8 grey levels, or float32 in [0, 1]) and labels.
2. ``prepare(source, raw_dir, out_dir)`` shuffles the raw data with a seeded numpy Generator and writes
   disjoint train/val/test arrays of shape (N, D) plus ``meta.json`` (split kind, sizes, checksums,
   provenance). ``split="pooled"`` cuts all of a source's examples by fractions; ``split="official"`` keeps
   the source's own test set (MNIST's t10k files) and draws validation from its training files only.
   ``load_prepared(out_dir)`` reads them back after verifying every checksum.
3. ``to_space`` / ``fixed_space`` turn a batch of stored pixels into the model's data space
   (``likelihoods.DATA_SPACES``): ``binary`` (Bernoulli draw of the grey levels) or ``continuous``
   (uniform dequantisation of 8-bit levels).

Where raw files come from (downloads, checksums) lives in ``sources``, how they are read in ``formats``;
the names other modules import from here are re-exported below. Every bad input raises ``DataError`` (a
``ValueError``) whose message names the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vaerepro.formats import npz_keys, npz_x_dtype
from vaerepro.likelihoods import DATA_SPACES
from vaerepro.sources import (
    DEFAULT_MAX_NPZ_BYTES,
    DEFAULT_URLS,
    IDX_FILES,
    MD5,
    SPLIT_KINDS,
    UNLABELLED_SOURCES,
    DataError,
    dir_md5,
    fetch,
    file_md5,
    file_sha256,
    fresh_sibling,
    read_arrays,
    read_idx,
    split_kind_error,
)

__all__ = [
    # defined in sources, re-exported: the names callers and tests use as data.X
    "DEFAULT_MAX_NPZ_BYTES",
    "DEFAULT_URLS",
    "IDX_FILES",
    "MD5",
    "DataError",
    "dir_md5",
    "fetch",
    "file_sha256",
    "read_idx",
    # defined here
    "FORMAT_VERSION",
    "META_FILE",
    "SPLITS",
    "RawData",
    "Splits",
    "dim_log_jacobian",
    "fixed_space",
    "is_dequantized",
    "load_prepared",
    "load_raw",
    "prepare",
    "split_indices",
    "split_sizes",
    "to_space",
    "validate_arrays",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
META_FILE = "meta.json"
FORMAT_VERSION = 1  # of the files prepare writes (meta.json "format_version")


# --------------------------------------------------------------------------------------------- raw data


@dataclass
class RawData:
    x: np.ndarray  # (N, H, W) uint8 (grey levels 0..255), or float32 in [0, 1]
    y: np.ndarray | None  # (N,) int64, or None without labels
    image_shape: tuple[int, int]
    quantized: bool  # True for 8-bit data (uint8), False for float data
    source: str
    files: dict[str, str]  # raw file name -> md5 (provenance)
    n_official_test: int | None = None  # the last n examples are the source's own test set; None: none


def load_raw(
    source: str, raw_dir: Path, *, path: Path | None = None, max_npz_bytes: int = DEFAULT_MAX_NPZ_BYTES
) -> RawData:
    """Read and validate the raw files ``fetch`` put in place (for ``npz``: the user's file at ``path``).

    ``max_npz_bytes``: refuse an ``npz`` whose ``x`` and ``y`` decompress to more bytes than this.
    """
    raw = read_arrays(source, raw_dir, path=path, max_npz_bytes=max_npz_bytes)
    x, y, image_shape, quantized = validate_arrays(raw.x, raw.y, raw.origin)
    return RawData(x, y, image_shape, quantized, source, raw.files, raw.n_official_test)


MAX_PIXELS = 1_000_000  # pixels per image (1000 x 1000); the MLP's first layer has pixels x hidden weights


def validate_arrays(
    x: np.ndarray, y: np.ndarray | None, file: Path | str
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int], bool]:
    """Check and normalise images ``x`` and labels ``y`` read from ``file``.

    ``x``: (N, H, W) or (N, D) with N, D > 0; uint8, another integer dtype with values in 0..255, or float
    (or bool) in [0, 1] without NaN/inf. (N, D) becomes (N, s, s) when D = s*s, else (N, 1, D).
    ``y``: (N,) integers, or None. Returns ``(x, y, image_shape, quantized)`` with ``x`` uint8 (quantized)
    or float32 of shape (N, H, W) and ``y`` int64.
    """
    x = np.asarray(x)
    if x.ndim not in (2, 3):
        raise DataError(f"{file}: x must have shape (N, H, W) or (N, D), got ndim {x.ndim} (shape {x.shape})")
    if x.size == 0:
        raise DataError(f"{file}: x is empty (shape {x.shape})")
    if x.ndim == 3 and x.shape[1] * x.shape[2] > MAX_PIXELS or x.ndim == 2 and x.shape[1] > MAX_PIXELS:
        raise DataError(
            f"{file}: images of {math.prod(x.shape[1:]):,} pixels (x shape {x.shape}); at most "
            f"{MAX_PIXELS:,}, which the model's first layer alone would take gigabytes to hold"
        )
    if x.dtype.kind in "iu":  # not np.issubdtype(np.integer): numpy counts timedelta64 as an integer
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise DataError(
                f"{file}: integer x ({x.dtype}) must hold grey levels 0..255, found range {lo}..{hi}"
            )
        if hi == 1:
            # binary images stored as integers: read as grey levels they would be nearly black (1/255)
            raise DataError(
                f"{file}: integer x ({x.dtype}) holds only 0 and 1, which would be read as grey levels "
                "0..255 (nearly black); store binary images as bool or as float 0.0/1.0"
            )
        x, quantized = x.astype(np.uint8), True
    elif x.dtype == np.bool_:
        x, quantized = x.astype(np.float32), False
    elif np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise DataError(f"{file}: x contains NaN or inf")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            hint = " (8-bit levels? store them as uint8)" if 1.5 < hi <= 255 and lo >= 0 else ""
            # repr: a value a rounding above 1 shows as 1.0000001, not as 1
            raise DataError(f"{file}: float x must lie in [0, 1], found range [{lo!r}, {hi!r}]{hint}")
        x, quantized = x.astype(np.float32), False
    else:
        raise DataError(f"{file}: unsupported x dtype {x.dtype} (use uint8 0..255 or float in [0, 1])")
    if x.ndim == 2:
        n, d = x.shape
        s = math.isqrt(d)
        x = x.reshape(n, s, s) if s * s == d else x.reshape(n, 1, d)
    x = np.ascontiguousarray(x)
    image_shape = (int(x.shape[1]), int(x.shape[2]))

    if y is not None:
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{file}: y has shape {y.shape}, expected ({len(x)},) to match x")
        if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all():
            y = y.astype(np.int64)
        if y.dtype.kind not in "iu":  # timedelta64 is a numpy integer subtype, and not a label
            raise DataError(f"{file}: y must hold integer labels, got dtype {y.dtype}")
        y = y.astype(np.int64)
    return x, y, image_shape, quantized


# --------------------------------------------------------------------------------------------- splits


def split_sizes(
    n: int, val_fraction: float, test_fraction: float, *, val_size: int | None = None
) -> dict[str, int]:
    """Split sizes for ``n`` examples: val and test are ``fraction * n`` rounded half up, train the rest.

    ``val_size``: the validation split's size as a count instead (``val_fraction`` is then unused).
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise DataError(f"{name} must lie in [0, 1), got {f}")
    n_val = math.floor(val_fraction * n + 0.5) if val_size is None else int(val_size)
    n_test = math.floor(test_fraction * n + 0.5)
    sizes = {"train": n - n_val - n_test, "val": n_val, "test": n_test}
    empty = [k for k, v in sizes.items() if v <= 0]
    if empty:
        given = f"val_fraction={val_fraction}" if val_size is None else f"val_size={val_size}"
        raise DataError(
            f"split {'/'.join(empty)} would be empty: {n} examples with "
            f"{given}, test_fraction={test_fraction} give sizes {sizes}"
        )
    return sizes


def split_indices(
    n: int,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_examples: int | None = None,
    split: str = "pooled",
    val_size: int | None = None,
    n_official_test: int | None = None,
) -> dict[str, np.ndarray]:
    """Disjoint train/val/test indices (int64) into ``n`` raw examples, as ``prepare`` uses them.

    ``split="pooled"``: one permutation of all ``n`` from ``np.random.default_rng(seed)``; its first
    ``max_examples`` entries (all if None) are the subsample, cut in order into train, val and test (sizes
    from ``split_sizes``; ``val_size`` instead of ``val_fraction`` when given).

    ``split="official"``: the last ``n_official_test`` raw examples are the source's own test set and are
    the test split, whole and in file order (``test_fraction`` and ``max_examples`` do not touch it). The
    other ``n - n_official_test`` (the training files) are permuted as above, the first ``max_examples``
    kept, and cut in order into train and val; val has ``val_size`` examples, or ``val_fraction`` of them.
    """
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples must be a positive integer, got {max_examples}")
    if split == "pooled":
        m = n if max_examples is None else min(n, max_examples)
        sizes = split_sizes(m, val_fraction, test_fraction, val_size=val_size)
        order = np.random.default_rng(seed).permutation(n)[:m].astype(np.int64)
        bounds = np.cumsum([sizes[s] for s in SPLITS])[:-1]
        return dict(zip(SPLITS, np.split(order, bounds), strict=True))
    if split != "official":
        raise DataError(f"unknown data.split {split!r}; allowed: {', '.join(SPLIT_KINDS)}")
    if n_official_test is None or not 0 < n_official_test < n:
        raise DataError(
            f"data.split=official needs the source's own test set: {n_official_test} of {n} examples given"
        )
    n_files = n - n_official_test  # the training files' examples: raw indices 0 .. n_files - 1
    m = n_files if max_examples is None else min(n_files, max_examples)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    n_val = math.floor(val_fraction * m + 0.5) if val_size is None else int(val_size)
    if not 0 < n_val < m:
        given = f"val_fraction={val_fraction}" if val_size is None else f"val_size={val_size}"
        raise DataError(
            f"split {'val' if n_val <= 0 else 'train'} would be empty: {m} examples of the training files "
            f"with {given} give sizes {{'train': {m - n_val}, 'val': {n_val}}}"
        )
    order = np.random.default_rng(seed).permutation(n_files)[:m].astype(np.int64)
    test = np.arange(n_files, n, dtype=np.int64)
    return {"train": order[: m - n_val], "val": order[m - n_val :], "test": test}


def prepare(
    source: str,
    raw_dir: Path,
    out_dir: Path,
    *,
    path: Path | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_examples: int | None = None,
    max_npz_bytes: int = DEFAULT_MAX_NPZ_BYTES,
    split: str = "pooled",
    val_size: int | None = None,
) -> dict:
    """Validate the raw data and write deterministic splits to ``out_dir``; return the meta dict.

    ``split``, ``val_size``: see ``split_indices``; ``split="official"`` is refused (DataError naming
    data.split and the source) for a source without its own test set, before any file is read.
    ``max_npz_bytes``: for source ``npz``, the most bytes ``x`` and ``y`` may decompress to (see load_raw).

    Writes ``x_{train,val,test}.npy`` as (N, D) uint8 (8-bit data) or float32, ``y_*.npy`` (int64) when the
    source has labels, and ``meta.json``. Everything is written to a temporary directory next to ``out_dir``
    which then replaces it, so a failure (validation included) leaves an existing ``out_dir`` untouched.
    """
    problem = split_kind_error(source, split)
    if problem:
        raise DataError(problem)
    raw = load_raw(source, raw_dir, path=path, max_npz_bytes=max_npz_bytes)
    index = split_indices(
        len(raw.x),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        max_examples=max_examples,
        split=split,
        val_size=val_size,
        n_official_test=raw.n_official_test,
    )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_sibling(out_dir, ".tmp")
    tmp.mkdir()
    try:
        files = {}
        flat = raw.x.reshape(len(raw.x), -1)  # (N, D)
        for part in SPLITS:  # not `split`: that is the split kind
            arrays = {f"x_{part}.npy": flat[index[part]]}
            if raw.y is not None:
                arrays[f"y_{part}.npy"] = raw.y[index[part]]
            for name, array in arrays.items():
                np.save(tmp / name, np.ascontiguousarray(array), allow_pickle=False)
                files[name] = file_sha256(tmp / name)
        all_index = np.concatenate([index[s] for s in SPLITS]).astype("<i8")
        meta = {
            "format_version": FORMAT_VERSION,
            "source": source,
            **({"path": str(path)} if path is not None else {}),
            "image_shape": list(raw.image_shape),
            "data_dim": int(flat.shape[1]),
            "quantized": raw.quantized,
            "dtype": str(flat.dtype),
            "has_labels": raw.y is not None,
            **split_settings(split, seed, val_size, val_fraction, test_fraction, max_examples),
            "n_raw": int(len(raw.x)),
            "sizes": {s: int(len(index[s])) for s in SPLITS},
            # sha256 of the raw-example indices of train, val, test concatenated (int64 little-endian)
            "split_indices_sha256": hashlib.sha256(all_index.tobytes()).hexdigest(),
            "files": files,  # written file -> sha256
            "raw_files": raw.files,  # raw file -> md5
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %s: sizes %s -> %s", source, meta["sizes"], out_dir)
    return meta


def _replace_dir(new: Path, dest: Path) -> None:
    """Move directory ``new`` to ``dest``, replacing it; the old ``dest`` is restored if the swap fails."""
    if not dest.exists():
        os.replace(new, dest)
        return
    old = fresh_sibling(dest, ".old")
    os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class Splits:
    train: np.ndarray  # (N_train, D)
    val: np.ndarray  # (N_val, D)
    test: np.ndarray  # (N_test, D)
    y_train: np.ndarray | None  # (N_train,) int64, or None without labels
    y_val: np.ndarray | None
    y_test: np.ndarray | None
    meta: dict

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.meta["image_shape"])

    @property
    def data_dim(self) -> int:
        return int(self.meta["data_dim"])

    @property
    def quantized(self) -> bool:
        return bool(self.meta["quantized"])

    @property
    def split(self) -> str:
        """The split kind (``SPLIT_KINDS``); a meta.json written before data.split existed is pooled."""
        return str(self.meta.get("split", "pooled"))


def load_prepared(out_dir: Path) -> Splits:
    """Read what ``prepare`` wrote, verifying every file's sha256 against ``meta.json`` first."""
    out_dir = Path(out_dir)
    meta_path = out_dir / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: file not found (run prepare first)")
    try:
        meta = json.loads(meta_path.read_text())
        files, sizes, data_dim = meta["files"], meta["sizes"], meta["data_dim"]
        missing = [k for k in ("image_shape", "quantized") if k not in meta]
        if missing:
            raise KeyError(missing)
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{meta_path}: corrupt meta file ({exc!r})") from exc
    prefixes = ("x", "y") if meta.get("has_labels") else ("x",)
    for name in (f"{p}_{s}.npy" for p in prefixes for s in SPLITS):
        if name not in files:
            raise DataError(f"{meta_path}: no checksum for {name}")
    arrays = {}
    for name, sha in files.items():
        p = out_dir / name
        if not p.is_file():
            raise DataError(f"{p}: file not found")
        actual = file_sha256(p)
        if actual != sha:
            raise DataError(f"{p}: sha256 mismatch, expected {sha}, got {actual} (modified since prepare?)")
        arrays[name] = np.load(p, allow_pickle=False)
    for s in SPLITS:
        x = arrays[f"x_{s}.npy"]
        if x.shape != (sizes[s], data_dim):
            raise DataError(f"{out_dir / f'x_{s}.npy'}: shape {x.shape} does not match meta.json")
    return Splits(
        *(arrays[f"x_{s}.npy"] for s in SPLITS),
        *(arrays.get(f"y_{s}.npy") for s in SPLITS),
        meta=meta,
    )


# --------------------------------------------------------------------------------------------- data spaces


def _check_space(space: str) -> None:
    if space not in DATA_SPACES:
        raise ValueError(f"unknown data space {space!r}; allowed: {', '.join(DATA_SPACES)}")


def to_space(
    x: torch.Tensor, space: str, *, quantized: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Map stored pixels (B, D) to float32 points of ``space``, drawing the randomness from ``generator``.

    ``quantized``: ``x`` holds 8-bit grey levels v in 0..255 (any dtype); otherwise floats in [0, 1].
    - ``binary``: x ~ Bernoulli(v / 255) (or Bernoulli(x)); a fresh draw per batch is dynamic binarisation.
    - ``continuous``: (v + u) / 256 with u ~ U[0, 1), i.e. uniform dequantisation into [v/256, (v+1)/256);
      float data is returned unchanged (as float32).
    """
    _check_space(space)
    if not isinstance(x, torch.Tensor):  # as_tensor on a tensor is one more (no-op) op a training step
        x = torch.as_tensor(x)
    if space == "binary":
        p = x.float() / 255.0 if quantized else x.float()
        # u < p is a Bernoulli(p) draw; written out because torch.bernoulli is several times slower than
        # torch.rand < p on a CPU
        u = torch.rand(p.shape, generator=generator, device=p.device)
        return (u < p).to(torch.float32)
    if not quantized:
        return x.float()
    v = x.float()
    u = torch.rand(v.shape, generator=generator, device=v.device)
    y = (v + u) / 256.0
    # In float32, v + u rounds up to v + 1 when u is within half an ulp of 1 (e.g. v = 255, u = 1 - 2^-24),
    # which would leave the half-open cell; clamp to the largest float below (v + 1) / 256 (exact in float32).
    upper = (v + 1.0) / 256.0
    return torch.minimum(y, torch.nextafter(upper, torch.zeros_like(upper)))


# The fixed draw of the test split's data space (binarisation / dequantisation) uses seed + TEST_SEED_OFFSET:
# the evaluate stage's, and the training's test-set curve (train.test_curve), so both score the same pixels
TEST_SEED_OFFSET = 2


def fixed_space(x: np.ndarray | torch.Tensor, space: str, *, quantized: bool, seed: int) -> torch.Tensor:
    """One fixed draw of ``to_space`` (validation/test): the same seed always gives the same tensor."""
    x = torch.as_tensor(x)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return to_space(x, space, quantized=quantized, generator=generator)


def is_dequantized(space: str, quantized: bool) -> bool:
    """Whether the model sees uniformly dequantized 8-bit data: 8-bit levels (``quantized``) in the
    ``continuous`` space. Binarised 8-bit data is not: its Bernoulli draws are exact points of {0,1}^D."""
    _check_space(space)
    return space == "continuous" and quantized


def _yaml_value(v) -> str:
    return "null" if v is None else str(v)


def split_settings(
    split: str,
    seed: int,
    val_size: int | None,
    val_fraction: float,
    test_fraction: float,
    max_examples: int | None,
) -> dict:
    """How the splits are made (split_indices), as meta.json records them: null for a setting the split
    kind does not use (val_fraction beside val_size; test_fraction with the official test split)."""
    return {
        "seed": int(seed),
        "split": split,
        "val_size": None if val_size is None else int(val_size),
        "val_fraction": float(val_fraction) if val_size is None else None,
        "test_fraction": float(test_fraction) if split == "pooled" else None,
        "max_examples": None if max_examples is None else int(max_examples),
    }


def config_split_settings(data_cfg) -> dict:
    """`split_settings` of a data config (config.DataConfig: data.split, data.split_seed, ...)."""
    d = data_cfg
    return split_settings(d.split, d.split_seed, d.val_size, d.val_fraction, d.test_fraction, d.max_examples)


def check_prepared_from(
    meta: dict,
    source: str,
    path: str | Path | None,
    prepared: Path,
    settings: dict | None = None,
) -> None:
    """DataError naming `prepared` when it was not made from the data the config names: another source
    than data.source (meta.json's ``source``), or, for source npz, another file than the one at `path`
    now, whatever its name (the md5 prepare recorded in meta.json's raw_files). DVC's prepare stage depends
    on data/ and the data params, not on the file data.path names, so `dvc repro` does not prepare again
    when that file changes; and `vaerepro train` after `vaerepro params` without `vaerepro prepare` finds the
    old prepared/: the stages would train and evaluate the old data under the config's labels. `settings`
    (`config_split_settings`): also refused, splits made with other settings than the config's. `path` is
    read as prepare reads it (`~` expanded, relative to the working directory); a path where no file is now
    is refused when it is not the one prepare read (meta.json's ``path``)."""
    again = "prepare it again: vaerepro prepare, or under DVC dvc repro -f prepare"
    made_from = meta.get("source")
    if made_from is not None and made_from != source:
        raise DataError(
            f"{prepared}: made from data source {made_from!r}"
            + (f" ({meta['path']})" if meta.get("path") else "")
            + f", but the config has data.source={source!r}; {again}"
        )
    # `settings` (split_settings of the config): splits made otherwise would train and evaluate other
    # examples than the run's params say; a meta.json of an older format without a key is not judged on it
    for key, want in (settings or {}).items():
        if key in meta and meta[key] != want:
            name = "data.split_seed" if key == "seed" else f"data.{key}"
            raise DataError(
                f"{prepared}: its splits were made with {name}={_yaml_value(meta[key])}, but the config has "
                f"{name}={_yaml_value(want)}; {again}"
            )
    if source != "npz" or path is None:
        return
    # as prepare reads it (cli._data_path): `~/x.npz` and a relative path name the file prepare found
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        # nothing to hash: only the name tells, and another name is other data as far as anyone can know (a
        # data.path changed to a file not there yet would otherwise label the old splits with its name)
        before = meta.get("path")
        if before and Path(before).expanduser().resolve() != path:
            raise DataError(
                f"{prepared}: made from {before}, but the config has data.path={path}, which does not exist; "
                f"{again}"
            )
        return
    raw_files = meta.get("raw_files") or {}
    # an .npz source is one file: its md5 is the only entry, under the name the file had at prepare
    recorded = raw_files.get(Path(path).name)
    if recorded is None and len(raw_files) == 1:
        recorded = next(iter(raw_files.values()))
    if recorded is not None and (now := file_md5(Path(path))) != recorded:
        before = meta.get("path") or next(iter(raw_files))  # raw_files' name: a meta.json without path
        if meta.get("path"):
            same = Path(before).expanduser().resolve() == Path(path).expanduser().resolve()
        else:
            same = Path(before).name == Path(path).name
        what = f"another version of {path}" if same else f"{before}, not {path}"
        raise DataError(
            f"{prepared}: made from {what} (md5 {recorded[:12]}; the file now has {now[:12]}); {again}"
        )


def stored_quantized(source: str, path: Path | None) -> bool | None:
    """Whether `prepare` will find 8-bit levels in `source` (validate_arrays' rule: an integer x), known
    before it reads the data: every built-in source stores uint8 grey levels; a user's .npz (at `path`) says
    so in the header of its x (formats.npz_x_dtype). None when that cannot be read: prepare says why."""
    if source != "npz":
        return True
    dtype = npz_x_dtype(Path(path)) if path is not None else None
    return None if dtype is None else dtype.kind in "iu"


def stored_labels(source: str, path: Path | None) -> bool | None:
    """Whether `prepare` will find labels in `source`, known before it reads the data: every built-in source
    but UNLABELLED_SOURCES has them; a user's .npz (at `path`) has them when it holds an array y (the zip's
    directory says, formats.npz_keys). None when that cannot be read: prepare says why."""
    if source != "npz":
        return source not in UNLABELLED_SOURCES
    keys = npz_keys(Path(path)) if path is not None else None
    return None if keys is None else "y" in keys


def check_bounded(likelihood, space: str, quantized: bool, prepared: Path | str) -> None:
    """DataError naming `prepared` when `likelihood` (likelihoods.Likelihood) has an unbounded density on
    the prepared data in `space` (Likelihood.check_data): refused by the stages that train or evaluate it,
    as the config alone cannot know whether the data are 8-bit levels, and, when the data's files can tell
    before they are prepared (`stored_quantized`), by the check stage. `prepared`: what the message names."""
    try:
        likelihood.check_data(is_dequantized(space, quantized))
    except ValueError as err:
        raise DataError(f"{prepared}: {err}") from None


def dim_log_jacobian(space: str, quantized: bool) -> float:
    """Nats per dimension to add to -log p(x) / D so that it measures the 8-bit data.

    Uniform dequantisation spreads each level over a cell of width 1/256, so a density on [0, 1]^D gives
    -log P(v) = -log p(x) + D log 256: ``log(256)`` for dequantized data (``is_dequantized``), else 0.
    """
    return math.log(256.0) if is_dequantized(space, quantized) else 0.0
