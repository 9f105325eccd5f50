"""What a reproduction is and how it is judged, independent of any paper: a published number, a setting
the schema lacks, a preset, the verdict on a measured value, how a run departs from a preset's protocol,
IWAE's learning-rate schedule and the estimated time of one run. The papers' presets are in
`vaerepro.presets`, which imports this module (never the other way round).

A preset is a row or curve of a paper: its settings as Hydra overrides of `conf/` (only keys the schema
has), the settings the schema lacks (`missing`, so that nothing is silently dropped), the published
value(s) as printed, with unit, data space and a tolerance that says where it comes from, and the estimated
time of one run. A number that could not be found is None with the reason, and gets no verdict. Values
are stored in the project's convention: a log-likelihood or bound in nats per example (IWAE's printed NLL
84.78 is log p(x) = -84.78).

Imports: the standard library only (no torch, Hydra, Lightning or MLflow).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

UNIT = "nats per example"

Kind = Literal["reproduced", "not reproduced", "not comparable"]
# The reasons a run is not comparable (prefixes of the strings `deviations` returns).
NOT_IMPLEMENTED = "not implemented"
SHORTENED = "shortened schedule"
OTHER_DATA = "other data"
DIFFERENT_K = "different K"
FEWER_SEEDS = "fewer seeds"
OTHER_SETTING = "other setting"


@dataclass(frozen=True)
class Published:
    """One published number, exactly as printed (or read off a figure), and how close counts as equal."""

    metric: str  # "test log p(x)", "test ELBO", "train ELBO", "kNN accuracy", ...
    value: float | None  # project convention (log-likelihood or bound); None: not found, see why_none
    data_space: Literal["binary", "continuous"]
    printed: str | None  # as printed in the source
    where: str  # table or figure, row, column
    tolerance: float | None  # |measured - value| allowed, in `unit`
    tolerance_reason: str
    improper: bool = False  # a Bernoulli pmf evaluated on grey levels: not a normalised density
    unit: str = UNIT
    why_none: str = ""


@dataclass(frozen=True)
class Missing:
    """A setting of the paper the config schema cannot express. Blocking ones change what is trained or
    measured: while one is missing, a run of the preset is not the paper's protocol."""

    feature: str
    paper: str  # what the paper (or its code) does, and where that is written
    blocking: bool = True


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    paper: str
    where: str  # table or figure and row
    overrides: tuple[str, ...]  # Hydra overrides of conf/
    sources: tuple[str, ...]  # where each setting was read
    published: tuple[Published, ...]
    missing: tuple[Missing, ...] = ()
    notes: tuple[str, ...] = ()
    seeds: int | None = None  # runs behind each published number; None: the paper does not say

    @property
    def settings(self) -> dict[str, Any]:
        """The overrides as {key: value}, values parsed as Hydra would (numbers, lists, booleans)."""
        return {k: _parse(v) for k, v in (o.split("=", 1) for o in self.overrides)}


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    reasons: tuple[str, ...]
    difference: float | None  # measured - published, in the published unit
    uncertainty: float | None  # tolerance + 2 SE: the largest |difference| that is still "reproduced"


def _parse(text: str) -> Any:
    special = {"true": True, "false": False, "null": None}
    if text in special:
        return special[text]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# --- the IWAE learning-rate schedule ------------------------------------------------------------------
IWAE_STAGES = 8  # i = 0 .. 7
IWAE_TOTAL_EPOCHS = sum(3**i for i in range(IWAE_STAGES))  # 3,280 passes over the data


def lr_schedule(epoch: int) -> float:
    """IWAE's learning rate at (0-based) `epoch`: 0.001 * 10^(-i/7) for 3^i passes, i = 0..7, 3,280 in all
    (arXiv:1509.00519v4 Section 5.1). Stage i covers epochs [(3^i - 1)/2, (3^(i+1) - 1)/2).
    The authors' code rounds the factor to one decimal (1e-4 * round(10^(1 - i/7), 1)); this follows the
    paper."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < IWAE_TOTAL_EPOCHS:
        raise ValueError(f"epoch must be an integer in [0, {IWAE_TOTAL_EPOCHS}), got {epoch!r}")
    stage = 0
    while epoch >= (3 ** (stage + 1) - 1) // 2:
        stage += 1
    return 1e-3 * 10 ** (-stage / 7)


# --- verdicts -----------------------------------------------------------------------------------------
def verdict(
    preset_value: Published,
    measured: float | None,
    measured_se: float | None = None,
    protocol_deviations: Sequence[str] = (),
) -> Verdict:
    """Compare a measured value with a published one.

    Not comparable whenever a protocol deviation is given (`deviations` lists them for a run), the paper
    gives no number or no tolerance exists, or nothing finite was measured: never "reproduced" when the
    protocol was not followed. Otherwise reproduced when |measured - published| <= tolerance + 2 SE (the
    tolerance covers the published number's own uncertainty; 2 SE covers the measurement's, about 95 %).
    """
    se = 0.0 if measured_se is None else float(measured_se)
    if not (math.isfinite(se) and se >= 0):
        raise ValueError(f"measured_se must be finite and >= 0, got {measured_se!r}")
    reasons = [str(d) for d in protocol_deviations]
    pub, tol = preset_value.value, preset_value.tolerance
    if pub is None:
        reasons.insert(0, f"no published number: {preset_value.why_none or 'the paper gives none'}")
    elif tol is None:
        reasons.insert(0, "no tolerance for this number")
    if measured is None or not math.isfinite(measured):
        reasons.append(f"no finite measurement (got {measured!r})")
    diff = measured - pub if pub is not None and measured is not None and math.isfinite(measured) else None
    unc = tol + 2 * se if tol is not None else None
    if reasons:
        return Verdict("not comparable", tuple(reasons), diff, unc)
    assert diff is not None and unc is not None
    se_note = "" if measured_se is not None else " (no SE given: 0 assumed)"
    if abs(diff) <= unc:
        why = f"|difference| {abs(diff):.3g} <= tolerance {tol:g} + 2 SE {2 * se:.3g}{se_note}"
        return Verdict("reproduced", (why,), diff, unc)
    why = f"|difference| {abs(diff):.3g} > tolerance {tol:g} + 2 SE {2 * se:.3g}{se_note}"
    return Verdict("not reproduced", (why,), diff, unc)


def _lookup(config: Mapping[str, Any], key: str) -> Any:
    parts = [key, "source" if key == "data" else "name"] if key in ("data", "likelihood") else key.split(".")
    node: Any = config  # a config group ("data", "likelihood") stands for its chosen option
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            return "(absent)"
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)):
        return a == b
    return isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


def deviations(preset: Preset, config: Mapping[str, Any], seeds: int | None = None) -> list[str]:
    """How a run of `config` (a resolved config dict) departs from the preset's protocol: its blocking
    missing features, every override the run does not have, and fewer seeds than the paper's."""
    out = [f"{NOT_IMPLEMENTED}: {m.feature} (paper: {m.paper})" for m in preset.missing if m.blocking]
    for key, want in preset.settings.items():
        got = _lookup(config, key)
        if _same(got, want):
            continue
        if key == "train.max_epochs" and isinstance(got, int) and got < want:
            why = SHORTENED
        elif key == "eval.num_samples":
            why = DIFFERENT_K
        else:
            why = OTHER_DATA if key.split(".")[0] == "data" else OTHER_SETTING
        out.append(f"{why}: {key}={got!r}, the paper's {want!r}")
    if preset.seeds is not None and seeds is not None and seeds < preset.seeds:
        out.append(f"{FEWER_SEEDS}: {seeds} run(s), the paper's {preset.seeds}")
    return out


# --- time estimates -----------------------------------------------------------------------------------
# From the README's `make bench` (2026-11-25/30): the AEVB model (784-500-20-500-784, batch 100) trains at
# ~7 ms a step on 2 CPU cores and 0.40 ms a step on one H100 (201 ms per 500-step epoch, bound by Python
# and kernel launches); evaluation runs ~75,000 (example, sample) pairs a second on 2 CPU cores and
# ~700,000 on an H100. Assumed, not measured: 1 ms of each CPU step is overhead, the rest scales with the
# multiply-adds (forward + backward = 3 x forward), and every epoch costs 50 ms of bookkeeping plus a
# one-sample validation pass. Estimates are for one run of the preset, within about a factor of 2.
DATA_SIZES = {"mnist": 70_000, "frey_faces": 1_965}  # MNIST 60,000 + 10,000; frey_rawface.mat 560 x 1,965
DATA_DIMS = {"mnist": 784, "frey_faces": 560}
DEFAULT_FRACTIONS = (0.1, 0.2)  # conf/data/*.yaml val_fraction, test_fraction
CPU_STEP_OVERHEAD_S, CPU_STEP_S_AEVB, GPU_STEP_S = 1e-3, 7e-3, 4.0e-4
EPOCH_OVERHEAD_S = 0.05
CPU_EVAL_PAIRS_S, GPU_EVAL_PAIRS_S = 75_000.0, 700_000.0


def split_counts(n: int, val: float, test: float) -> tuple[int, int, int]:
    """(train, val, test) sizes as data.split_sizes makes them: fractions of n rounded half up."""
    n_val, n_test = math.floor(val * n + 0.5), math.floor(test * n + 0.5)
    return n - n_val - n_test, n_val, n_test


def _macs(d: int, hidden: Sequence[int], z: int, out_params: int) -> tuple[int, int]:
    """Multiply-adds of one encoder pass and one decoder pass of the project's MLP VAE."""

    def chain(sizes: Sequence[int]) -> int:
        return sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))

    return chain([d, *hidden, 2 * z]), chain([z, *reversed(hidden), out_params * d])


_AEVB_ENC, _AEVB_DEC = _macs(784, [500], 20, 1)
CPU_MACS_S = 100 * (_AEVB_ENC + _AEVB_DEC) * 3 / (CPU_STEP_S_AEVB - CPU_STEP_OVERHEAD_S)


def estimate_seconds(preset: Preset) -> tuple[float, float]:
    """Estimated wall time of one run of the preset (train + evaluate): (2 CPU cores, one GPU)."""
    s = {"data.val_fraction": DEFAULT_FRACTIONS[0], "data.test_fraction": DEFAULT_FRACTIONS[1]}
    s |= {"model.hidden_dims": [500], "model.latent_dim": 20, "train.num_samples": 1}
    s |= {"train.batch_size": 100, "train.max_epochs": 30, "eval.num_samples": 1000} | preset.settings
    source = s["data"]
    n_train, n_val, n_test = split_counts(DATA_SIZES[source], s["data.val_fraction"], s["data.test_fraction"])
    outputs = 2 if s.get("likelihood") == "gaussian" else 1
    enc, dec = _macs(DATA_DIMS[source], s["model.hidden_dims"], s["model.latent_dim"], outputs)
    epochs, batch, k = s["train.max_epochs"], s["train.batch_size"], s["train.num_samples"]
    steps = epochs * math.ceil(n_train / batch)
    step_macs = batch * (enc + k * dec) * 3
    pairs = n_test * s["eval.num_samples"]
    cpu = steps * (CPU_STEP_OVERHEAD_S + step_macs / CPU_MACS_S)
    cpu += epochs * (EPOCH_OVERHEAD_S + n_val * (enc + dec) / CPU_MACS_S)
    cpu += pairs / CPU_EVAL_PAIRS_S * max(1.0, dec / _AEVB_DEC)  # a larger decoder than AEVB's costs more
    gpu = steps * GPU_STEP_S + epochs * EPOCH_OVERHEAD_S + pairs / GPU_EVAL_PAIRS_S
    return cpu, gpu
