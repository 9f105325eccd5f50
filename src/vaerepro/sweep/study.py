"""The Optuna study of a sweep: samplers, pruners, its storage and lock, its best trial, and the names
the sweep process and its trial processes share (environment variables, exit codes, trial attributes).

The study lives in persistent storage (a journal file by default) and is resumed by running the same
command again; several sweep processes may share one study, serialised by `files.locked` on its lock file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vaerepro.compare import ESTIMATE_METRICS, converged, space_label
from vaerepro.config import ConfigError
from vaerepro.sweep.space import (
    PATH_MD5,
    SPACE_FREE_OBJECTIVES,
    SearchSpace,
    grid_values,
    override_value,
)

log = logging.getLogger(__name__)

# What the sweeper tells a trial process (tracking.run_tags and `pruning.trial_callbacks` read them).
ENV_STUDY = "VAEREPRO_STUDY"
ENV_TRIAL = "VAEREPRO_TRIAL"  # the trial number
ENV_PARENT_RUN_ID = "VAEREPRO_PARENT_RUN_ID"  # the study's MLflow run
ENV_STORAGE = "VAEREPRO_OPTUNA_STORAGE"  # journal file path or RDB URL
ENV_PRUNER = "VAEREPRO_OPTUNA_PRUNER"  # the pruner's settings, JSON

PRUNED_EXIT_CODE = 3  # a trial process stopped by the pruner (1: an error, 2: a configuration error)

# A trial system attribute (bookkeeping, not shown as a user attribute): the trial was failed because its
# sweep process was interrupted or died, and does not count towards n_trials (its configuration is queued
# again). The scheduler's own attributes (host, pid, heartbeat) are in runner.py.
INTERRUPTED = "vaerepro:interrupted"

# A study user attribute: a random id given to the study when vaerepro first opens it. Trial directories
# carry it (runner.TRIAL_MARK), so that a study of the same name created again later is another owner.
STUDY_UID = "study_uid"
# A study user attribute: the (data space, improper) groups its trials were composed in, as [space, improper]
# lists; a density objective or a pruner never lets a study hold two (refuse_other_spaces).
DATA_SPACES = "data_spaces"
# A study user attribute: what its trials measure, {key: value} of space.measurement_keys (the data set, its
# splits, K) from the config of the sweep that created it. A resume measuring otherwise is refused
# (check_study): its trials' values would be ranked against values of another test set or K. Studies
# created before it was recorded get the settings of their next sweep (open_study), unchecked once.
MEASUREMENT = "measurement"


# ---------------------------------------------------------------------------------- samplers, pruners


SAMPLERS = ("tpe", "random", "grid", "cmaes")  # make_sampler's, the first the default
PRUNERS = ("none", "median", "hyperband")  # make_pruner's, the first the default


def _choices(names: tuple[str, ...]) -> str:
    """('a', 'b', 'c') -> 'a, b or c'."""
    return ", ".join(names[:-1]) + f" or {names[-1]}"


def check_sampler_and_pruner(sampler: Any, pruner: Any) -> None:
    """A ConfigError, before the sweep writes anything, for a sampler or pruner that make_sampler /
    make_pruner could not build: a plain name (`hydra.sweeper.sampler=random`, where the config group
    `hydra/sweeper/sampler=random` was meant) or a name that is none of theirs."""
    for key, conf, names in (("sampler", sampler, SAMPLERS), ("pruner", pruner, PRUNERS)):
        choices = _choices(names)
        if not isinstance(conf, Mapping):
            raise ConfigError(
                f"hydra.sweeper.{key}={conf!r}: the {key} is a config group, chosen with "
                f"hydra/sweeper/{key}=NAME ({choices}), its settings given as hydra.sweeper.{key}.KEY=VALUE"
            )
        if conf.get("name", names[0]) not in names:
            raise ConfigError(f"hydra/sweeper/{key}={conf.get('name')!r}: {choices}")


def make_sampler(
    conf: Mapping[str, Any],
    space: SearchSpace,
    *,
    multivariate: bool = False,
    constant_liar: bool = False,
    seed_offset: int = 0,
):
    """The sampler named by `hydra/sweeper/sampler` (tpe, random, grid, cmaes); its seed plus seed_offset."""
    import optuna

    name, seed = conf.get("name", SAMPLERS[0]), conf.get("seed")
    seed = None if seed is None else int(seed) + seed_offset
    if name != "tpe" and (multivariate or constant_liar):
        log.warning("multivariate / constant_liar apply to the TPE sampler only; ignored for %s", name)
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=int(conf.get("n_startup_trials", 10)),
            multivariate=multivariate,
            constant_liar=constant_liar,
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":

        class AskTellGridSampler(optuna.samplers.GridSampler):
            # GridSampler.after_trial calls study.stop(), which works only inside study.optimize; Sweep
            # stops at the end of the grid itself (Sweep._counts)
            def after_trial(self, study, trial, state, values) -> None:
                pass

        return AskTellGridSampler(grid_values(space), seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=int(conf.get("n_startup_trials", 1)))
    raise ConfigError(f"hydra/sweeper/sampler={name!r}: {_choices(SAMPLERS)}")


def make_pruner(conf: Mapping[str, Any] | None):
    """The pruner named by `hydra/sweeper/pruner` (none, median, hyperband), with its settings."""
    import optuna

    conf = dict(conf or {"name": PRUNERS[0]})
    name = conf.pop("name", PRUNERS[0])
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(**conf)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(**conf)
    raise ConfigError(f"hydra/sweeper/pruner={name!r}: {_choices(PRUNERS)}")


# ------------------------------------------------------------------------------ storage, lock, study


def resolve_storage(storage: str | None, study_name: str, root: Path) -> str:
    """An absolute storage spec: an RDB URL, or the path of a journal file (the default, under the project).

    Absolute because trial processes (and DVC's temporary copies) may run from elsewhere.
    """
    if storage and "://" in storage:
        if storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
            return f"sqlite:///{(root / storage.removeprefix('sqlite:///')).resolve()}"
        return storage
    path = Path(storage) if storage else Path("optuna") / f"{study_name}.log"
    return str(path if path.is_absolute() else (root / path).resolve())


class NoStorage(ConfigError):
    """A storage that is not there: reading a study (the report, a sweep's checks) creates none."""


class NoStudy(ConfigError):
    """A storage that holds no study of the name asked for."""


SQLITE_MAGIC = b"SQLite format 3\x00"  # the first bytes of every SQLite database file
# The tables of another program in an SQLite file (MLflow's mlflow.db, say) are no Optuna storage: Optuna
# would add its own tables beside them. Every Optuna RDB has this one.
OPTUNA_TABLE = "studies"


def shown_storage(spec: str) -> str:
    """A storage spec as messages show it: an RDB URL without its password."""
    if "://" not in spec:
        return spec
    try:
        from sqlalchemy.engine import make_url

        return make_url(spec).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy reads: the spec itself is the best name for it
        return spec


def _sqlite_file(spec: str) -> Path | None:
    """The database file of an sqlite:/// URL; None for another RDB URL, an in-memory database or a path."""
    if not spec.startswith("sqlite:///"):
        return None
    rest = spec.removeprefix("sqlite:///").split("?", 1)[0]
    return None if rest in ("", ":memory:") else Path(rest)


def _first_bytes(path: Path, spec: str, n: int = 64) -> bytes | None:
    """The first `n` bytes of the file at `path`; None when there is none; ConfigError for a directory or
    a file that cannot be read."""
    if path.is_dir():
        raise ConfigError(f"{spec}: a directory, not an Optuna storage (a journal file, or an RDB URL)")
    try:
        with path.open("rb") as fh:
            return fh.read(n)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ConfigError(f"{spec}: cannot read it ({err.strerror or type(err).__name__})") from None


def _check_sqlite(path: Path, spec: str) -> bool:
    """Whether the SQLite file of `spec` exists; ConfigError when it is not an SQLite database, or one of
    another program (tables, none of them Optuna's). Reads only."""
    import sqlite3

    head = _first_bytes(path, spec)
    if head is None:
        return False
    if not head:  # an empty file: SQLite makes a database of it
        return True
    if not head.startswith(SQLITE_MAGIC):
        raise ConfigError(f"{spec}: {path} is not an SQLite database (it starts with {head[:16]!r})")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as err:
        raise ConfigError(f"{spec}: cannot read the SQLite database {path} ({err})") from None
    if tables and OPTUNA_TABLE not in tables:
        raise ConfigError(
            f"{spec}: {path} is an SQLite database of another program (tables {', '.join(sorted(tables)[:4])}"
            f"{', ...' if len(tables) > 4 else ''}), not an Optuna storage; give the study a file of its own"
        )
    return True


def _check_journal(path: Path) -> bool:
    """Whether the journal file `path` exists; ConfigError when it is not one (a directory, an SQLite
    database, any file whose first line is not a JSON record). Reads only."""
    spec = str(path)
    head = _first_bytes(path, spec)
    if head is None:
        return False
    if head.startswith(SQLITE_MAGIC):
        raise ConfigError(
            f"{spec}: an SQLite database, not an Optuna journal file; an Optuna database is given as a URL, "
            f"sqlite:///{spec} (an MLflow store is not one)"
        )
    if head and not head.lstrip().startswith(b"{"):  # a journal is one JSON object a line
        raise ConfigError(f"{spec}: not an Optuna journal file (it starts with {head[:16]!r})")
    return True


def _torn_tail(path: Path) -> tuple[int, int] | None:
    """(the journal's size, the size up to the end of its last whole record) when bytes follow its last
    newline, else None (no file, an empty one, or one that ends with a whole record)."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            if size == 0:
                return None
            fh.seek(size - 1)
            if fh.read(1) == b"\n":
                return None
            end = size
            while end > 0:  # back to the last newline, a block at a time
                start = max(0, end - 65536)
                fh.seek(start)
                at = fh.read(end - start).rfind(b"\n")
                if at >= 0:
                    return size, start + at + 1
                end = start
            return size, 0
    except OSError:
        return None  # open_storage says what is wrong with a file that cannot be read


def check_journal_whole(spec: str) -> None:
    """ConfigError, before a sweep writes to the journal file `spec`, when its last record is cut short (no
    newline after it: a sweep or trial process killed, or a disk that filled, while Optuna appended it).
    Optuna reads the study without those bytes, but appends the next record right after them: the two
    become one line that is not JSON, and from then on the journal does not read at all, every trial of the
    study with it. Checked again under Optuna's own lock, so that a record another process is appending at
    this moment is not taken for a torn one. Nothing for an RDB URL or a file that is not there; a file
    that is no journal is refused as open_storage refuses it."""
    if "://" in spec or not _check_journal(Path(spec)) or _torn_tail(Path(spec)) is None:
        return  # _check_journal first: a file that is no journal is refused as such
    from optuna.storages.journal import JournalFileSymlinkLock  # the lock JournalFileBackend appends under

    lock = JournalFileSymlinkLock(spec)
    lock.acquire()
    try:
        torn = _torn_tail(Path(spec))
    finally:
        lock.release()
    if torn is None:
        return
    size, whole = torn
    raise ConfigError(
        f"{spec}: its last record is cut short ({size - whole} bytes after the last whole record, without "
        "a newline: a process killed, or a disk that filled, while writing it); a sweep would append to it "
        f"and the journal would no longer read. Cut it off (`truncate -s {whole} {shlex.quote(spec)}`, "
        "after a copy if you like) and run the sweep again"
    )


def open_storage(spec: str, *, create: bool = True):
    """The Optuna storage of a resolved spec: an RDB URL, or a journal file.

    create: a sweep's storage, made where there is none (a journal file and its directory; an SQLite file
    and Optuna's tables). Not `create` (the report, a sweep's checks before it writes): nothing is created,
    and NoStorage when there is no journal or SQLite file. ConfigError, naming the storage, for one that is
    not an Optuna storage (a directory, a file that is no journal, another program's SQLite database, an RDB
    that cannot be reached or read), rather than Optuna's or the database driver's traceback.
    """
    import optuna

    if "://" in spec:
        sqlite = _sqlite_file(spec)
        if sqlite is not None and not _check_sqlite(sqlite, spec) and not create:
            raise NoStorage(f"{spec}: no such file")
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return optuna.storages.RDBStorage(spec, skip_table_creation=not create)
        # a server that cannot be reached, a bad URL, a missing driver, an unreadable or older schema
        except (SQLAlchemyError, optuna.exceptions.OptunaError, ImportError, RuntimeError) as err:
            raise ConfigError(
                f"{shown_storage(spec)}: cannot open it as an Optuna storage ({_one_line(err)})"
            ) from None
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = Path(spec)
    if not _check_journal(path):
        if not create:
            raise NoStorage(f"{spec}: no such file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"{spec}: cannot create it ({err.strerror or type(err).__name__})") from None
    try:
        return JournalStorage(JournalFileBackend(spec))
    except (OSError, ValueError) as err:  # a JSON record Optuna cannot read further down the file
        raise ConfigError(f"{spec}: not a readable Optuna journal file ({_one_line(err)})") from None


def check_creatable(spec: str) -> None:
    """ConfigError when a sweep could not create the storage `spec` where there is none: a journal file
    whose directory cannot be made (a file in the way), an SQLite file in a directory that does not exist
    (SQLite makes no directories). Creates nothing: the sweep's checks before it writes call it."""
    sqlite = _sqlite_file(spec)
    if "://" in spec and sqlite is None:
        return  # a database server: existing_study has opened it
    path = sqlite if sqlite is not None else Path(spec)
    if path.exists():
        return
    parent = path.parent
    if sqlite is not None and not parent.is_dir():
        raise ConfigError(f"{spec}: cannot create the database, no directory {parent}")
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{spec}: cannot create it, {parent} is a file, not a directory")


def _one_line(err: BaseException) -> str:
    """An exception as one short line: its type and its message's first line."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def load_existing(storage: str, study_name: str, *, create: bool = False):
    """The study `study_name` in `storage`, read without creating anything (unless `create`, for a database
    server where reading may make Optuna's tables as a sweep would). NoStorage when the storage is not there,
    NoStudy when it holds no such study, ConfigError when it is no Optuna storage (open_storage)."""
    import optuna

    store = open_storage(storage, create=create)
    try:
        return optuna.load_study(study_name=study_name, storage=store)
    except KeyError:
        names = [repr(n) for n in optuna.get_all_study_names(storage=store)]
        held = f"its studies: {', '.join(names)}" if names else "it holds no study"
        raise NoStudy(f"{shown_storage(storage)} holds no study {study_name!r} ({held})") from None


def open_study(
    study_name: str,
    storage: str,
    *,
    direction: str,
    objective: str,
    space: SearchSpace,
    sampler: Mapping[str, Any],
    pruner: Mapping[str, Any] | None,
    multivariate: bool = False,
    constant_liar: bool = False,
    data_spaces: Iterable[tuple[str, bool]] | None = None,
    measurement: Mapping[str, Any] | None = None,
):
    """(study, storage): the study created, or loaded to resume it, with the calling sweep process's sampler.

    Refuses (check_study) a study of another direction, objective or measurement (`measurement`: this
    sweep's space.measurement_settings), one whose parameters Optuna cannot take this search space's
    distributions for, and one whose trials are in other data spaces than `data_spaces` (this sweep's,
    space.data_spaces' keys) where the objective or the pruner cannot compare them (refuse_other_spaces).
    Keeps the objective, measurement, search space and data spaces in the study's user attributes, gives
    the study its STUDY_UID, and counts the sweep processes that opened it (sweep_processes). Call it under
    `files.locked`: several sweep processes may open one study at once.
    """
    import warnings

    import optuna

    check_journal_whole(storage)  # under the lock; Sweep.preflight checked it before anything was written
    store = open_storage(storage)
    try:  # loaded and checked first: create_study(load_if_exists=True) writes to a journal even to load
        study = optuna.load_study(study_name=study_name, storage=store)
    except KeyError:
        study = optuna.create_study(study_name=study_name, storage=store, direction=direction)
    else:
        check_study(
            study,
            storage,
            direction=direction,
            objective=objective,
            pruner=pruner,
            data_spaces=data_spaces,
            space=space,
            measurement=measurement,
        )
    attrs = study.user_attrs
    if measurement is not None and MEASUREMENT not in attrs:
        if study.get_trials(deepcopy=False):
            log.warning(
                "study %s was created before vaerepro recorded what its trials measure: its earlier trials "
                "are not checked; from now on a resume must measure with %s",
                study_name,
                ", ".join(f"{k}={override_value(v)}" for k, v in measurement.items()),
            )
        study.set_user_attr(MEASUREMENT, dict(measurement))
    held = study_spaces(study)
    adding = {(str(space), bool(improper)) for space, improper in data_spaces or ()}
    if sorted(held | adding) != sorted(held) or DATA_SPACES not in attrs:
        study.set_user_attr(DATA_SPACES, [list(g) for g in sorted(held | adding)])
    if STUDY_UID not in attrs:
        study.set_user_attr(STUDY_UID, uuid.uuid4().hex)
    if "objective" not in attrs:
        study.set_user_attr("objective", objective)
    # the objective's name where Optuna shows values (dashboard, trials_dataframe), not "Objective 0";
    # set_metric_names is still marked experimental in Optuna 4 and 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([objective])
    shown = {k: str(d) for k, d in space.distributions.items()}
    if attrs.get("search_space", shown) != shown:
        log.warning("study %s: the search space changed since its last sweep", study_name)
    study.set_user_attr("search_space", shown)
    # Every sweep process of the study draws from its own seed (seed + k for the k-th): a resumed or
    # second process with the same seed would otherwise propose the same points again.
    k = int(attrs.get("sweep_processes", 0))
    study.set_user_attr("sweep_processes", k + 1)
    study.sampler = make_sampler(
        sampler, space, multivariate=multivariate, constant_liar=constant_liar, seed_offset=k
    )
    study.pruner = make_pruner(pruner)
    return study, store


def check_study(
    study,
    storage: str,
    *,
    direction: str,
    objective: str,
    pruner: Mapping[str, Any] | None,
    data_spaces: Iterable[tuple[str, bool]] | None,
    space: SearchSpace | None = None,
    measurement: Mapping[str, Any] | None = None,
) -> None:
    """Refuse (ConfigError) to add this sweep's trials to an existing `study`: one of another direction or
    objective; one that measured its trials otherwise (refuse_other_measurement); one whose parameters
    Optuna cannot take `space`'s distributions for (refuse_incompatible_space); one whose trials are in
    other data spaces where the objective or the pruner cannot compare them (refuse_other_spaces). Reads
    only: the sweeper calls it before anything is written (Sweep.preflight) and open_study again under the
    lock. `storage` is for the messages, which show a URL without its password."""
    name, storage = study.study_name, shown_storage(storage)
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"study {name!r} in {storage} is a {study.direction.name.lower()} study; "
            f"direction={direction} needs another hydra.sweeper.study_name"
        )
    held_objective = study.user_attrs.get("objective", objective)
    if held_objective != objective:
        raise ConfigError(
            f"study {name!r} in {storage} optimises {held_objective}, not "
            f"{objective}: use another hydra.sweeper.study_name (or the same objective)"
        )
    if measurement is not None:
        refuse_other_measurement(study, storage, measurement)
    if space is not None:
        refuse_incompatible_space(study, storage, space)
    adding = {(str(s), bool(improper)) for s, improper in data_spaces or ()}
    refuse_other_spaces(
        name, storage, objective, (pruner or {}).get("name", "none"), study_spaces(study), adding
    )


def refuse_other_measurement(study, storage: str, measurement: Mapping[str, Any]) -> None:
    """Refuse to add trials measured with other settings than the study's MEASUREMENT (another data set,
    split or K): the same refusal as a search space over those keys (space.refuse_swept_measurement), for
    keys given as fixed overrides that differ between the sweeps of one study. A study without the record
    (created before it existed) is not checked here: open_study records this sweep's."""
    held = study.user_attrs.get(MEASUREMENT)
    if not isinstance(held, dict):
        return
    # keys known to both: a key recorded later is not held against a study that predates it
    differ = [k for k in measurement if k in held and held[k] != measurement[k]]
    if not differ:
        return
    if PATH_MD5 in differ and "data.path" not in differ:  # the same file, other bytes: no override mends it
        raise ConfigError(
            f"study {study.study_name!r} in {storage} measured its trials on {measurement['data.path']} with "
            f"md5 {held[PATH_MD5]}; that file now has md5 {measurement[PATH_MD5]}, rewritten since, so its "
            "test split may hold other images and its trials could not be ranked with the study's: restore "
            "the file the study read, or use another hydra.sweeper.study_name"
        )
    if "data.path" in differ:  # another file: its md5 differs too, and is no override to resume with
        differ = [k for k in differ if k != PATH_MD5]
    was = ", ".join(f"{k}={override_value(held[k])}" for k in differ)
    now = ", ".join(f"{k}={override_value(measurement[k])}" for k in differ)
    raise ConfigError(
        f"study {study.study_name!r} in {storage} measured its trials with {was}; this sweep has {now}, "
        "another data set, test split or number of importance samples K, so its trials could not be ranked "
        f"with the study's: resume with {was}, or use another hydra.sweeper.study_name"
    )


def describe_distribution(d) -> str:
    """An Optuna distribution as the sweep syntax would write it: choice(2, 3), range(2, 10), ..."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(d, CategoricalDistribution):
        return f"choice({', '.join(override_value(c) for c in d.choices)})"
    kind = "integers" if type(d).__name__ == "IntDistribution" else "floats"
    step = "" if d.step in (None, 1) else f" step {d.step:g}"
    return f"{kind} in [{d.low:g}, {d.high:g}]{step}{' on a log scale' if d.log else ''}"


def refuse_incompatible_space(study, storage: str, space: SearchSpace) -> None:
    """Refuse a search space whose distribution of a key the study's trials already hold is one Optuna
    cannot store beside theirs: other choices of a categorical parameter, another kind (choice against
    range or interval, integers against floats) or scale (log or not). Optuna refuses it only once a trial
    has been asked for (a ValueError after the trial exists); the ranges of numeric parameters may change.
    Compared the way Optuna's storages compare them, with the first trial holding the key."""
    from optuna.distributions import CategoricalDistribution

    held: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        for key, d in t.distributions.items():
            held.setdefault(key, d)
    for key, new in space.distributions.items():
        old = held.get(key)
        if old is None:
            continue
        if type(old) is not type(new) or (
            not isinstance(old, CategoricalDistribution) and bool(old.log) != bool(new.log)
        ):
            what = "another kind or scale of values"
        elif isinstance(old, CategoricalDistribution) and old != new:
            what = "other choices"
        else:
            continue
        raise ConfigError(
            f"study {study.study_name!r} in {storage} sweeps {key} over {describe_distribution(old)}; this "
            f"sweep has {describe_distribution(new)}, {what}, which Optuna cannot add to a study: sweep "
            f"{key} over {describe_distribution(old)}, or use another hydra.sweeper.study_name for the new "
            "search space"
        )


def study_spaces(study) -> set[tuple[str, bool]]:
    """The (data space, improper) groups a study holds: those recorded (DATA_SPACES) and those of its
    trials (their data_space and improper user attributes, from each trial's params.yaml)."""
    groups = {(str(space), bool(improper)) for space, improper in study.user_attrs.get(DATA_SPACES, [])}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("data_space") is not None:
            groups.add((str(t.user_attrs["data_space"]), bool(t.user_attrs.get("improper", False))))
    return groups


def refuse_other_spaces(
    study_name: str,
    storage: str,
    objective: str,
    pruner: str,
    held: set[tuple[str, bool]],
    adding: set[tuple[str, bool]],
) -> None:
    """Refuse to add trials of one (data space, improper) group to a study holding another, when the study's
    objective is in its data space's units or a pruner compares validation ELBOs across trials: resuming
    `likelihood=bernoulli` with `likelihood=gaussian` would rank a pmf against a density."""
    if len(held | adding) <= 1 or (objective in SPACE_FREE_OBJECTIVES and pruner == "none"):
        return

    def listing(groups):
        return "; ".join(space_label(s, imp) for s, imp in sorted(groups)) or "none"

    why = (
        f"its objective {objective} has different units there"
        if objective not in SPACE_FREE_OBJECTIVES
        else f"hydra/sweeper/pruner={pruner} compares validation ELBOs, in different units there"
    )
    raise ConfigError(
        f"study {study_name!r} in {storage} holds trials of {listing(held)}; this sweep's trials would be "
        f"in {listing(adding - held) if adding - held else listing(adding)}, and {why}: "
        "use another hydra.sweeper.study_name for another data space"
    )


def existing_study(storage: str, study_name: str):
    """The study `study_name` in `storage`, or None when there is no such study (or storage yet). Creates
    nothing for a journal or SQLite file: the sweep's checks before it writes (Sweep.preflight) call it. A
    database server's storage is opened as a sweep opens it (Optuna's tables created), as one without them
    cannot be read. ConfigError for a storage that is no Optuna storage (open_storage)."""
    server = "://" in storage and _sqlite_file(storage) is None
    try:
        return load_existing(storage, study_name, create=server)
    except (NoStorage, NoStudy):
        return None


def count_trials(study) -> dict[str, int]:
    """Trials by what they mean for the sweep's budget: used (counting towards n_trials: all but queued and
    interrupted ones), waiting (queued), failed (used and FAIL), grid_started (grid points drawn)."""
    from optuna.trial import TrialState

    c = {"used": 0, "waiting": 0, "failed": 0}
    grid_ids = set()  # as the grid sampler sees them: an interrupted point comes back as a queued trial
    for t in study.get_trials(deepcopy=False):
        if "grid_id" in t.system_attrs:
            grid_ids.add(t.system_attrs["grid_id"])
        if t.state == TrialState.WAITING:
            c["waiting"] += 1
        elif not t.system_attrs.get(INTERRUPTED):
            c["used"] += 1
            c["failed"] += t.state == TrialState.FAIL
    c["grid_started"] = len(grid_ids)
    return c


# ---------------------------------------------------------------------------------------- the results


def trial_converged(trial) -> bool | None:
    """The convergence verdict of a trial's log p(x) estimate: its user attribute `converged` (set when it
    finished), else its metrics/eval.json; None when unknown."""
    if isinstance(trial.user_attrs.get("converged"), bool):
        return trial.user_attrs["converged"]
    try:
        ev = json.loads((Path(trial.user_attrs["trial_dir"]) / "metrics" / "eval.json").read_text())
    except (KeyError, TypeError, OSError, ValueError):
        return None
    return converged(ev) if isinstance(ev, dict) else None


def unconverged(trial, objective: str) -> bool:
    """Whether the trial's objective comes from a log p(x) estimate that has not converged."""
    return objective in ESTIMATE_METRICS and trial_converged(trial) is False


def top_trial(study):
    """The COMPLETE trial with the best value in the study's direction, converged or not, or None."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    pick = max if study.direction.name == "MAXIMIZE" else min
    return pick(done, key=lambda t: t.value)


def best_trial(study):
    """The trial that wins the study, or None: the best COMPLETE trial in the study's direction, skipping
    trials whose objective is a log p(x) estimate that has not converged (it may be far from log p(x)).

    When the top trial is skipped, the winner is the best converged (or unchecked) trial of its data space.
    The one selector of the results file, the study's MLflow run and the sweep report."""
    from optuna.trial import TrialState

    top = top_trial(study)
    objective = study.user_attrs.get("objective", "")
    if top is None or not unconverged(top, objective):
        return top

    def space(t):
        return t.user_attrs.get("data_space"), bool(t.user_attrs.get("improper", False))

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    others = [t for t in done if space(t) == space(top) and not unconverged(t, objective)]
    if not others:
        return None
    pick = max if study.direction.name == "MAXIMIZE" else min
    return pick(others, key=lambda t: t.value)


def best_command(trial) -> str:
    """The trial's configuration as a ready-to-run command line."""
    overrides = trial.user_attrs.get("overrides") or [
        f"{k}={override_value(v)}" for k, v in trial.params.items()
    ]
    return shlex.join(["vaerepro", "run", *overrides])


def trial_run_ids(study) -> set[str]:
    """The MLflow run ids of the study's trials (the user attribute mlflow_run_id the sweep sets)."""
    return {t.user_attrs.get("mlflow_run_id") for t in study.get_trials(deepcopy=False)} - {None}
