"""The report stage: figures and a self-contained HTML / Markdown report of one run from its result files.

Reads what `vaerepro train` and `vaerepro evaluate` wrote into `out_dir` (metrics/*.json, plots/elbo.csv,
artifacts/samples.npz) plus plain row dicts of other runs (the caller queries MLflow). Imports no torch,
mlflow, hydra or lightning.

Every number is printed with its unit (nats per example, bits/dim) and what it is (a lower bound, or an
estimate of log p(x)); results from different data spaces, or improper ones, never share a figure or a
table (see `compare`).

The report opens with the headline (log p(x) ± SE with its convergence verdict, ELBO, KL, bits/dim), then
the training curves, the log p(x) ladder, reconstructions and samples, the comparison across runs
(`report_comparison`), and ends with the configuration. It is built once as a list of blocks and rendered
twice (`document`): HTML with every image inline as a base64 PNG, Markdown with images under `figures/`.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import textwrap
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from vaerepro.compare import converged, curve_mismatch, impossible, metric_value, space_label
from vaerepro.document import (
    Block,
    Caution,
    Fig,
    Heading,
    Para,
    Table,
    differences,
    flatten,
    fmt,
    pm,
    png,
    write_document,
)
from vaerepro.errors import UserError
from vaerepro.report_comparison import NATS, comparison_section, log_px_text, verdict
from vaerepro.sources import file_sha256

LADDER_SIGMAS = 3.0  # a ladder drop beyond this many standard errors of the change is flagged
MAX_IMAGES = 16  # columns of the reconstruction / sample grids


# ------------------------------------------------------------------------------------------- helpers


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


def _load_eval(path: Path) -> dict:
    """metrics/eval.json, refused (one line naming the file, the key and the problem) when it holds a number
    no evaluation writes (compare.impossible): a hand-edited or damaged file is never shown as a result."""
    ev = _load_json(path, "vaerepro evaluate")
    # every evaluation writes log_px; without it ({} left by hand) the report was of n/a's and '? data'
    problem = impossible(ev, strict=True) if "log_px" in ev else "no log_px, which every evaluation writes"
    if problem is not None:
        raise ResultFileError(f"{path}: {problem}; run `vaerepro evaluate` again to rewrite it")
    return ev


def load_results(out_dir: Path) -> tuple[dict, dict]:
    """(metrics/eval.json, metrics/train.json) of out_dir as the report reads them; ResultFileError (one line
    naming the file and the stage to run) for a missing or damaged file (artifacts/samples.npz too, which
    may be missing but not damaged), numbers no evaluation writes, or an evaluation of other weights than
    the training's."""
    ev = _load_eval(out_dir / "metrics" / "eval.json")
    tr = _load_json(out_dir / "metrics" / "train.json", "vaerepro train")
    _check_same_weights(out_dir / "metrics", ev, tr)
    _check_curve(out_dir / "plots" / "elbo.csv", tr)
    _load_samples(out_dir / "artifacts" / "samples.npz")  # a damaged file said as such, before its digest
    check_artifacts(out_dir, ev)
    return ev, tr


def check_artifacts(out_dir: Path, ev: Mapping) -> None:
    """ResultFileError when an array file of out_dir/artifacts is not the one eval.json (ev) was written with
    (its `artifacts_sha256`): an evaluation that failed after writing its arrays and before its numbers (a
    full disk) leaves its arrays beside the earlier evaluation's numbers. A missing file is not checked (the
    report says so), nor an eval.json written before it named its arrays."""
    for name, recorded in (ev.get("artifacts_sha256") or {}).items():
        path = out_dir / "artifacts" / name
        if path.is_file() and file_sha256(path) != recorded:
            raise ResultFileError(
                f"{path}: not the file {out_dir / 'metrics' / 'eval.json'} was written with (sha256 "
                f"{file_sha256(path)[:12]}, eval.json names {str(recorded)[:12]}): an evaluation stopped "
                "between writing them; run `vaerepro evaluate` again"
            )


def _check_curve(path: Path, tr: Mapping) -> None:
    """ResultFileError when plots/elbo.csv is not the curve of the training that train.json (tr) records
    (compare.curve_mismatch); a missing file is said in the report."""
    if not path.is_file():
        return
    try:
        cur = _read_curves(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ResultFileError(
            f"{path}: not a CSV table of numbers ({exc}); run `vaerepro train` again to rewrite it"
        ) from None
    if absent := [k for k in ("train_elbo", "val_elbo") if k not in cur]:  # rows, not of these columns
        raise ResultFileError(
            f"{path}: no {' or '.join(absent)} column (its columns: {', '.join(cur) or 'none'}); run "
            "`vaerepro train` again to rewrite it"
        )
    last = {k: float(v[-1]) for k in ("train_elbo", "val_elbo") if len(v := cur.get(k, ()))}
    if (problem := curve_mismatch(last or None, tr)) is not None:
        raise ResultFileError(f"{path}: {problem}; run `vaerepro train` again to rewrite both")


def _load_samples(path: Path) -> dict[str, np.ndarray] | None:
    """artifacts/samples.npz's arrays; None when there is no such file (the report says so); ResultFileError
    for one that is not a whole .npz archive (an evaluation killed while writing it, a damaged copy)."""
    if not path.is_file():
        return None
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ResultFileError(
            f"{path}: not a readable .npz archive, truncated or damaged ({why}); run `vaerepro evaluate` "
            "again to rewrite it"
        ) from None


# eval.json's labels and the config keys that set them: a report under another config would print that
# config's table beside these numbers
LABELS = {
    "likelihood": "likelihood.name",
    "latent_dim": "model.latent_dim",
    "num_samples": "eval.num_samples",
    "source": "data.source",
    "data_space": "data space",
}


def config_labels(config: Mapping[str, Any], data_space: str) -> dict[str, Any]:
    """The values a resolved config (Config.to_dict()) gives LABELS' eval.json keys; the data space is
    derived from several keys (Config.data_space), so it is given."""
    flat = flatten(config)
    return {label: data_space if key == "data space" else flat[key] for label, key in LABELS.items()}


def check_config(eval_json: Path, ev: Mapping, labels: Mapping[str, Any]) -> None:
    """ResultFileError when the evaluation in eval_json (ev) was of another configuration than the one the
    report is asked to print: `labels` holds the config's values of LABELS' eval.json keys; every key that
    differs is named with both values. A key eval.json lacks is not compared."""
    differ = [
        f"{key}: {labels[label]!r} in the config, {ev[label]!r} in eval.json"
        for label, key in LABELS.items()
        if label in ev and label in labels and ev[label] != labels[label]
    ]
    if differ:
        raise ResultFileError(
            f"{eval_json}: evaluated another configuration than the report's ("
            + "; ".join(differ)
            + "); report with the config the stages ran with, or run them again with this one"
        )


def _check_same_weights(metrics_dir: Path, ev: Mapping, tr: Mapping) -> None:
    """Refuse (ResultFileError) an eval.json that evaluated other weights than the models/best.ckpt that
    train.json describes: a training run again (`vaerepro train`, a resumed training that found a better
    epoch) after the evaluation, whose report would show the old model's numbers, samples and MLflow run
    under the new training's curve and configuration. Each file names the sha256 of the best.ckpt it
    describes; records written before they did (no such key) are not checked."""
    evaluated, trained = ev.get("checkpoint_sha256"), tr.get("best_checkpoint_sha256")
    if evaluated is None or trained is None or evaluated == trained:
        return
    raise ResultFileError(
        f"{metrics_dir / 'eval.json'}: evaluated another models/best.ckpt (sha256 {str(evaluated)[:12]}) "
        f"than the training in {metrics_dir / 'train.json'} wrote ({str(trained)[:12]}): the model was "
        "trained again after its evaluation; run `vaerepro evaluate` again"
    )


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
    """A width_in-inch figure of one mosaic in grey (0 black, 1 white), without ticks: (figure, axes)."""
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


def _ladder_section(ev: dict, label: str) -> list[Block]:
    ladder = ev.get("log_px_ladder") or []
    blocks: list[Block] = [Heading("log p(x) against the number of importance samples")]
    if not ladder:
        return blocks + [Para("No ladder in eval.json (log_px_ladder is empty).")]
    pts = sorted(ladder, key=lambda p: int(p["k"]))
    ks = np.array([int(p["k"]) for p in pts], dtype=float)
    vs = np.array([metric_value(p, "log_px") for p in pts], dtype=float)  # None -> NaN
    ses = np.array([metric_value(p, "se") or 0.0 for p in pts])
    bad = ladder_is_decreasing(pts)
    if bad:
        by_k = {int(p["k"]): p for p in pts}
        pairs = "; ".join(
            f"k={a} → k={b}: {pm(by_k[a]['log_px'], by_k[a].get('se'), NATS)}"
            f" → {pm(by_k[b]['log_px'], by_k[b].get('se'), NATS)}"
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
            pm(p.get("log_px"), p.get("se"), NATS),
            pm(p.get("gain"), p.get("gain_se"), NATS, sign=True),
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
        gain = pm(conv["ladder_gain"], conv.get("ladder_gain_se"), NATS, sign=True)
        step = f"K={conv.get('ladder_from_k')} → K={conv.get('ladder_to_k')}"
        numbers.append(f"last ladder step {gain} ({step})")
    numbers.append(f"ESS harmonic mean {fmt(conv.get('ess_hmean'), 1)} samples")
    definition = (
        "not converged when the last ladder step rises by more than "
        f"{fmt(conv.get('ladder_gain_sigmas'), 0)} paired SE and {fmt(conv.get('ladder_gain_tol'), 2)} "
        f"{NATS}, or the ESS harmonic mean is below {fmt(conv.get('ess_floor'), 0)}"
    )
    return ["convergence", f"{verdict(ev)}: " + "; ".join(numbers), definition, ""]


def _metrics_section(ev: dict, tr: dict, config: Mapping, label: str, improper: bool) -> list[Block]:
    """The headline first: log p(x) ± SE with its verdict, ELBO, KL, bits/dim; then the rest."""
    k = ev.get("num_samples")
    rows = [
        [
            "log p(x)",
            log_px_text(ev),
            f"estimate of log p(x), K={k} (importance sampling: the IWAE_K bound)",
            label,
        ],
        ["ELBO", pm(ev.get("elbo"), ev.get("elbo_se"), NATS), "lower bound (ELBO) on log p(x)", label],
        ["KL(q(z|x) ‖ p(z))", pm(ev.get("kl"), None, NATS), "KL term of the ELBO", label],
        ["bits/dim", pm(ev.get("bits_per_dim"), None, "bits/dim", 4), _bits_per_dim_kind(ev), label],
        _convergence_row(ev),
    ]
    lp, el = metric_value(ev, "log_px"), metric_value(ev, "elbo")
    if lp is not None and el is not None:
        rows.append(
            [
                "log p(x) − ELBO",
                pm(lp - el, None, NATS),
                "estimate of KL(q(z|x) ‖ p(z|x)), the gap of the ELBO",
                label,
            ]
        )
    recon = pm(ev.get("recon"), None, NATS)
    rows.append(["E_q[log p(x|z)]", recon, "reconstruction term of the ELBO", label])
    latent = ev.get("latent_dim")
    by_layer = ev.get("active_units_by_layer") or []
    if len(by_layer) == 2:  # as Burda et al. print them: z1's + z2's
        z2 = (config.get("model") or {}).get("latent_dim_2", "?")
        active, what = (
            f"{by_layer[0]} + {by_layer[1]} of {latent} + {z2}",
            "latent dimensions in use, z1 + z2",
        )
    else:
        active, what = f"{ev.get('active_units', 'n/a')} of {latent}", "latent dimensions in use"
    rows.append(["active units", active, what, ""])
    ess = metric_value(ev, "ess")
    if ess is not None:
        frac = metric_value(ev, "ess_fraction")
        frac_text = f" ({frac:.1%})" if frac is not None else ""
        rows.append(
            [
                "ESS",
                f"{fmt(ess, 1)} of K={k} samples{frac_text}",
                "effective sample size of the importance weights, mean over examples",
                "",
            ]
        )
    if metric_value(ev, "knn_accuracy") is not None:
        rows.append(
            ["k-NN accuracy", fmt(ev["knn_accuracy"], 3), "classification accuracy on latent means", ""]
        )
    rows.append(
        ["test examples / D", f"{ev.get('num_examples', 'n/a')} / {ev.get('data_dim', 'n/a')}", "counts", ""]
    )
    if improper:
        rows = [[q, v, f"{kind} — IMPROPER" if sp else kind, sp] for q, v, kind, sp in rows]

    objective = _objective_name(config)
    train_rows = [
        ["train", pm(tr.get("train_elbo"), None, NATS), f"{objective}, last epoch, training data"],
        ["validation", pm(tr.get("val_elbo"), None, NATS), "lower bound (ELBO), last epoch"],
        [
            "best validation",
            pm(tr.get("best_val_elbo"), None, NATS),
            f"lower bound (ELBO), epoch {tr.get('best_epoch', 'n/a')} (from 0, as the curve counts)",
        ],
        ["epochs", str(tr.get("epochs", "n/a")), "count"],
        ["training time", pm(tr.get("train_time_s"), None, "s", 1), _train_time_kind(tr)],
    ]
    blocks: list[Block] = [Heading("Metrics (test set)")]
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


def _train_time_kind(tr: Mapping) -> str:
    """What train.json's train_time_s timed: the whole training, or a resumed training's last invocation only
    (the epochs after its checkpoint's, resumed_after_epochs), which beside "epochs" read as the whole's."""
    after, epochs = tr.get("resumed_after_epochs"), tr.get("epochs")
    if not after:
        return "wall clock"
    trained = f"{epochs - after} epoch(s) " if isinstance(epochs, int) else ""
    return f"wall clock of the last invocation's {trained}only, resumed after {after} epochs"


def _objective_name(config: Mapping) -> str:
    train = config.get("train") or {}
    if str(train.get("objective", "elbo")).lower() == "iwae":
        return f"IWAE_{train.get('num_samples', 'k')} lower bound"
    return "lower bound (ELBO)"


def _curves_section(out_dir: Path, tr: dict, config: Mapping, label: str) -> list[Block]:
    path = out_dir / "plots" / "elbo.csv"
    blocks: list[Block] = [Heading("Training curves")]
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


def _images_section(out_dir: Path, latent_dim) -> list[Block]:
    path = out_dir / "artifacts" / "samples.npz"
    blocks: list[Block] = [Heading("Reconstructions and samples")]
    arrays = _load_samples(path)
    if arrays is None:
        return blocks + [Para(f"{path} not found (written by `vaerepro evaluate`).")]

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


# --------------------------------------------------------------------------------------------- entry


_CONFIG_TEXT = "The resolved configuration the evaluation ran under, as metrics/eval.json records it."
_TRAINED_AS_TEXT = (
    "A value followed by (training: …) is one the training, as metrics/train.json records it, ran with "
    "otherwise: the stages ran under different configurations."
)


_ENVIRONMENT_TEXT = (
    "Where and with what each stage ran, as metrics/eval.json and metrics/train.json record it (a "
    "resumed training's is its last part's): the project's git commit (-dirty when its code differed from "
    "it), the device, with the number of processes under DDP or torchrun, and the versions of Python, "
    "vaerepro and its libraries. Importance sampling draws its noise on its device, so an evaluation on a "
    "CPU and one on a GPU give other estimates, equally valid."
)


def _environment_section(ev: Mapping, tr: Mapping) -> list[Block]:
    """A table of the commit, the device and the versions the evaluation and the training ran with (their
    records' `commit`, versions.git_commit, `device`, devices.device_text, and `versions`,
    versions.versions()), a column each; nothing for records from before they held them."""
    stages = []
    for stage, record in (("evaluation", ev), ("training", tr)):
        found = (
            {"git commit": record["commit"] or "unknown (not a git checkout)"} if "commit" in record else {}
        )
        found |= {"device": record["device"]} if isinstance(record.get("device"), str) else {}
        found |= record["versions"] if isinstance(record.get("versions"), Mapping) else {}
        if found:
            stages.append((stage, found))
    if not stages:
        return []
    names = list(dict.fromkeys(name for _, recorded in stages for name in recorded))
    rows = [[name, *(str(recorded.get(name, "not recorded")) for _, recorded in stages)] for name in names]
    return [Heading("Environment"), Para(_ENVIRONMENT_TEXT), Table(["", *(s for s, _ in stages)], rows)]


def recorded_config(ev: Mapping, tr: Mapping, config: Mapping) -> tuple[Mapping, dict[str, Any]]:
    """(the configuration a report of these records prints, {dotted key: the training's value} of each key
    the training ran with otherwise). eval.json's `config` is the resolved config the evaluation ran under,
    train.json's the one the training ran under (each written by its stage); a record from before they
    held one leaves `config`, the config the report stage was given. The two differ where a stage was run
    by hand under an edited config, or where DVC did not run the evaluation again because its inputs were
    unchanged by a training key (trainer.steps_per_call, say); eval.* and tracking.* do not count, as the
    training does not read them."""
    recorded = ev.get("config")
    shown = recorded if isinstance(recorded, Mapping) else config
    trained = tr.get("config")
    if not isinstance(trained, Mapping):
        return shown, {}
    return shown, {k: t for k, (_, t) in differences(trained, shown, skip=("eval", "tracking")).items()}


def config_drift(ev: Mapping, config: Mapping) -> list[str]:
    """The dotted keys where `config` differs from the one eval.json (ev) records the evaluation ran under
    (none for a record without one): the report prints the recorded one, and the report stage says so."""
    recorded = ev.get("config")
    return list(differences(recorded, config)) if isinstance(recorded, Mapping) else []


def _cell(value) -> str:
    """A config value as a table cell: strings as they are, anything else as JSON (lists, numbers, null)."""
    return value if isinstance(value, str) else json.dumps(value)


def write_report(
    out_dir: Path,
    config: dict,
    runs: list[dict] | None = None,
    report_dir: Path | None = None,
    this_run: str | None = None,
) -> dict[str, Path]:
    """Write report.html (self-contained) and report.md (+ figures/*.png) into report_dir.

    out_dir holds the train/evaluate results; config is the resolved config dict; runs are row dicts of
    the runs of the experiment (see `compare`), or None; `this_run` is the id of this report's own run
    among them (the one out_dir's evaluation logged to), marked in the comparison. Returns {"html", "md",
    "figures"}.
    A metrics/eval.json with a number no evaluation writes is refused before anything is written.
    """
    out_dir = Path(out_dir)
    report_dir = Path(report_dir) if report_dir is not None else out_dir / "reports"
    ev, tr = load_results(out_dir)
    config, trained_as = recorded_config(ev, tr, config or {})
    trained = tr["config"] if isinstance(tr.get("config"), Mapping) else config  # the training's own

    likelihood = ev.get("likelihood") or (config.get("likelihood") or {}).get("name", "?")
    space = str(ev.get("data_space") or "?")
    improper = bool(ev.get("improper"))
    latent_dim = ev.get("latent_dim", (config.get("model") or {}).get("latent_dim", "?"))
    source = ev.get("source") or (config.get("data") or {}).get("source", "?")
    label = space_label(space, improper)
    title = f"VAE report: {likelihood} likelihood, {space} data, latent size {latent_dim}, source {source}"

    blocks: list[Block] = [Para(f"Data space: {label}. Log-likelihoods and bounds are in nats per example.")]
    if improper:
        blocks.append(Caution(_IMPROPER_TEXT))
    blocks += _metrics_section(ev, tr, trained, label, improper)
    blocks += _curves_section(out_dir, tr, trained, label)
    blocks += _ladder_section(ev, label)
    blocks += _images_section(out_dir, latent_dim)
    blocks += comparison_section(runs, this_run=this_run)
    blocks += _environment_section(ev, tr)
    blocks += [
        Heading("Configuration"),
        Para(_CONFIG_TEXT + (" " + _TRAINED_AS_TEXT if trained_as else "")),
        Table(
            ["key", "value"],
            [
                [k, _cell(v) + (f" (training: {_cell(trained_as[k])})" if k in trained_as else "")]
                for k, v in flatten(config).items()
            ],
            kind="config",
        ),
    ]

    html_path, md_path = report_dir / "report.html", report_dir / "report.md"
    figures = write_document(title, blocks, html_path, md_path, report_dir / "figures")  # one set
    return {"html": html_path, "md": md_path, "figures": figures}
