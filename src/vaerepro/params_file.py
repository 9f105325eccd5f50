"""params.yaml, the resolved config DVC's stages read, and whether it is the config the user meant.

`vaerepro params OVERRIDES` composes conf/ with the overrides and writes them into the file's first line
(`params_text`). `dvc repro` runs the file as it is and never composes conf/; `dvc exp run` composes conf/
with its -S overrides alone and writes the file anew, without that line. Each can run another config than
the one asked for, so the check stage warns (`warn_if_not_meant`):
- under `dvc repro`, when conf/ was edited since the file was written (`params_drift`): the stages would run
  the old values under a conf/ that says otherwise;
- under `dvc exp run`, when the baseline's file recorded overrides that the experiment lacks
  (`overrides_left_out`): `dvc exp show` would set the experiment beside a baseline it does not vary.
Warnings, not refusals: a params.yaml edited by hand is a config DVC users run on purpose.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from vaerepro.config import ConfigError, compose, dump
from vaerepro.document import flatten

log = logging.getLogger("vaerepro")

# The first line `vaerepro params` writes into params.yaml: the overrides it composed conf/ with, so that
# `params_drift` can compose conf/ as that file was composed.
PARAMS_HEADER = "# written by `vaerepro params{}`: conf/ composed with these overrides"
_PARAMS_HEADER = re.compile(re.escape(PARAMS_HEADER).replace(re.escape("{}"), "(.*)") + "$")
SHOWN = 5  # keys a warning names; it counts the rest


def params_text(raw: dict[str, Any], overrides: list[str]) -> str:
    """params.yaml as `vaerepro params OVERRIDES` writes it: the header naming the overrides, then `raw`."""
    return PARAMS_HEADER.format("".join(" " + shlex.quote(o) for o in overrides)) + "\n" + dump(raw)


def recorded_overrides(text: str) -> list[str] | None:
    """The overrides a params.yaml's first line records (`params_text`); None when another writer wrote it
    (`dvc exp run`, an editor)."""
    match = _PARAMS_HEADER.match(text.split("\n", 1)[0])
    return None if match is None else shlex.split(match.group(1))


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()  # a key one of two configs lacks; one object, so two configs lacking it compare equal


def _differences(have: dict[str, Any], want: dict[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, have's value, want's value) wherever two resolved configs differ, `have`'s keys first."""
    a, b = flatten(have), flatten(want)
    for key in dict.fromkeys([*a, *b]):
        if (x := a.get(key, _ABSENT)) != (y := b.get(key, _ABSENT)):
            yield key, x, y


def params_drift(
    path: str | os.PathLike, config_dir: str | os.PathLike
) -> tuple[list[str] | None, list[str]]:
    """Where the resolved config at `path` is not what conf/ composes now with the overrides the file
    records (none when it records none): the recorded overrides, and one 'model.latent_dim: params.yaml 20,
    conf/ 50' per key that differs. A ConfigError when conf/ does not compose."""
    path = Path(path)
    text = path.read_text()
    overrides = recorded_overrides(text)
    differ = _differences(yaml.safe_load(text), compose(overrides or [], config_dir))
    return overrides, [f"{k}: {path.name} {a!r}, conf/ {b!r}" for k, a, b in differ]


def overrides_left_out(
    path: str | os.PathLike, baseline_text: str, config_dir: str | os.PathLike
) -> tuple[list[str], list[str]]:
    """The overrides `vaerepro params` recorded in the baseline's params.yaml (`baseline_text`, its first
    line), and one 'model.latent_dim: experiment 20, baseline 50' per key they set that the experiment's
    resolved config at `path` has at conf/'s own value instead; a key the experiment's -S set otherwise is
    its own change. ([], []) when the baseline records none or the experiment has every key they set; a
    ConfigError when conf/ does not compose with them."""
    recorded = recorded_overrides(baseline_text)
    if not recorded:
        return [], []
    wanted = compose(recorded, config_dir)
    conf_value = {k: a for k, a, _ in _differences(compose([], config_dir), wanted)}  # the keys they set
    lost = [
        f"{k}: experiment {a!r}, baseline {b!r}"
        for k, a, b in _differences(yaml.safe_load(Path(path).read_text()), wanted)
        if k in conf_value and a == conf_value[k]
    ]
    return (recorded, lost) if lost else ([], [])


def _listed(keys: list[str]) -> str:
    more = len(keys) - SHOWN
    return "; ".join(keys[:SHOWN]) + (f"; and {more} more" if more > 0 else "")


def warn_if_not_meant(params: Path, root: Path) -> None:
    """The check stage's warning that `params` is not the config the user meant: under `dvc exp run`
    (DVC_EXP_NAME, which has just written it) when it lacks what the baseline's file recorded, otherwise
    when conf/ composes otherwise now. Only for the project's params.yaml, the file DVC runs: a run's
    directory holds the config it ran with, conf/ and its overrides resolved (no header). Nothing without
    conf/ (a project run from its params.yaml alone)."""
    if not (root / "conf").is_dir() or params.resolve() != (root / "params.yaml").resolve():
        return
    if os.environ.get("DVC_EXP_NAME"):
        _warn_if_exp_left_out_overrides(params, root)
    else:
        _warn_if_conf_changed(params, root)


def _warn_if_conf_changed(params: Path, root: Path) -> None:
    try:
        overrides, differ = params_drift(params, root / "conf")
    except ConfigError as err:
        log.warning("%s: conf/ does not compose (%s); the stages run %s as it is", params, err, params.name)
        return
    if not differ:
        return
    if overrides is None:
        against = "conf/ as it composes now (it records no overrides: dvc exp run or an editor wrote it)"
    elif overrides:
        against = (
            f"conf/ as it composes now with the overrides its first line records ({shlex.join(overrides)})"
        )
    else:
        against = "conf/ as it composes now"
    log.warning(
        "%s is not %s: %s. The stages run %s as it is; to run conf/ as it is now, `vaerepro params "
        "[OVERRIDES]`, then `dvc repro`; or `dvc exp run`",
        params,
        against,
        _listed(differ),
        params.name,
    )


def _warn_if_exp_left_out_overrides(params: Path, root: Path) -> None:
    """The baseline is DVC_EXP_BASELINE_REV's params.yaml, read with git from the workspace or from DVC's
    copy of it under .dvc/tmp/exps; nothing is said when git cannot show it."""
    rev = os.environ.get("DVC_EXP_BASELINE_REV") or "HEAD"
    try:
        relative = params.resolve().relative_to(root.resolve())
        shown = subprocess.run(
            ["git", "show", f"{rev}:./{relative.as_posix()}"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (ValueError, OSError, subprocess.SubprocessError):  # outside root; no git
        return
    if shown.returncode != 0:  # not committed at the baseline, or not a git repository
        return
    try:
        recorded, lost = overrides_left_out(params, shown.stdout, root / "conf")
    except ConfigError as err:
        log.warning("%s: conf/ does not compose with the baseline's overrides (%s)", params, err)
        return
    if lost:
        log.warning(
            "%s: dvc exp run composed conf/ with its -S overrides only, not with the ones `vaerepro params` "
            "recorded in the baseline's %s (%s): %s. Unless your -S set these to conf/'s values on purpose, "
            "give them too to vary the baseline: dvc exp run %s -S ...; or set them in conf/",
            params,
            params.name,
            shlex.join(recorded),
            _listed(lost),
            " ".join(f"-S {shlex.quote(o)}" for o in recorded),
        )
