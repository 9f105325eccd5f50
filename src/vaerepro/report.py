"""The report stage: figures and a self-contained HTML / Markdown report from result files.

Reads what `vaerepro train` and `vaerepro evaluate` wrote into `out_dir` (metrics/*.json, plots/elbo.csv,
artifacts/samples.npz) plus plain row dicts of other runs (the caller queries MLflow). Imports no torch,
mlflow, hydra or lightning.

Every number is printed with its unit (nats per example, bits/dim) and what it is (a lower bound, or an
estimate of log p(x)); results from different data spaces, or improper ones, never share a figure or a
table (see `compare`).

The report opens with the headline (log p(x) ± SE with its convergence verdict, ELBO, KL, bits/dim) and
ends with the configuration. It is built once as a list of blocks (heading, paragraph, warning, table,
figure) and rendered twice: HTML with every image inline as a base64 PNG, Markdown with images under
`figures/`.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import itertools
import json
import math
import re
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; figures are rendered to PNG bytes only

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from vaerepro.compare import (  # noqa: E402
    IncomparableError,
    comparability_key,
    converged,
    group_comparable,
    metric_value,
    rank,
    space_label,
)
from vaerepro.errors import UserError  # noqa: E402

NATS = "nats/example"
LADDER_SIGMAS = 3.0  # a ladder drop beyond this many combined standard errors is flagged
MAX_IMAGES = 16  # columns of the reconstruction / sample grids
EXCLUDED_STATUSES = {"FAILED", "KILLED"}


# --------------------------------------------------------------------------------------------- blocks


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Caution:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    kind: str = "table"  # css class; "ranking" tables carry their group in attrs
    attrs: dict[str, str] = field(default_factory=dict)
    row_attrs: list[dict[str, str]] | None = None


@dataclass
class Fig:
    name: str  # file stem under figures/ and html id "fig-<name>"
    alt: str
    png: bytes
    caption: str = ""


# ------------------------------------------------------------------------------------------- helpers


def _fmt(value, digits: int = 2, sign: bool = False) -> str:
    """A number with fixed decimals (and a + for positive ones if `sign`), or 'n/a' for missing / non-finite
    values."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return f"{v:{'+' if sign else ''}.{digits}f}" if math.isfinite(v) else "n/a"


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


def _pm(value, se, unit: str, digits: int = 2, sign: bool = False) -> str:
    """'value ± se unit', or 'value unit' without a finite se."""
    text = _fmt(value, digits, sign)
    if text == "n/a":
        return text
    if _fmt(se, digits) != "n/a":
        text += f" ± {_fmt(se, digits)}"
    return f"{text} {unit}"


def _verdict(row: Mapping) -> str:
    """The convergence verdict of a row's log p(x) estimate, in words (see estimators.convergence)."""
    c = converged(row)
    return "converged" if c else "NOT CONVERGED" if c is False else "convergence not checked"


def _log_px_text(row: Mapping) -> str:
    """'log p(x) ± SE nats/example (verdict)': every log p(x) the report shows carries its verdict."""
    text = _pm(row.get("log_px"), row.get("log_px_se"), NATS)
    return text if text == "n/a" else f"{text} ({_verdict(row)})"


def _bits_per_dim_kind(ev: Mapping) -> str:
    """What the bits/dim of this run measure, by data space (evaluate adds 8 bits only when dequantized)."""
    kind = "−log p(x) / (D ln 2), from the log p(x) estimate"
    space = ev.get("data_space")
    if space == "binary":
        return kind + "; a pmf on binary pixels, nothing added"
    if space == "continuous" and ev.get("quantized"):
        return kind + ", + 8 bits for the dequantized 8-bit data (log 256 per dimension)"
    if space == "continuous":
        return kind + "; a density on float pixels in [0,1], nothing added (can be negative)"
    return kind


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "x"


class ResultFileError(UserError, FileNotFoundError):
    """A result file the report needs is missing or unreadable (a FileNotFoundError for callers that
    catch that)."""


def _load_json(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise ResultFileError(f"{path}: file not found; it is written by `{stage}`: run that stage first")
    try:
        d = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ResultFileError(f"{path}: not valid JSON ({exc}); run `{stage}` again to rewrite it") from None
    if not isinstance(d, dict):
        raise ResultFileError(
            f"{path}: expected a JSON object, found {type(d).__name__}; run `{stage}` again"
        )
    return d


def _flatten(d: Mapping, prefix: str = "") -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            items.extend(_flatten(value, name + "."))
        else:
            items.append((name, json.dumps(value) if not isinstance(value, str) else value))
    return items


def _read_curves(path: Path) -> dict[str, np.ndarray]:
    """elbo.csv -> {column: float array}; empty cells become NaN."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    cols = rows[0].keys() if rows else ["epoch", "train_elbo", "val_elbo"]

    def num(s):
        try:
            return float(s)
        except (TypeError, ValueError):
            return math.nan

    return {c: np.array([num(r.get(c)) for r in rows], dtype=float) for c in cols}


def png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _as_images(a: np.ndarray) -> np.ndarray:
    """(n, H, W) images in [0, 1]; flat (n, D) with square D is reshaped, (n, H, W, 1) squeezed."""
    a = np.asarray(a, dtype=float)
    if a.ndim == 2:
        side = math.isqrt(a.shape[1])
        a = a.reshape(len(a), side, side) if side * side == a.shape[1] else a[:, None, :]
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    return np.clip(a, 0.0, 1.0)


def _tile(images: np.ndarray, ncols: int, pad: int = 1) -> np.ndarray:
    """(n, H, W[, C]) -> one (rows*(H+pad)-pad, ncols*(W+pad)-pad[, C]) mosaic, row-major, white gaps."""
    n, h, w = images.shape[:3]
    nrows = max(1, math.ceil(n / ncols))
    out = np.ones((nrows * (h + pad) - pad, ncols * (w + pad) - pad) + images.shape[3:])
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = img
    return out


def _image_figure(mosaic: np.ndarray, width_in: float = 8.0) -> tuple[Figure, object]:
    h, w = mosaic.shape[:2]
    fig = Figure(figsize=(width_in, max(1.2, width_in * h / w + 0.4)))
    ax = fig.add_subplot()
    ax.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    return fig, ax


# ------------------------------------------------------------------------------------------ the ladder


def ladder_is_decreasing(ladder: list[dict]) -> list[tuple[int, int]]:
    """Consecutive ladder points (k_small, k_large) where the estimate falls by more than LADDER_SIGMAS
    standard errors of the change.

    The SE of the change is the paired one (`gain_se`, the SE of the per-example differences, written by
    `evaluate`); for a ladder without it (an older eval.json), the unpaired sqrt(se_small^2 + se_large^2),
    which is far wider. The IWAE_k bound is non-decreasing in k in expectation (Burda et al. 2016), so such a
    drop means a bad proposal (heavy-tailed weights, too few samples) or a bug. Points without a finite
    log_px are skipped; a missing se counts as 0.
    """
    pts = sorted((p for p in ladder if metric_value(p, "log_px") is not None), key=lambda p: int(p["k"]))
    bad = []
    for a, b in itertools.pairwise(pts):
        se = metric_value(b, "gain_se")
        if se is None:
            se = math.hypot(metric_value(a, "se") or 0.0, metric_value(b, "se") or 0.0)
        if metric_value(a, "log_px") - metric_value(b, "log_px") > LADDER_SIGMAS * se:
            bad.append((int(a["k"]), int(b["k"])))
    return bad


def _ladder_section(ev: dict, label: str) -> list:
    ladder = ev.get("log_px_ladder") or []
    blocks: list = [Heading("log p(x) against the number of importance samples")]
    if not ladder:
        return blocks + [Para("No ladder in eval.json (log_px_ladder is empty).")]
    pts = sorted(ladder, key=lambda p: int(p["k"]))
    ks = np.array([int(p["k"]) for p in pts], dtype=float)
    vs = np.array([_nan_if_none(metric_value(p, "log_px")) for p in pts])
    ses = np.array([metric_value(p, "se") or 0.0 for p in pts])
    bad = ladder_is_decreasing(pts)
    if bad:
        by_k = {int(p["k"]): p for p in pts}
        pairs = "; ".join(
            f"k={a} → k={b}: {_pm(by_k[a]['log_px'], by_k[a].get('se'), NATS)}"
            f" → {_pm(by_k[b]['log_px'], by_k[b].get('se'), NATS)}"
            for a, b in bad
        )
        blocks.append(
            Caution(
                "the log p(x) ladder goes down as k grows, beyond its error bars "
                f"(more than {LADDER_SIGMAS:g}× the standard error of the change): {pairs}. "
                "The IWAE_k bound cannot decrease with k in expectation: this is a sign of a bad proposal "
                "or a bug."
            )
        )
    # the change from the previous k: mean of the per-example differences ± its paired SE
    gains = [(k, metric_value(p, "gain"), metric_value(p, "gain_se")) for k, p in zip(ks, pts, strict=True)]
    gains = [(k, g, s or 0.0) for k, g, s in gains if g is not None]

    fig = Figure(figsize=(6.4, 6.0 if gains else 4.0))
    ax = fig.add_subplot(2, 1, 1) if gains else fig.add_subplot()
    ax.errorbar(ks, vs, yerr=ses, fmt="o-", capsize=3, label="IWAE_k estimate of log p(x) (± SE)")
    if bad:
        flagged = sorted({b for _, b in bad})
        idx = [int(np.flatnonzero(ks == k)[0]) for k in flagged]
        ax.plot(ks[idx], vs[idx], "rx", ms=10, mew=2, label=f"below the previous k by > {LADDER_SIGMAS:g} SE")
    elbo = metric_value(ev, "elbo")
    if elbo is not None:
        ax.axhline(elbo, color="gray", ls="--", label="ELBO (lower bound)")
        elbo_se = metric_value(ev, "elbo_se")
        if elbo_se:
            ax.axhspan(elbo - elbo_se, elbo + elbo_se, color="gray", alpha=0.15)
    ax.set_xscale("log")
    if not gains:  # else the panel below carries the k axis
        ax.set_xlabel("k, importance samples per example (log scale)")
    ax.set_ylabel(f"log p(x) ({NATS})")
    ax.set_title(textwrap.fill(label, 70), fontsize=9)
    ax.legend(fontsize=8)
    if gains:
        gx = fig.add_subplot(2, 1, 2, sharex=ax)
        gk, gv, gs = (np.array(c, dtype=float) for c in zip(*gains, strict=True))
        gx.errorbar(gk, gv, yerr=gs, fmt="o", capsize=3, label="change from the previous k (± paired SE)")
        gx.axhline(0.0, color="gray", lw=0.8)
        gx.set_xlabel("k, importance samples per example (log scale)")
        gx.set_ylabel(f"change ({NATS})")
        gx.legend(fontsize=8)
    fig.tight_layout()
    caption = (
        "Each point is the IWAE_k bound, a lower bound on log p(x) in expectation that rises towards it "
        f"as k grows; the last (k={int(ks[-1])}) is the reported estimate. Error bars: ± one standard "
        "error across test examples, mostly the spread of log p(x) between examples. Dashed: the ELBO."
    )
    if gains:
        caption += (
            " Below: the change from the previous k, the mean of the per-example differences (the same "
            "samples, so paired), ± its paired standard error: the error bar of the k-to-k change."
        )
    blocks.append(Fig("ladder", "log p(x) ladder: IWAE_k estimate against k", png(fig), caption))
    rows = [
        [
            str(int(p["k"])),
            _pm(p.get("log_px"), p.get("se"), NATS),
            _pm(p.get("gain"), p.get("gain_se"), NATS, sign=True),
        ]
        for p in pts
    ]
    blocks.append(
        Table(["k", "log p(x) ± SE across examples", "change from the previous k ± paired SE"], rows)
    )
    return blocks


# -------------------------------------------------------------------------------------------- sections


def _convergence_row(ev: Mapping) -> list[str]:
    """The metrics-table row of the convergence verdict: its numbers and its definition (eval.json)."""
    conv = ev.get("convergence")
    if not isinstance(conv, Mapping):
        return ["convergence", "not checked", "eval.json has no convergence verdict (written before it)", ""]
    numbers = []
    if metric_value(conv, "ladder_gain") is not None:
        gain = _pm(conv["ladder_gain"], conv.get("ladder_gain_se"), NATS, sign=True)
        step = f"K={conv.get('ladder_from_k')} → K={conv.get('ladder_to_k')}"
        numbers.append(f"last ladder step {gain} ({step})")
    numbers.append(f"ESS harmonic mean {_fmt(conv.get('ess_hmean'), 1)} samples")
    definition = (
        "not converged when the last ladder step rises by more than "
        f"{_fmt(conv.get('ladder_gain_sigmas'), 0)} paired SE and {_fmt(conv.get('ladder_gain_tol'), 2)} "
        f"{NATS}, or the ESS harmonic mean is below {_fmt(conv.get('ess_floor'), 0)}"
    )
    return ["convergence", f"{_verdict(ev)}: " + "; ".join(numbers), definition, ""]


def _metrics_section(ev: dict, tr: dict, config: Mapping, label: str, improper: bool) -> list:
    """The headline first: log p(x) ± SE with its verdict, ELBO, KL, bits/dim; then the rest."""
    k = ev.get("num_samples")
    rows = [
        [
            "log p(x)",
            _log_px_text(ev),
            f"estimate of log p(x), K={k} (importance sampling: the IWAE_K bound)",
            label,
        ],
        ["ELBO", _pm(ev.get("elbo"), ev.get("elbo_se"), NATS), "lower bound (ELBO) on log p(x)", label],
        ["KL(q(z|x) ‖ p(z))", _pm(ev.get("kl"), None, NATS), "KL term of the ELBO", label],
        ["bits/dim", _pm(ev.get("bits_per_dim"), None, "bits/dim", 4), _bits_per_dim_kind(ev), label],
        _convergence_row(ev),
    ]
    lp, el = metric_value(ev, "log_px"), metric_value(ev, "elbo")
    if lp is not None and el is not None:
        rows.append(
            [
                "log p(x) − ELBO",
                _pm(lp - el, None, NATS),
                "estimate of KL(q(z|x) ‖ p(z|x)), the gap of the ELBO",
                label,
            ]
        )
    recon = _pm(ev.get("recon"), None, NATS)
    rows.append(["E_q[log p(x|z)]", recon, "reconstruction term of the ELBO", label])
    latent = ev.get("latent_dim")
    rows.append(
        ["active units", f"{ev.get('active_units', 'n/a')} of {latent}", "latent dimensions in use", ""]
    )
    ess = metric_value(ev, "ess")
    if ess is not None:
        frac = metric_value(ev, "ess_fraction")
        frac_text = f" ({frac:.1%})" if frac is not None else ""
        rows.append(
            [
                "ESS",
                f"{_fmt(ess, 1)} of K={k} samples{frac_text}",
                "effective sample size of the importance weights, mean over examples",
                "",
            ]
        )
    if metric_value(ev, "knn_accuracy") is not None:
        rows.append(
            ["k-NN accuracy", _fmt(ev["knn_accuracy"], 3), "classification accuracy on latent means", ""]
        )
    rows.append(
        ["test examples / D", f"{ev.get('num_examples', 'n/a')} / {ev.get('data_dim', 'n/a')}", "counts", ""]
    )
    if improper:
        rows = [[q, v, f"{kind} — IMPROPER" if sp else kind, sp] for q, v, kind, sp in rows]

    objective = _objective_name(config)
    train_rows = [
        ["train", _pm(tr.get("train_elbo"), None, NATS), f"{objective}, last epoch, training data"],
        ["validation", _pm(tr.get("val_elbo"), None, NATS), "lower bound (ELBO), last epoch"],
        [
            "best validation",
            _pm(tr.get("best_val_elbo"), None, NATS),
            f"lower bound (ELBO), epoch {tr.get('best_epoch', 'n/a')}",
        ],
        ["epochs", str(tr.get("epochs", "n/a")), "count"],
        ["training time", _pm(tr.get("train_time_s"), None, "s", 1), "wall clock"],
    ]
    blocks: list = [Heading("Metrics (test set)")]
    if converged(ev) is False:
        reasons = "; ".join((ev.get("convergence") or {}).get("reasons") or [])
        blocks.append(
            Caution(
                f"the log p(x) estimate has not converged in K={k}: {reasons}. It is a lower bound in "
                "expectation that may still be far below log p(x): do not rank it against converged "
                "estimates; raise eval.num_samples."
            )
        )
    blocks += [
        Para(
            f"Means over {ev.get('num_examples', 'n/a')} test examples; ± is one standard error across them."
        ),
        Table(["quantity", "value", "kind", "data space"], rows, kind="metrics"),
        Heading("Training", level=3),
        Table(["quantity", "value", "kind"], train_rows, kind="metrics"),
    ]
    return blocks


_IMPROPER_TEXT = (
    "IMPROPER run: a Bernoulli likelihood on grey-level (continuous) pixels is not a normalised density, "
    "so these numbers are not log-likelihoods of the data in any unit. They are never ranked or plotted "
    "with proper runs."
)


_IMPROPER_GROUP_TEXT = (
    "IMPROPER runs: Bernoulli likelihoods on grey-level pixels, not normalised densities. Ordered here "
    "among themselves only; not comparable with any proper run."
)


def _objective_name(config: Mapping) -> str:
    train = config.get("train") or {}
    if str(train.get("objective", "elbo")).lower() == "iwae":
        return f"IWAE_{train.get('num_samples', 'k')} lower bound"
    return "lower bound (ELBO)"


def _curves_section(out_dir: Path, tr: dict, config: Mapping, label: str) -> list:
    path = out_dir / "plots" / "elbo.csv"
    blocks: list = [Heading("Training curves")]
    if not path.is_file():
        return blocks + [Para(f"{path} not found (written by `vaerepro train`).")]
    cur = _read_curves(path)
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    epoch = cur.get("epoch", np.arange(1, len(next(iter(cur.values()), [])) + 1))
    if "train_elbo" in cur:
        ax.plot(epoch, cur["train_elbo"], "-", label=f"train ({_objective_name(config)})")
    if "val_elbo" in cur:
        ax.plot(epoch, cur["val_elbo"], "-", label="validation (ELBO)")
    best = metric_value(tr, "best_epoch")
    if best is not None:
        ax.axvline(best, color="gray", ls=":", label=f"best epoch ({int(best)})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"lower bound ({NATS})")
    ax.set_title(textwrap.fill(label, 70), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return blocks + [Fig("training_curves", "training and validation ELBO against epoch", png(fig))]


_PRIOR_SAMPLES_CAPTION = (
    "Decoder means of p(x|z), z ~ N(0, I), on the grey scale of the inputs above (0 black, 1 white; not "
    "inverted). A sample with a grey or white background comes from a z where the aggregate posterior "
    "q(z) = mean_x q(z|x) has little mass (a 'hole' in the prior that the decoder was hardly trained on), "
    "where the decoder's pixel means sit far from 0: a property of the model, not of the plot."
)


def _images_section(out_dir: Path, latent_dim) -> list:
    path = out_dir / "artifacts" / "samples.npz"
    blocks: list = [Heading("Reconstructions and samples")]
    if not path.is_file():
        return blocks + [Para(f"{path} not found (written by `vaerepro evaluate`).")]
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}

    if "inputs" in arrays and "reconstructions" in arrays:
        x, xr = _as_images(arrays["inputs"]), _as_images(arrays["reconstructions"])
        n = min(len(x), len(xr), MAX_IMAGES)
        fig, ax = _image_figure(_tile(np.concatenate([x[:n], xr[:n]]), ncols=n))
        ax.set_yticks([x.shape[1] / 2, x.shape[1] * 1.5 + 1], ["input", "reconstruction"])
        fig.tight_layout()
        blocks.append(
            Fig(
                "reconstructions",
                "test inputs (top row) and their reconstructions (bottom row)",
                png(fig),
                f"Top: {n} test inputs. Bottom: decoder means of p(x|z) for z ~ q(z|x).",
            )
        )
    if "prior_samples" in arrays:
        s = _as_images(arrays["prior_samples"])[: 4 * MAX_IMAGES]
        fig, _ = _image_figure(_tile(s, ncols=min(len(s), 8)), width_in=5.0)
        fig.tight_layout()
        blocks.append(Fig("prior_samples", "samples from the prior", png(fig), _PRIOR_SAMPLES_CAPTION))
    if str(latent_dim) == "2" and "manifold" in arrays:
        m = np.asarray(arrays["manifold"], dtype=float)  # (g, g, H, W)
        g = m.shape[0]
        cells = _as_images(m.reshape((g * g,) + m.shape[2:]))  # (g*g, H, W), row-major over the grid
        h, w = cells.shape[1:3]
        grid = arrays.get("manifold_grid", np.arange(g))
        fig, ax = _image_figure(_tile(cells, ncols=g, pad=0), 6.0)
        step = max(1, g // 8)
        centers = np.arange(0, g, step)
        ax.set_xticks(centers * w + w / 2, [f"{grid[i]:.2f}" for i in centers], fontsize=7)
        ax.set_yticks(centers * h + h / 2, [f"{grid[i]:.2f}" for i in centers], fontsize=7)
        ax.set_xlabel("z (second grid axis)")
        ax.set_ylabel("z (first grid axis)")
        fig.tight_layout()
        blocks.append(
            Fig(
                "manifold",
                "learned 2-D latent manifold",
                png(fig),
                "Decoder means over a grid of z at Gaussian quantiles (cell [i, j]: z = (grid[i], grid[j])).",
            )
        )
    return blocks


def comparison_section(runs: Iterable[Mapping] | None) -> list:
    blocks: list = [Heading("Comparison across runs")]
    runs = list(runs or [])
    if not runs:
        return blocks + [Para("No other runs were passed to the report.")]
    usable, excluded = [], []
    for r in runs:
        status = str(r.get("status") or "").upper()
        try:
            comparability_key(r)
        except IncomparableError as e:
            excluded.append((r, str(e)))
            continue
        if status in EXCLUDED_STATUSES:
            excluded.append((r, f"status {status}"))
        elif metric_value(r, "log_px") is None:
            excluded.append((r, "no log p(x)"))
        else:
            usable.append(r)

    blocks.append(
        Para(
            "As in AEVB's Figure 2: the log p(x) estimate against the size of the latent space, one line "
            "per likelihood. One figure and one ranking per data space: a pmf on binary pixels, a density "
            "on pixels in [0,1] and an improper Bernoulli on grey levels are different units, never put "
            "on one scale."
        )
    )
    for (space, improper), rows in group_comparable(usable).items():
        label = space_label(space, improper)
        # Same unit is not enough: log-likelihoods of different data sets are not comparable either, so
        # each data source gets its own figure and ranking inside its data-space group.
        by_source: dict[str, list[Mapping]] = {}
        for r in rows:
            by_source.setdefault(str(r.get("source") or "unknown"), []).append(r)
        for source, members in by_source.items():
            heading = label if len(by_source) == 1 else f"{label} — data: {source}"
            blocks.append(Heading(heading, level=3))
            if improper:
                blocks.append(Caution(_IMPROPER_GROUP_TEXT))
            suffix = "" if len(by_source) == 1 else f"-{_slug(source)}"
            plotted = [r for r in members if _latent(r) is not None]
            if len(plotted) >= 2:
                blocks.append(_group_figure(space, improper, members, suffix))
            elif len(members) == 1:
                blocks.append(Para(_ONE_RUN_TEXT.format(run=_run_name(members[0]))))
            else:
                blocks.append(Para(_ONE_POINT_TEXT.format(n=len(members), plotted=len(plotted))))
            blocks += _ranking_blocks(space, improper, members)

    if excluded:
        blocks.append(Heading("Not plotted, not ranked", level=3))
        blocks.append(
            Table(
                ["run", "status", "likelihood", "data space", "improper", "reason"],
                [
                    [
                        str(r.get("run_name") or r.get("run_id") or "?"),
                        str(r.get("status") or "n/a"),
                        str(r.get("likelihood") or "n/a"),
                        str(r.get("data_space") or "n/a"),
                        str(r.get("improper", "n/a")),
                        why,
                    ]
                    for r, why in excluded
                ],
                kind="excluded",
            )
        )
    return blocks


_ONE_RUN_TEXT = (
    "Only one run in this group ({run}): nothing to compare it with, so no figure; its numbers are in the "
    "table below."
)
_ONE_POINT_TEXT = (
    "{n} runs, {plotted} of them with a latent size to plot against: one point is no comparison, so no "
    "figure; the numbers are in the table below."
)
_UNCONVERGED_NOTE = (
    "Rank —: the log p(x) estimate has NOT CONVERGED (its ladder still rises with K, or too few effective "
    "samples); it may still be far from log p(x), so it is listed after the ranked runs and not ranked."
)


def _run_name(row: Mapping) -> str:
    return str(row.get("run_name") or row.get("run_id") or "?")


def _latent(row: Mapping) -> int | None:
    v = metric_value(row, "latent_dim")
    return int(v) if v is not None and v > 0 else None


def _group_figure(space: str, improper: bool, rows: list[Mapping], id_suffix: str = "") -> Fig:
    label = space_label(space, improper)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    by_lik: dict[str, list[Mapping]] = {}
    for r in rows:
        by_lik.setdefault(str(r.get("likelihood") or "?"), []).append(r)
    dims: set[int] = set()
    unplotted = 0
    for lik, members in by_lik.items():
        pts = [(_latent(r), metric_value(r, "log_px"), metric_value(r, "log_px_se") or 0.0) for r in members]
        unplotted += sum(d is None for d, _, _ in pts)
        pts = sorted((d, v, s) for d, v, s in pts if d is not None)
        if not pts:
            continue
        d, v, s = (np.array(c, dtype=float) for c in zip(*pts, strict=True))
        dims.update(int(x) for x in d)
        line = ax.errorbar(d, v, yerr=s, fmt="o", capsize=3, label=lik)
        # the line joins the mean over runs (seeds) at each latent size
        ud = np.unique(d)
        ax.plot(ud, [v[d == u].mean() for u in ud], "-", color=line[0].get_color())
    ax.set_xscale("log")
    if dims:
        ticks = sorted(dims)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("latent size (log scale)")
    what = "improper Bernoulli score" if improper else "log p(x) estimate"
    ax.set_ylabel(f"{what} ({NATS})")
    ax.set_title(textwrap.fill(label, 70), fontsize=9)
    if dims:
        ax.legend(title="likelihood", fontsize=8)
    fig.tight_layout()
    caption = (
        f"{len(rows)} run(s). Error bars: ± one standard error; lines join the mean at each latent size."
    )
    if unplotted:
        caption += f" {unplotted} run(s) without a latent size are ranked but not plotted."
    return Fig(
        f"compare-{_slug(space)}-{'improper' if improper else 'proper'}{id_suffix}",
        f"Comparison across runs: {label}",
        png(fig),
        caption,
    )


def _ranking_blocks(space: str, improper: bool, rows: list[Mapping]) -> list:
    """The ranking by log p(x) (compare.rank: unconverged estimates after the rest, here unranked) and,
    when there are unconverged ones, the note saying why."""
    ranked = rank(rows, "log_px", higher_is_better=True)
    body, attrs = [], []
    for i, r in enumerate(ranked, start=1):
        s, imp = comparability_key(r)
        body.append(
            [
                "—" if converged(r) is False else str(i),
                _run_name(r),
                str(r.get("likelihood") or "n/a"),
                str(r.get("latent_dim", "n/a")),
                str(r.get("source") or "n/a"),
                _log_px_text(r),
                _pm(r.get("elbo"), None, NATS),
                _pm(r.get("bits_per_dim"), None, "bits/dim", 4),
                s + (" (IMPROPER)" if imp else ""),
            ]
        )
        attrs.append({"data-space": s, "data-improper": str(imp).lower()})
    header = [
        "rank",
        "run",
        "likelihood",
        "latent size",
        "source",
        "log p(x) estimate",
        "ELBO (lower bound)",
        "bits/dim",
        "data space",
    ]
    table = Table(
        header,
        body,
        kind="ranking",
        attrs={"data-space": space, "data-improper": str(improper).lower()},
        row_attrs=attrs,
    )
    return [table] + ([Para(_UNCONVERGED_NOTE)] if any(converged(r) is False for r in ranked) else [])


# ------------------------------------------------------------------------------------------ rendering

_CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f2f2f2; }
.warning { border: 2px solid #c00; background: #fee; padding: 0.6em 1em; margin: 0.8em 0; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; }
"""


def _attrs(d: Mapping[str, str]) -> str:
    return "".join(f' {k}="{html.escape(v)}"' for k, v in d.items())


def render_html(title: str, blocks: list) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Caution):
            out.append(f'<div class="warning"><strong>WARNING:</strong> {e(b.text)}</div>')
        elif isinstance(b, Table):
            out.append(f'<table class="{e(b.kind)}"{_attrs(b.attrs)}>')
            out.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr>")
            for i, row in enumerate(b.rows):
                ra = _attrs(b.row_attrs[i]) if b.row_attrs else ""
                out.append(f"<tr{ra}>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
            out.append("</table>")
        elif isinstance(b, Fig):
            data = base64.b64encode(b.png).decode("ascii")
            out.append(f'<figure id="fig-{e(b.name)}">')
            out.append(f'<img src="data:image/png;base64,{data}" alt="{e(b.alt)}">')
            if b.caption:
                out.append(f"<figcaption>{e(b.caption)}</figcaption>")
            out.append("</figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_md(title: str, blocks: list, fig_paths: dict[str, str]) -> str:
    out = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Caution):
            out += [f"> **WARNING:** {b.text}", ""]
        elif isinstance(b, Table):
            if b.kind == "ranking":
                out.append(f"<!-- ranking-table{_attrs(b.attrs)} -->")
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            out.append("|" + "---|" * len(b.header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, Fig):
            alt = b.alt.replace("[", "\\[").replace("]", "\\]")
            out += [f"![{alt}]({fig_paths[b.name]})", ""]
            if b.caption:
                out += [f"*{b.caption}*", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- entry


def write_report(
    out_dir: Path,
    config: dict,
    runs: list[dict] | None = None,
    report_dir: Path | None = None,
) -> dict[str, Path]:
    """Write report.html (self-contained) and report.md (+ figures/*.png) into report_dir.

    out_dir holds the train/evaluate results; config is the resolved config dict; runs are row dicts of
    the runs of the experiment (see `compare`), or None. Returns {"html", "md", "figures"}.
    """
    out_dir = Path(out_dir)
    report_dir = Path(report_dir) if report_dir is not None else out_dir / "reports"
    ev = _load_json(out_dir / "metrics" / "eval.json", "vaerepro evaluate")
    tr = _load_json(out_dir / "metrics" / "train.json", "vaerepro train")
    config = config or {}

    likelihood = ev.get("likelihood") or (config.get("likelihood") or {}).get("name", "?")
    space = str(ev.get("data_space") or "?")
    improper = bool(ev.get("improper"))
    latent_dim = ev.get("latent_dim", (config.get("model") or {}).get("latent_dim", "?"))
    source = ev.get("source") or (config.get("data") or {}).get("source", "?")
    label = space_label(space, improper)
    title = f"VAE report: {likelihood} likelihood, {space} data, latent size {latent_dim}, source {source}"

    blocks: list = [Para(f"Data space: {label}. Log-likelihoods and bounds are in nats per example.")]
    if improper:
        blocks.append(Caution(_IMPROPER_TEXT))
    blocks += _metrics_section(ev, tr, config, label, improper)
    blocks += _curves_section(out_dir, tr, config, label)
    blocks += _ladder_section(ev, label)
    blocks += _images_section(out_dir, latent_dim)
    blocks += comparison_section(runs)
    blocks += [
        Heading("Configuration"),
        Table(["key", "value"], [[k, v] for k, v in _flatten(config)], kind="config"),
    ]

    fig_dir = report_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures, rel = [], {}
    for b in blocks:
        if isinstance(b, Fig):
            path = fig_dir / f"{b.name}.png"
            path.write_bytes(b.png)
            figures.append(path)
            rel[b.name] = f"figures/{path.name}"

    html_path, md_path = report_dir / "report.html", report_dir / "report.md"
    html_path.write_text(render_html(title, blocks), encoding="utf-8")
    md_path.write_text(render_md(title, blocks, rel), encoding="utf-8")
    return {"html": html_path, "md": md_path, "figures": figures}
