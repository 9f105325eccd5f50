"""What a sweep searches and what it ranks by: the search space, the objective, and which data spaces mix.

- The search space comes from `hydra.sweeper.params` and the command line, in Hydra's sweep syntax (choice,
  range, interval, tag(log|int, interval)), as Optuna distributions; a trial's sampled values go back to
  Hydra override text (`override_value`, `trial_overrides`).
- The objective is a key of metrics/eval.json in OBJECTIVES; `resolve_direction` gives the sense in which it
  improves.
- A density objective (log_px, elbo, bits_per_dim, ...) is refused over a search space spanning data spaces
  (`refuse_mixed_spaces`): a pmf on binary pixels and a density on [0,1] pixels are different units (see
  compare.py).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

from vaerepro.config import SAME_IMAGES_DATA_KEYS, ConfigError

log = logging.getLogger(__name__)

# eval.json keys that can be an objective: the sense in which each improves, and its unit as the sweep
# report labels its axes and columns (a log-likelihood, a bound or a part of one in nats per example, summed
# over the pixels; bits per dimension; samples; "" for none). One table, so that no objective has a
# direction without a unit.
OBJECTIVES = {
    "log_px": ("maximize", "nats/example"),
    "elbo": ("maximize", "nats/example"),
    "recon": ("maximize", "nats/example"),
    "kl": ("minimize", "nats/example"),
    "bits_per_dim": ("minimize", "bits/dim"),
    "knn_accuracy": ("maximize", ""),
    "active_units": ("maximize", ""),
    "ess": ("maximize", "samples"),
    "ess_fraction": ("maximize", ""),
}
NATURAL_DIRECTION = {key: direction for key, (direction, _) in OBJECTIVES.items()}
OBJECTIVE_UNITS = {key: unit for key, (_, unit) in OBJECTIVES.items()}


def objective_label(objective: str) -> str:
    """The objective with its unit: 'log_px (nats/example)', 'bits_per_dim (bits/dim)', 'knn_accuracy'."""
    unit = OBJECTIVE_UNITS.get(objective, "")
    return f"{objective} ({unit})" if unit else objective


# Objectives that mean the same thing whatever the data space: a classification accuracy on latent means
# (Loaiza-Ganem & Cunningham's comparison across likelihoods), counts and fractions. Every other objective
# is kept within one data space: a log-likelihood, a bound or its reconstruction term, in the units of its
# data space, and also kl and ess, which tracking.names.SPACE_FREE logs under one name for every space.
SPACE_FREE_OBJECTIVES = {"knn_accuracy", "active_units", "ess_fraction"}


# --------------------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class SearchSpace:
    """Optuna distributions by override key, and the overrides every trial gets unchanged."""

    distributions: dict[str, Any]  # key -> optuna BaseDistribution
    fixed: list[str] = field(default_factory=list)  # override strings, as typed (e.g. "+sweep=aevb")


def _distribution(override) -> Any:
    """An Optuna distribution for a Hydra sweep override: choice / range / interval / tag(log, interval)."""
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key, value = override.get_key_element(), override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        # Transformer.encode writes list choices as Hydra text ("[64,64]"); scalars stay themselves
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        # Hydra's meaning: range(start, stop, step) stops before `stop`, as in the basic sweeper
        values = list(override.sweep_iterator())
        if not values:
            raise ConfigError(f"{override.input_line}: the range is empty")
        # a descending range (negative step) holds the same values as the ascending one
        low, high, step = min(values), max(values), abs(value.step)
        integers = all(isinstance(v, int) for v in values)
        if "log" in value.tags:
            # Optuna samples on a log scale only integers of step 1 or floats without a step; never
            # dropped silently: the values would be drawn uniformly
            if not (integers and step == 1):
                raise ConfigError(
                    f"{override.input_line}: a log scale needs integers with step 1; for floats use "
                    f"tag(log, interval({low}, {high}))"
                )
            return IntDistribution(low, high, log=True)
        if integers:
            return IntDistribution(low, high, step=int(step))
        return FloatDistribution(float(low), float(high), step=float(step))
    if override.is_interval_sweep():
        # Hydra reads interval bounds as floats; tag(int, interval(a, b)) asks for the integers within them
        log_scale = "log" in value.tags
        if "int" in value.tags:
            low, high = math.ceil(value.start), math.floor(value.end)
            if low > high:
                raise ConfigError(f"{override.input_line}: the interval holds no integer")
            return IntDistribution(low, high, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ConfigError(
        f"{key}: the sweeper takes choice(...), range(...), interval(...) or tag(log|int, interval(...)), "
        f"not {override.input_line!r}"
    )


def parse_search_space(params: Mapping[str, str] | None, arguments: Sequence[str]) -> SearchSpace:
    """The search space from `hydra.sweeper.params` and the command line (which wins for a shared key).

    Parsed with Hydra's override parser, as Hydra's Optuna sweeper does; a command-line `key=a,b` is a choice.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    distributions: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for line in lines:
        # one line at a time, so that a mistake names its key (hydra.sweeper.params is parsed here only)
        try:
            (override,) = parser.parse_overrides([line])
        except HydraException as err:
            raise ConfigError(f"hydra.sweeper.params: {line}: {err}") from None
        key = override.get_key_element()
        if override.is_sweep_override():
            try:
                distributions[key] = _distribution(override)
            except (HydraException, ValueError) as err:  # Optuna's refusal: low > high, log of 0, ...
                if isinstance(err, ConfigError):
                    raise
                raise ConfigError(f"{line}: {err}") from None
            fixed.pop(key, None)
        else:
            fixed[key] = override.input_line
            distributions.pop(key, None)
    return SearchSpace(distributions, list(fixed.values()))


_PLAIN = re.compile(r"[\w./:+\-@%~]+")


def override_value(value: Any) -> str:
    """A sampled value as Hydra override text."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if _PLAIN.fullmatch(text) or text[:1] in "[{":  # plain words, numbers, paths; encoded lists / dicts
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def trial_overrides(space: SearchSpace, params: Mapping[str, Any]) -> list[str]:
    """A trial's command-line overrides: the fixed ones, then its sampled values."""
    return [*space.fixed, *(f"{k}={override_value(v)}" for k, v in params.items())]


def grid_values(space: SearchSpace) -> dict[str, list[Any]]:
    """Every distribution as a list of values, for the grid sampler (choices and stepped ranges only)."""
    from optuna.distributions import CategoricalDistribution

    grid = {}
    for key, d in space.distributions.items():
        if isinstance(d, CategoricalDistribution):
            grid[key] = list(d.choices)
        elif getattr(d, "step", None) is not None and not getattr(d, "log", False):
            n = int(round((d.high - d.low) / d.step))
            grid[key] = [d.low + i * d.step for i in range(n + 1)]
        else:
            raise ConfigError(f"{key}: the grid sampler needs choice(...) or range(...), not {d}")
    return grid


# ------------------------------------------------------------------------------- objective and spaces


def resolve_direction(objective: str, direction: str | None) -> str:
    """maximize or minimize: the one asked for, or the objective's own sense (NATURAL_DIRECTION)."""
    if objective not in NATURAL_DIRECTION:
        raise ConfigError(
            f"hydra.sweeper.objective={objective!r} is not a number in metrics/eval.json; "
            f"choose one of {', '.join(sorted(NATURAL_DIRECTION))}"
        )
    if direction is None:
        return NATURAL_DIRECTION[objective]
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"hydra.sweeper.direction={direction!r}: maximize, minimize or null")
    if direction != NATURAL_DIRECTION[objective]:
        log.warning(
            "direction=%s for %s, which improves when it %ss",
            direction,
            objective,
            NATURAL_DIRECTION[objective].removesuffix("e"),
        )
    return direction


def _space_key(key: str) -> bool:
    key = key.lstrip("+~")
    return key in ("likelihood", "data", "data.space") or key.startswith("likelihood.")


def space_combinations(space: SearchSpace) -> list[list[str]]:
    """Override lists, one per combination of the choices deciding the data space (likelihood, data.space)."""
    from optuna.distributions import CategoricalDistribution

    keys = [
        k for k, d in space.distributions.items() if _space_key(k) and isinstance(d, CategoricalDistribution)
    ]
    choices = [space.distributions[k].choices for k in keys]
    return [
        [f"{k}={override_value(v)}" for k, v in zip(keys, combo, strict=True)] for combo in product(*choices)
    ]


def trial_configs(space: SearchSpace, compose: Callable[[list[str]], Mapping[str, Any]]) -> dict[str, Any]:
    """The validated config (vaerepro.config.Config) of each combination of the choices that decide the data
    space (space_combinations), by its overrides as text ("(fixed)" for none), with the fixed overrides.

    A combination that does not validate (say Bernoulli on continuous data without allow_improper) is
    skipped with a warning: its trials will fail with the validation message. A ConfigError when Hydra
    cannot compose a combination (an unknown option, key or value) or none validates: no trial could run.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from vaerepro import config as config_mod

    configs: dict[str, Any] = {}
    refused: list[str] = []
    for combo in space_combinations(space):
        named = " ".join(combo) or "the fixed config"
        try:
            raw = dict(compose([*space.fixed, *combo]))
        except (HydraException, OmegaConfBaseException) as err:
            text = " ".join(str(err).split()).split(" Config search path:")[0]
            raise ConfigError(f"{' '.join([*space.fixed, *combo])}: {text}") from None
        try:
            configs[" ".join(combo) or "(fixed)"] = config_mod.validate(raw)
        except ConfigError as err:
            log.warning("%s: its trials will fail: %s", named, err)
            refused.append(f"{named}: {err}")
    if not configs and refused:  # every trial would fail: refused before the study or a trial is written
        raise ConfigError(f"no trial of this search space can run; {refused[0]}")
    return configs


def spaces_of(configs: Mapping[str, Any]) -> dict[tuple[str, bool], list[str]]:
    """(data space, improper) -> the combinations of `configs` (trial_configs' answer) that lead there."""
    spaces: dict[tuple[str, bool], list[str]] = {}
    for combo, cfg in configs.items():
        spaces.setdefault((cfg.data_space, cfg.improper), []).append(combo)
    return spaces


def data_spaces(
    space: SearchSpace, compose: Callable[[list[str]], Mapping[str, Any]]
) -> dict[tuple[str, bool], list[str]]:
    """(data space, improper) -> the choices that lead there; each combination composed and validated
    (trial_configs, with its warnings and refusals)."""
    return spaces_of(trial_configs(space, compose))


# the same test images whatever their value (config.SAME_IMAGES_DATA_KEYS)
_SAME_IMAGES = tuple(f"data.{k}" for k in SAME_IMAGES_DATA_KEYS)


def _measurement_key(key: str) -> bool:
    """Whether sweeping `key` changes what a trial measures (compare.measurement): K, or the data set and
    its splits (the data group, data.source, data.path, the fractions, sizes and split seed). data.space is
    refuse_mixed_spaces's; the seeds only redraw the randomness of one measurement."""
    key = key.lstrip("+~")
    return key in ("eval.num_samples", "data") or (key.startswith("data.") and key not in _SAME_IMAGES)


def refuse_swept_measurement(space: SearchSpace) -> None:
    """Refuse a search space over keys that change what a trial measures (_measurement_key), whatever the
    objective: a best trial across data sets or splits is not a better model of one data set, and log p(x)
    estimates with another K are lower or higher by K as much as by model; so is a pruner's comparison."""
    swept = sorted(k for k in space.distributions if _measurement_key(k))
    if swept:
        raise ConfigError(
            f"the search space sweeps {', '.join(swept)}, which changes what each trial measures (the data "
            "set, its test split or the number of importance samples K): its trials cannot be ranked in one "
            "study. Sweep those keys as separate studies (hydra.sweeper.study_name), one value each"
        )


# The md5 of data.path's file, recorded beside the config keys of measurement_keys (measurement_settings).
PATH_MD5 = "data.path_md5"


def measurement_keys() -> list[str]:
    """The config keys whose value decides what a trial measures (_measurement_key): every data.* key but
    those of _SAME_IMAGES (a data key added later counts, until it is known to leave the images alone),
    and eval.num_samples.

    Not the seeds: `seed` also draws the binarisation (or dequantisation) of the test and training images
    (evaluate.py, data.fixed_space at seed + TEST_SEED_OFFSET), and eval.seed the importance samples, but
    another draw of the same images from the same pixel probabilities is another draw of one measurement,
    with the same expectation (as compare.measurement counts it: the test split's sha256, before any draw,
    and K). So `seed` may be swept, and may change on a resume. Nor eval.precision: its effect on log p(x)
    is measured and recorded (eval.json `precision`), not a change of the quantity estimated."""
    from vaerepro.config import DataConfig

    keys = [f"data.{k}" for k in DataConfig.model_fields]
    return [k for k in keys if _measurement_key(k)] + ["eval.num_samples"]


def measurement_settings(configs: Mapping[str, Any]) -> dict[str, Any]:
    """What the trials of `configs` (trial_configs' answer) measure: measurement_keys -> its value, from
    the fixed overrides and the config (the first combination's: refuse_swept_measurement has refused a
    search space over these keys, and the choices deciding the data space leave them alone). data.path is
    the file itself, as prepare reads it (~ expanded, relative to the working directory); PATH_MD5 its
    content's md5 where it is there: a file rewritten under the same name between two sweeps of one study
    may hold other test images."""
    from pathlib import Path

    from vaerepro.sources import file_md5

    cfg = next(iter(configs.values()))
    settings: dict[str, Any] = {}
    for key in measurement_keys():
        section, name = key.split(".", 1)
        value = getattr(getattr(cfg, section), name)
        if key == "data.path" and value is not None:
            value = str(Path(value).expanduser().resolve())
        settings[key] = value
    path = settings.get("data.path")
    if path is not None and Path(path).is_file():  # a missing file is prepare's refusal, named there
        settings[PATH_MD5] = file_md5(Path(path))
    return settings


def refuse_unlabelled(objective: str, configs: Mapping[str, Any]) -> None:
    """Refuse knn_accuracy as the objective over data without labels (frey_faces, an .npz without y):
    evaluation writes knn_accuracy null there, and every trial would fail after its training. Read from
    the .npz's zip directory, before any data are prepared (data.stored_labels)."""
    if objective != "knn_accuracy":
        return
    from pathlib import Path

    from vaerepro.data import stored_labels

    for cfg in configs.values():
        path = Path(cfg.data.path).expanduser().resolve() if cfg.data.path else None
        if stored_labels(cfg.data.source, path) is False:
            where = f"{path} holds no array 'y'" if path else f"data.source={cfg.data.source} has none"
            raise ConfigError(
                f"objective knn_accuracy needs the data's labels, and {where}: no trial could compute it. "
                "Use a density objective within one data space (hydra.sweeper.objective=log_px, elbo or "
                "bits_per_dim), or across data spaces active_units"
                + (", or save the labels as y (numpy.savez(path, x=x, y=labels))" if path else "")
            )


def refuse_mixed_spaces(objective: str, pruner: str, spaces: Mapping[tuple[str, bool], list[str]]) -> None:
    """Refuse a density objective, or validation-ELBO pruning, over several data spaces (or improper runs).

    `spaces` is `data_spaces`'s answer; one data space passes whatever the objective and pruner.
    """
    if len(spaces) <= 1:
        return
    from vaerepro.compare import space_label

    listing = "\n".join(
        f"  - {space_label(s, imp)}: {', '.join(combos)}" for (s, imp), combos in spaces.items()
    )
    if objective not in SPACE_FREE_OBJECTIVES:
        raise ConfigError(
            f"objective {objective!r} cannot rank this search space: its likelihoods live in "
            f"{len(spaces)} data spaces, where {objective} has different units:\n{listing}\n"
            "Sweep one data space at a time, or use hydra.sweeper.objective=knn_accuracy "
            f"(comparable across spaces); allowed across spaces: {', '.join(sorted(SPACE_FREE_OBJECTIVES))}."
        )
    if pruner != "none":
        raise ConfigError(
            f"hydra/sweeper/pruner={pruner} compares trials' validation ELBOs, which are in different units "
            f"across this search space's data spaces:\n{listing}\nUse hydra/sweeper/pruner=none here."
        )
