"""What a reproduction leaves on disk so that a stopped one can go on (`vaerepro reproduce NAME --resume`).

- runs/reproductions[/smoke]/NAME/reproduction.json (`Ledger`): what was asked (preset, overrides, seeds,
  smoke), the MLflow parent run, and each invocation: when it started and how it ended, and for each seed
  how it took it (from the start, continued from models/last.ckpt, or reused) and the seconds its process
  ran. A fresh reproduction writes it anew; each invocation adds to it as it goes, every write whole (a
  temporary file renamed over it), so a stop at any point leaves a readable record.
- seed_<s>/reproduced.json (the marker): the seed's process ended 0 and its metrics/eval.json exists; its
  total wall time and its MLflow run. --resume never runs a seed with one again.

Running a reproduction again without --resume deletes nothing (`set_aside`): a stopped one is refused unless
--fresh, and any earlier one is moved whole, with a copy of its card, to NAME.<when it started> beside it.

A seed's models/last.ckpt is continued only when this reproduction ran the seed before: a checkpoint that
an earlier reproduction left in the directory is never mixed into this one. The wall times add up the
invocations whose work a result continues; when one of them ended unseen (the process was killed -9), only
this invocation's time is given, and labelled so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from vaerepro.errors import UserError
from vaerepro.files import try_lock, write_json, write_whole

RECORD = "reproduction.json"
MARKER = "reproduced.json"
How = Literal["start", "continue", "reuse"]  # what an invocation does with a seed


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def resume_command(name: str, user: Sequence[str], seeds: int, smoke: bool, out: Path | None) -> str:
    """The command line that resumes this reproduction, quoted for a POSIX shell."""
    words = ["vaerepro", "reproduce", name, *user, "--seeds", str(seeds)]
    words += ["--smoke"] if smoke else []
    words += ["--out", str(out)] if out is not None else []
    return " ".join(shlex.quote(w) for w in [*words, "--resume"])


@dataclass(frozen=True)
class Asked:
    """What a reproduction was asked to do: what --resume must be given again."""

    preset: str
    overrides: tuple[str, ...]  # the preset's, the smoke run's, the user's
    user: tuple[str, ...]
    seeds: int
    smoke: bool

    def differences(self, record: Mapping[str, Any]) -> list[str]:
        """What this request changes from the recorded one, each as a phrase naming it."""
        found = []

        def words(v: Sequence[str]) -> str:
            return f"`{' '.join(v)}`" if v else "none"

        if record.get("preset") != self.preset:
            found.append(f"preset {self.preset} (recorded: {record.get('preset')})")
        if list(record.get("user_overrides", ())) != list(self.user):
            found.append(
                f"overrides {words(self.user)} (recorded: {words(record.get('user_overrides', ()))})"
            )
        elif list(record.get("overrides", ())) != list(self.overrides):
            found.append("the preset's own overrides (changed in the code since it ran)")
        if record.get("seeds") != self.seeds:
            found.append(f"--seeds {self.seeds} (recorded: --seeds {record.get('seeds')})")
        if record.get("smoke") != self.smoke:
            found.append(f"--smoke {'given' if self.smoke else 'not given'} (recorded: the opposite)")
        return found


@dataclass(frozen=True)
class SeedWall:
    """A seed's wall time as the card shows it."""

    seconds: float | None
    invocations: int  # how many invocations `seconds` adds up
    note: str = ""  # what the card says beside it ("" for one invocation's)


@dataclass(frozen=True)
class Resumption:
    """How this invocation resumed its reproduction, for the card and the summary."""

    resumed: int  # times the reproduction was resumed, this one included
    reused: tuple[int, ...]  # seeds finished before: read from disk, not run
    continued: tuple[int, ...]  # seeds continued from models/last.ckpt
    wall_note: str  # what the total wall time covers, or "" (one invocation's)

    @property
    def text(self) -> str:
        """'resumed (--resume) N times; seed 0 finished earlier: ...; seed 1 continued ...'"""

        def seeds(s: Sequence[int]) -> str:
            return ("seed " if len(s) == 1 else "seeds ") + ", ".join(map(str, s))

        parts = [f"resumed (--resume) {self.resumed} time{'s' if self.resumed != 1 else ''}"]
        if self.reused:
            parts.append(f"{seeds(self.reused)} finished earlier: read from disk, not run again")
        if self.continued:
            parts.append(f"{seeds(self.continued)} continued from models/last.ckpt")
        return "; ".join(parts)


class Ledger:
    """reproduction.json of one reproduction; the current invocation is the last of data["invocations"]."""

    def __init__(self, run_dir: Path, data: dict[str, Any]):
        self.run_dir, self.data = run_dir, data

    @property
    def path(self) -> Path:
        return self.run_dir / RECORD

    @classmethod
    def fresh(cls, run_dir: Path, asked: Asked) -> Ledger:
        """A new reproduction's record (written by `begin`)."""
        data = {
            "preset": asked.preset,
            "overrides": list(asked.overrides),
            "user_overrides": list(asked.user),
        }
        data |= {"seeds": asked.seeds, "smoke": asked.smoke, "started": now(), "mlflow": None}
        return cls(run_dir, data | {"invocations": []})

    @classmethod
    def stopped(cls, run_dir: Path, asked: Asked) -> Ledger:
        """The recorded reproduction that `asked` resumes; a UserError naming what is missing or differs.
        Reads only."""
        path = run_dir / RECORD
        if not path.is_file():
            raise UserError(
                f"no stopped reproduction of {asked.preset} in {run_dir} to resume; run it without --resume"
            )
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("invocations"), list):
                raise ValueError("not the object `vaerepro reproduce` writes")
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: not a reproduction record ({err}); run it without --resume") from None
        if diffs := asked.differences(data):
            raise UserError(
                f"--resume: {'; '.join(diffs)}: not the reproduction recorded in {path}; give the same "
                "overrides and --seeds to resume it, or run it without --resume to start again"
            )
        return cls(run_dir, data)

    @property
    def resumed(self) -> int:
        """How many invocations resumed the reproduction."""
        return sum(1 for inv in self.data["invocations"] if inv["resumed"])

    @property
    def mlflow(self) -> tuple[str, str] | None:
        """(tracking uri, the parent run's id) as recorded."""
        m = self.data.get("mlflow")
        return (m["tracking_uri"], m["parent_run_id"]) if m else None

    def begin(self, mlflow: tuple[str, str] | None, *, fresh: bool) -> None:
        """Start this invocation's entry and write the record. A fresh reproduction starts in an empty
        directory (`set_aside` moved any earlier one): no later --resume reads another's seeds as its own."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if mlflow is not None:
            self.data["mlflow"] = {"tracking_uri": mlflow[0], "parent_run_id": mlflow[1]}
        entry = {"started": now(), "resumed": not fresh, "ended": None, "wall_s": None, "status": "RUNNING"}
        self.data["invocations"].append(entry | {"seeds": {}})
        write_json(self.path, self.data)

    def end(self, status: str, wall_s: float) -> None:
        self.data["invocations"][-1] |= {"ended": now(), "wall_s": wall_s, "status": status}
        write_json(self.path, self.data)

    def seed_started(self, seed: int, how: How) -> None:
        self.data["invocations"][-1]["seeds"][str(seed)] = {"how": how, "wall_s": None, "returncode": None}
        write_json(self.path, self.data)

    def seed_ended(self, seed: int, wall_s: float, returncode: int | None) -> None:
        self.data["invocations"][-1]["seeds"][str(seed)] |= {"wall_s": wall_s, "returncode": returncode}
        write_json(self.path, self.data)

    def how(self, seed: int) -> How:
        """What --resume does with a seed: reuse it (its marker and metrics/eval.json are there), continue it
        (models/last.ckpt, from this reproduction's own run of it), or run it from the start."""
        seed_dir = self.run_dir / f"seed_{seed}"
        if read_marker(seed_dir, seed) is not None and (seed_dir / "metrics" / "eval.json").is_file():
            return "reuse"
        ran = any(str(seed) in inv["seeds"] for inv in self.data["invocations"])
        return "continue" if ran and (seed_dir / "models" / "last.ckpt").is_file() else "start"

    def seed_wall(self, seed: int, this_s: float, how: How) -> SeedWall:
        """A seed's wall time: a continued one's, this invocation's and the earlier ones' back to the one that
        started it, when each was recorded, else this invocation's alone, labelled so."""
        total, n = this_s, 1
        if how != "continue":
            return SeedWall(this_s, 1)
        for inv in reversed(self.data["invocations"][:-1]):
            entry = inv["seeds"].get(str(seed))
            if entry is None or entry["how"] == "reuse":
                continue
            if entry["wall_s"] is None:
                break
            total, n = total + entry["wall_s"], n + 1
            if entry["how"] == "start":
                return SeedWall(total, n, f"{n} invocations" if n > 1 else "")
        return SeedWall(this_s, 1, "this invocation only: an earlier one's time was not recorded")

    def total_wall(self, this_s: float) -> tuple[float, str]:
        """Every invocation's wall time and what it covers; this one's alone when an earlier one's end was
        not seen."""
        earlier = [inv["wall_s"] for inv in self.data["invocations"][:-1]]
        if not earlier:
            return this_s, ""
        if any(w is None for w in earlier):
            return this_s, "this invocation only: an earlier one's time was not recorded"
        return this_s + sum(earlier), f"over {len(earlier) + 1} invocations"

    def resumption(self, this_s: float) -> Resumption:
        seeds = self.data["invocations"][-1]["seeds"]
        reused = tuple(sorted(int(s) for s, e in seeds.items() if e["how"] == "reuse"))
        continued = tuple(sorted(int(s) for s, e in seeds.items() if e["how"] == "continue"))
        return Resumption(self.resumed, reused, continued, self.total_wall(this_s)[1])


@contextlib.contextmanager
def held(run_dir: Path) -> Iterator[int]:
    """This invocation's exclusive hold on the reproduction in `run_dir`: an flock on its sibling .NAME.lock
    (a file never deleted, so that it is one file whatever is moved). UserError when another invocation
    holds it: a second `vaerepro reproduce` of a running one read its RUNNING record as stopped, and its
    --resume ran a second process into the same seed directory. Yields the lock's file descriptor, which
    each seed's process inherits (reproduce._run_seed), so the hold lasts while a seed runs even if this
    process is killed (-9), until the seed has stopped at its epoch end (signals.stop_with_parent): the
    lock goes with the last process holding the descriptor."""
    lock = run_dir.with_name(f".{run_dir.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    if (fd := try_lock(lock)) is None:
        raise UserError(
            f"{run_dir}: another `vaerepro reproduce` (or a seed it started) is running this reproduction "
            f"(it holds {lock}); wait for it to end, or stop it (its seeds stop at their epoch end on "
            "SIGTERM) and resume with --resume"
        )
    try:
        yield fd
    finally:
        os.close(fd)


def set_aside(run_dir: Path, card: Sequence[Path], *, fresh: bool, out: Path | None) -> Path | None:
    """Before a new reproduction in `run_dir`, keep the earlier one there: a stopped one (its last invocation
    did not finish) is refused unless `fresh`, with a UserError naming the command that resumes it; any
    earlier one is then moved whole to run_dir's sibling NAME.<when it started>, with its card (`card`: the
    card's files and figure folder, moved to card/ there, the seeds' directories it names rewritten to
    their new place), so that no card describes the new reproduction's seeds as the earlier one's, nor the
    old card stands in reports/ until the new one writes its own. Returns where it went, or None when there
    was nothing to keep. Nothing is deleted: hours of seeds are not lost to a command run again by
    mistake."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    try:
        record = json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        record = None  # a directory without a readable record (an older version's): kept all the same
    record = record if isinstance(record, dict) else None
    invocations = (record or {}).get("invocations") or [{}]
    if record is not None and invocations[-1].get("status") != "FINISHED" and not fresh:
        done = len(list(run_dir.glob(f"seed_*/{MARKER}")))
        seeds = record.get("seeds")
        again = resume_command(
            str(record.get("preset")),
            record.get("user_overrides") or (),
            seeds,
            bool(record.get("smoke")),
            out,
        )
        raise UserError(
            f"{run_dir} holds a stopped reproduction ({done} of {seeds} seeds finished): go on with "
            f"`{again}`, or start again with --fresh (the stopped one is then kept beside the new one)"
        )
    started = (record or {}).get("started") or datetime.fromtimestamp(
        run_dir.stat().st_mtime, timezone.utc
    ).isoformat(timespec="seconds")
    stamp = started.replace(":", "").replace("+0000", "Z")  # 2026-11-30T091502Z: a file name everywhere
    dest, n = run_dir.with_name(f"{run_dir.name}.{stamp}"), 1
    while dest.exists():
        dest, n = run_dir.with_name(f"{run_dir.name}.{stamp}.{n}"), n + 1
    os.replace(run_dir, dest)
    for path in card:
        if path.is_dir():
            shutil.move(path, dest / "card" / path.name)
        elif path.is_file():
            (dest / "card").mkdir(exist_ok=True)
            moved = Path(shutil.move(path, dest / "card" / path.name))
            if moved.suffix in (".md", ".html"):
                # the card names each seed's directory: now under dest (run_dir's holds the new run's seeds)
                # whole or not at all: the moved card is the earlier reproduction's only one, and a kill or a
                # full disk while it is rewritten in place would leave it cut short
                text = moved.read_text(encoding="utf-8")
                write_whole(moved, text.replace(f"{run_dir}{os.sep}", f"{dest}{os.sep}"))
    return dest


def write_marker(seed_dir: Path, seed: int, wall: SeedWall, run_id: str | None) -> None:
    data = {"seed": seed, "wall_s": wall.seconds, "invocations": wall.invocations, "wall_note": wall.note}
    write_json(seed_dir / MARKER, data | {"mlflow_run_id": run_id, "finished": now()})


def read_marker(seed_dir: Path, seed: int) -> dict[str, Any] | None:
    """The seed's marker, or None when there is none (or it is not this seed's, or unreadable: the seed is
    then run again, which loses nothing)."""
    try:
        data = json.loads((seed_dir / MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("seed") == seed else None


def remove_marker(seed_dir: Path) -> None:
    (seed_dir / MARKER).unlink(missing_ok=True)
