"""What a reproduction planned and what its seeds wrote: the plain types that `vaerepro reproduce NAME`
passes from running to writing up.

- Plan: the preset, overrides, seeds and directories, decided and validated by reproduce.plan before
  anything runs.
- SeedResult: one seed's result files, read from its run directory.
- Result: the plan, every seed's results and the verdict (judge.judge), as reproduce.run returns it.

reproduce.py fills them; card.py writes them up. They live here, apart from both, so that the card reads
what a run produced without importing the code that runs it, and the run writes the card.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaerepro.compare import curve_mismatch, impossible
from vaerepro.errors import UserError
from vaerepro.reproductions import judge as R
from vaerepro.reproductions import resumption as resume_mod


@dataclass(frozen=True)
class Plan:
    """What a reproduction runs, decided and validated before anything runs."""

    preset: R.Preset
    user: tuple[str, ...]  # the user's overrides
    overrides: tuple[str, ...]  # the preset's, the smoke run's, the user's, in that order (the last wins)
    seeds: tuple[int, ...]
    smoke: bool
    config: dict[str, Any]  # the run's resolved config (the first seed's)
    protocol: dict[str, Any]  # the preset's overrides alone, resolved
    run_dir: Path  # runs/reproductions[/smoke]/NAME
    card_dir: Path  # reports/reproductions[/smoke]
    out: Path | None = None  # --out, when given

    @property
    def asked(self) -> resume_mod.Asked:
        return resume_mod.Asked(self.preset.name, self.overrides, self.user, len(self.seeds), self.smoke)

    @property
    def resume_command(self) -> str:
        return resume_mod.resume_command(self.preset.name, self.user, len(self.seeds), self.smoke, self.out)


@dataclass
class SeedResult:
    """What one seed's pipeline run wrote: metrics/eval.json, metrics/train.json, prepared/meta.json,
    plots/elbo.csv (rows of epoch, train_elbo, val_elbo) and, where train.test_curve was on,
    plots/test_curve.csv (rows of epoch, samples_seen, test_elbo: the test-set ELBO during training)."""

    seed: int
    out_dir: Path
    eval: dict[str, Any]
    train: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)
    wall_s: float | None = None  # the seed's process, start to end (each invocation's, when resumed)
    run_id: str | None = None  # its MLflow run
    wall_note: str = ""  # what wall_s covers, when more or less than one process
    test_curve: list[dict[str, float]] = field(default_factory=list)  # empty without plots/test_curve.csv

    @property
    def records(self) -> dict[str, Mapping[str, Any]]:
        return {"eval.json": self.eval, "train.json": self.train}

    @classmethod
    def read(
        cls,
        seed: int,
        out_dir: Path,
        wall_s: float | None = None,
        run_id: str | None = None,
        wall_note: str = "",
    ):
        def unreadable(path: Path, why: object) -> UserError:
            # a damaged file (a full disk, a copy cut short) is one line naming it, not a traceback, and the
            # reproduction's record and other seeds are left as they are
            marker = out_dir / resume_mod.MARKER
            return UserError(
                f"{path}: seed {seed}'s result cannot be read ({why}); restore it, or delete {marker} and "
                "resume to run that seed again"
            )

        def load(path: Path) -> dict[str, Any]:
            if not path.is_file():
                return {}
            try:
                data = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as err:
                raise unreadable(path, f"not JSON: {err}") from None
            if not isinstance(data, dict):
                raise unreadable(path, f"a JSON {type(data).__name__}, not an object")
            return data

        def rows(path: Path) -> list[dict[str, float]]:  # a CSV file's rows as numbers (empty: NaN)
            if not path.is_file():
                return []
            try:
                with path.open(newline="") as fh:
                    return [
                        {k: float(v) if v else math.nan for k, v in r.items()} for r in csv.DictReader(fh)
                    ]
            except (ValueError, TypeError, UnicodeDecodeError, csv.Error) as err:
                raise unreadable(path, f"not a table of numbers: {err}") from None

        curve, test_curve = (rows(out_dir / "plots" / f) for f in ("elbo.csv", "test_curve.csv"))
        ev, tr = (load(out_dir / "metrics" / f) for f in ("eval.json", "train.json"))
        # the card would draw another training's curve, or one cut short or emptied (no rows: last None)
        elbo_csv = out_dir / "plots" / "elbo.csv"
        if elbo_csv.is_file() and (problem := curve_mismatch(curve[-1] if curve else None, tr)) is not None:
            raise unreadable(elbo_csv, problem)
        if ev and (problem := impossible(ev, strict=True)) is not None:  # hand-edited or damaged numbers
            raise unreadable(out_dir / "metrics" / "eval.json", problem)
        meta = load(out_dir / "prepared" / "meta.json")
        return cls(seed, out_dir, ev, tr, meta, curve, wall_s, run_id, wall_note, test_curve)


@dataclass
class Result:
    plan: Plan
    seeds: list[SeedResult]
    deviations: list[str]
    measurements: list[R.Measurement]
    environment: dict[str, str]
    wall_s: float
    mlflow: tuple[str, str] | None = None  # (tracking uri, the reproduction's run id)
    resumption: resume_mod.Resumption | None = None  # when this invocation resumed a stopped one

    @property
    def verdict(self) -> R.Kind:
        return R.overall([m.verdict for m in self.measurements])
