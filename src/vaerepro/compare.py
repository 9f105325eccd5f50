"""Which results may share a scale, and ranking within one.

A log-likelihood is only a number in some unit of some measure. A Bernoulli pmf on binarised pixels
(`binary` space) and a density on pixels in [0,1] (`continuous` space) are different units: the first is a
probability (<= 1, log <= 0), the second a density (can exceed 1). A Bernoulli "likelihood" on grey-level
pixels is not normalised at all (`improper`, Loaiza-Ganem & Cunningham 2019). So results are grouped by
(data space, improper) and nothing here ranks, or lets anyone plot, numbers from two groups together.

Within one unit, estimates are still one measurement only when they are of the same test images with the
same number K of importance samples (`measurement`): runs of two measurements are not ranked together either.

Rows are plain mappings, one per run (as the caller reads them from MLflow or result files), with at least
`run_id`, `run_name`, `data_space`, `improper` and metrics such as `log_px` (nats per example); `source`,
`test_set` (the test split's sha256, short) and `num_samples` (K) say what was measured.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

Key = tuple[str, bool]

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no", ""}
_SPACE_NAMES = {"binary": "binary pixels", "continuous": "continuous pixels in [0,1]"}


class IncomparableError(ValueError):
    """Results from different data spaces, or improper with proper ones, were asked to share a scale."""


def _run(row: Mapping) -> str:
    """A human name for a row, for error messages."""
    name, run_id = row.get("run_name"), row.get("run_id")
    if name and run_id:
        return f"{name} ({run_id})"
    return str(name or run_id or "<unnamed run>")


def _as_bool(value, row: Mapping) -> bool:
    # MLflow params come back as strings, and bool("False") is True: parse them, refuse what is unclear.
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise IncomparableError(f"run {_run(row)}: cannot read improper={value!r} as true/false")
    return bool(value)


def comparability_key(row: Mapping) -> Key:
    """(data space, improper) of a row; two rows may share a scale only if their keys are equal."""
    missing = [k for k in ("data_space", "improper") if row.get(k) is None]
    if missing:
        raise IncomparableError(
            f"run {_run(row)} has no {' or '.join(missing)}: without it its numbers cannot be placed "
            "on any scale (binary pmf, continuous density or improper)"
        )
    return str(row["data_space"]), _as_bool(row["improper"], row)


def group_comparable(rows: Iterable[Mapping]) -> dict[Key, list[Mapping]]:
    """Rows grouped by comparability key; groups and rows keep the order in which they first appear."""
    groups: dict[Key, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(comparability_key(row), []).append(row)
    return groups


def space_label(data_space: str, improper: bool) -> str:
    """What a number of this group measures, in words, with its unit."""
    if improper:
        return (
            f"{_SPACE_NAMES.get(data_space, f'{data_space} data')} — IMPROPER "
            "(unnormalised Bernoulli on grey levels; not comparable)"
        )
    if data_space == "binary":
        return "binary pixels — Bernoulli pmf (nats/example)"
    if data_space == "continuous":
        return "continuous pixels in [0,1] — density (nats/example)"
    return f"{data_space} data (nats/example)"


Measurement = tuple[str, str, str]
UNRECORDED = "unrecorded"


def measurement(row: Mapping) -> Measurement:
    """What a row's estimates measured, beyond their unit (comparability_key): (data source, test set, K),
    as text, UNRECORDED for what the run did not record.

    Two log p(x) estimates in one unit are one measurement only on the same test images (test_set: the test
    split's sha256, short; another source, split or file is another test set) with the same number K of
    importance samples: an estimate with fewer samples is lower in expectation (Burda et al. 2016), so a
    K = 100 estimate ranked beside a K = 5000 one would be ranked by K as much as by model."""
    k = metric_value(row, "num_samples")
    return (
        str(row.get("source") or UNRECORDED),
        str(row.get("test_set") or UNRECORDED),
        UNRECORDED if k is None else str(int(k)),
    )


def measurement_text(m: Measurement) -> str:
    """A measurement in words: 'data mnist, test set 3f2a9c1b0d4e, K = 5000'."""
    source, test_set, k = m
    return f"data {source}, test set {test_set}, K = {k}"


def check_comparable(rows: Iterable[Mapping], what: str = "these runs") -> Key:
    """The single comparability key of `rows`; IncomparableError if they span more than one."""
    rows = list(rows)
    groups = group_comparable(rows)
    if not groups:
        raise ValueError(f"{what}: no runs to compare")
    if len(groups) == 1:
        measured = list(dict.fromkeys(measurement(r) for r in rows))
        if len(measured) > 1:
            raise IncomparableError(
                f"{what} cannot share one scale: they are log-likelihoods of different data sets or with "
                f"different numbers of importance samples ({'; '.join(map(measurement_text, measured))}); "
                "compare runs of one test set and one K only."
            )
        return next(iter(groups))
    lines = [
        f"{what} cannot share one scale: they span {len(groups)} data space / improper groups.",
        "A Bernoulli pmf on binary pixels, a density on pixels in [0,1] and an unnormalised (improper)",
        "Bernoulli on grey levels measure different things in different units; compare within a group only.",
    ]
    for (space, improper), members in groups.items():
        names = ", ".join(_run(r) for r in members)
        lines.append(f"  - data_space={space}, improper={improper} [{space_label(space, improper)}]: {names}")
    raise IncomparableError("\n".join(lines))


def metric_value(row: Mapping, metric: str) -> float | None:
    """The row's metric as a finite float, or None (missing, null, NaN, inf, unreadable)."""
    try:
        value = float(row.get(metric))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# Metrics that come from the importance-sampled log p(x), and so carry its convergence verdict.
ESTIMATE_METRICS = frozenset({"log_px", "bits_per_dim"})


def converged(row: Mapping) -> bool | None:
    """The row's convergence verdict (eval.json `converged`, see estimators.convergence): True, False, or
    None when it has none (a run evaluated before the verdict existed)."""
    value = row.get("converged")
    if isinstance(value, str):  # as an MLflow tag
        return {"true": True, "false": False}.get(value.strip().lower())
    if value is None or isinstance(value, bool):
        return value
    number = metric_value(row, "converged")  # the MLflow metric test/converged: 1.0 or 0.0
    return None if number is None else number != 0


def rank(rows: Iterable[Mapping], metric: str, higher_is_better: bool = True) -> list[Mapping]:
    """Rows with a finite `metric`, best first. Refuses (IncomparableError) rows from several groups or
    measurements.

    Rows without a finite value are dropped, not ranked last: a missing number is not a bad number.
    For a metric of the log p(x) estimate (ESTIMATE_METRICS), rows whose estimate has not converged
    (`converged` false) come after all the others, best first among themselves: an estimate that may still
    be far from log p(x) never ranks above one that has converged (or was not checked). Ties keep input order.
    """
    rows = list(rows)
    if not rows:
        return []
    check_comparable(rows, what=f"ranking by {metric}")
    scored = [(v, r) for r in rows if (v := metric_value(r, metric)) is not None]
    scored.sort(key=lambda pair: pair[0], reverse=higher_is_better)
    if metric in ESTIMATE_METRICS:
        scored.sort(key=lambda pair: converged(pair[1]) is False)  # stable: keeps the order within each part
    return [r for _, r in scored]


# The numbers of a run's evaluation that the reports show or rank by (eval.json keys; MLflow metrics
# test/<key>): each, when present, must be a number.
EVAL_NUMBERS = (
    "log_px",
    "log_px_se",
    "elbo",
    "elbo_se",
    "kl",
    "recon",
    "bits_per_dim",
    "num_samples",
    "num_examples",
)
# How far above 0, in nats summed over the test examples (N t for a mean of t nats/example over N examples),
# an importance-sampled log p(x) of a Bernoulli (p(x|z) <= 1, so p(x) <= 1) may be before it is refused.
# Each example's estimate averages importance weights whose expectation is p(x_i) <= 1, so by Markov's
# inequality on their product (independent across examples) P(mean estimate >= t) <= exp(-N t): a small
# positive estimate of near-deterministic data is possible, one this far above 0 (exp(-50)) is not. An
# unconverged estimate is biased low, not high, so its verdict changes nothing here.
POSITIVE_LOG_PX_NATS = 50.0


def _number(value, strict: bool) -> float | None:
    """`value` as a float (NaN and inf kept), None when absent; ValueError when it is not a number. `strict`
    (a file evaluate wrote, e.g. eval.json): only JSON numbers; else text that reads as one too (MLflow tags
    and params are text)."""
    if value is None:
        return None
    if isinstance(value, bool) or (strict and not isinstance(value, (int, float))):
        raise ValueError
    return float(value)


def _bounded_above_by_zero(row: Mapping) -> bool:
    """Whether the row's likelihood is a Bernoulli, whose p(x|z) <= 1: a pmf on binary pixels, or the
    improper Bernoulli on grey levels. A density on [0,1] (continuous, proper) can exceed 1."""
    try:
        space, improper = comparability_key(row)
    except IncomparableError:
        return False
    return space == "binary" or improper


def curve_mismatch(last: Mapping | None, train: Mapping) -> str | None:
    """Why a training curve (plots/elbo.csv) whose last row is `last` ({train_elbo, val_elbo}, floats; None
    for a curve without rows) is not the curve of the training metrics/train.json (`train`) records, or
    None. train.py takes train.json's train_elbo and val_elbo from the curve's last row, so a curve cut
    short, emptied or of another training ends otherwise and would be drawn beside other numbers. Not
    checked against a train.json without the two numbers (written before it held them)."""
    keys = ("train_elbo", "val_elbo")
    want = [train.get(k) for k in keys]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in want):
        return None
    if last is None and all(math.isnan(v) for v in want):
        return None  # no epoch ran, and the curve says so
    got = [None if last is None else last.get(k) for k in keys]
    if all(
        g is not None and (g == w or (math.isnan(g) and math.isnan(w)))
        for g, w in zip(got, want, strict=True)
    ):
        return None
    shown = "no rows" if last is None else f"train_elbo {got[0]}, val_elbo {got[1]}"
    return (
        f"its last row ({shown}) is not the last epoch that metrics/train.json records "
        f"(train_elbo {want[0]}, val_elbo {want[1]}): cut short, emptied or of another training"
    )


def impossible(row: Mapping, *, strict: bool = False) -> str | None:
    """Why the row's evaluation numbers cannot come from a correct evaluation, as '<key> = <value> ...: why',
    or None when they can. The row is an eval.json (`strict`: numbers must be JSON numbers) or a report row
    (see the module docstring; MLflow's text tags may hold numbers).

    Refused: a value of EVAL_NUMBERS (or of the log p(x) ladder) that is not a number; a negative standard
    error; a NaN standard error of a mean over more than one example (evaluate writes NaN for a single test
    example only, estimators.mean_se); a non-finite log p(x) without a 'not converged' verdict (evaluate
    records a non-finite estimate with converged false, estimators.convergence); a Bernoulli's log p(x)
    estimate clearly above 0 (POSITIVE_LOG_PX_NATS). Allowed: a positive log p(x) of a density, a zero SE.
    """
    values: dict[str, float | None] = {}
    for key in EVAL_NUMBERS:
        try:
            values[key] = _number(row.get(key), strict)
        except (TypeError, ValueError):
            return f"{key} = {row.get(key)!r} is not a number"
    n = values["num_examples"]
    n_total = n if n is not None and math.isfinite(n) and n >= 1 else 1.0
    # (key of the estimate, its value, key of its SE, its value): the headline, then each ladder point
    points = [("log_px", values["log_px"], "log_px_se", values["log_px_se"])]
    ladder = row.get("log_px_ladder")
    for i, point in enumerate(ladder if isinstance(ladder, list) else []):
        if not isinstance(point, Mapping):
            return f"log_px_ladder[{i}] = {point!r} is not a ladder point (k, log_px, se)"
        parsed = []
        for key in ("log_px", "se"):
            try:
                parsed.append(_number(point.get(key), strict))
            except (TypeError, ValueError):
                return f"log_px_ladder[{i}].{key} = {point.get(key)!r} is not a number"
        points.append((f"log_px_ladder[{i}].log_px", parsed[0], f"log_px_ladder[{i}].se", parsed[1]))
    bounded = _bounded_above_by_zero(row)
    for lp_key, lp, se_key, se in points:
        if se is not None and se < 0:
            return f"{se_key} = {se!r} is negative: a standard error never is"
        if se is not None and math.isnan(se) and lp is not None and math.isfinite(lp) and n != 1:
            return (
                f"{se_key} = nan with a finite log p(x): evaluate writes a NaN standard error only for a "
                f"single test example (num_examples = {row.get('num_examples')!r})"
            )
        if lp is not None and math.isfinite(lp) and bounded and lp * n_total > POSITIVE_LOG_PX_NATS:
            return (
                f"{lp_key} = {lp!r} nats/example on {row.get('data_space')} pixels under a Bernoulli: "
                f"p(x) <= 1, and an estimate this far above 0 over {n_total:g} example(s) has probability "
                f"below exp(-{POSITIVE_LOG_PX_NATS:g})"
            )
    lp = values["log_px"]
    if lp is not None and not math.isfinite(lp) and converged(row) is not False:
        return (
            f"log_px = {lp!r} without the verdict 'not converged': evaluate records a non-finite log p(x) "
            "estimate only with converged false"
        )
    return None
