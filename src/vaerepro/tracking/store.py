"""The MLflow store: where it is (tracking uri), creating it and its experiment safely, reading it without
creating it, and the link to its runs in the MLflow UI."""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from vaerepro.compare import UNRECORDED, Measurement
from vaerepro.config import ConfigError, TrackingConfig, find_project_root
from vaerepro.tracking import ui

log = logging.getLogger(__name__)


def tracking_uri(tcfg: TrackingConfig, root: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI wins; then tracking.uri; then sqlite at the project root (absolute path).

    MLflow 3 refuses a plain ./mlruns file store, and a relative sqlite path would change meaning with the
    working directory (DVC's queued experiments run in temporary copies), hence the absolute path. A
    relative sqlite path given (`sqlite:///mine.db`, as MLflow's tutorials write it) is read against the
    project root too: read against the working directory, it would name a store in a queued DVC
    experiment's temporary copy, which DVC deletes with the runs in it, and another, empty store in each
    subdirectory a command starts in.
    """
    given = os.environ.get("MLFLOW_TRACKING_URI") or tcfg.uri
    if given and not given.startswith("sqlite:"):
        return given
    root = store_root((root or find_project_root()).resolve())
    if not given:
        return f"sqlite:///{root / 'mlflow.db'}"
    from sqlalchemy.engine import make_url

    url = make_url(given)
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:") or Path(database).is_absolute():
        return given
    return url.set(database=str(root / database)).render_as_string(hide_password=False)


def tracking_uri_source(tcfg: TrackingConfig) -> str | None:
    """Which setting `tracking_uri` took its value from, for messages; None for the default store."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "MLFLOW_TRACKING_URI"
    if tcfg.uri:
        return "tracking.uri"
    return None


def store_root(root: Path) -> Path:
    """The repository that owns the MLflow store.

    `dvc exp run --queue` / `--temp` run each experiment in a temporary copy under
    <repo>/.dvc/tmp/exps/; their runs belong in <repo>/mlflow.db, not in the copy that DVC deletes.
    """
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def sqlite_store_path(uri: str) -> Path | None:
    """The database file of a sqlite tracking uri (absolute); None for other stores and in-memory sqlite."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).resolve()


def artifact_location(uri: str) -> str | None:
    """Artifacts beside a local sqlite store; a tracking server chooses its own."""
    db = sqlite_store_path(uri)
    if db is None:
        return None
    return (db.parent / "mlartifacts").as_uri()


# How long a probe of a tracking server may take to connect, and then to answer.
SERVER_PROBE_TIMEOUT_S = 5.0


def check_tracking_server(uri: str, key: str | None) -> None:
    """Fail at once, naming the setting, when no MLflow server answers at an http(s) tracking uri.

    MLflow's own client retries a refused connection for minutes before it says anything, and its message
    does not say which setting holds the address. MLflow servers answer GET <uri>/health without
    authentication. A 4xx answer is left to MLflow (a proxy or authentication in the way is its message to
    give); a 5xx is what MLflow's client would also retry for minutes.
    """
    import requests

    label = f"{key or 'tracking uri'}={uri}"
    verify: bool | str = True
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("true", "1"):
        verify = False
    elif cert := os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        verify = cert
    try:
        resp = requests.get(
            f"{uri.rstrip('/')}/health",
            timeout=(SERVER_PROBE_TIMEOUT_S, SERVER_PROBE_TIMEOUT_S),
            verify=verify,
            allow_redirects=True,
        )
    except requests.exceptions.SSLError as err:
        raise ConfigError(
            f"{label}: TLS handshake with the tracking server failed ({_root_cause(err)})"
        ) from None
    except requests.exceptions.Timeout:
        raise ConfigError(
            f"{label}: no MLflow tracking server answers (no answer within {SERVER_PROBE_TIMEOUT_S:g} s)"
        ) from None
    except requests.exceptions.RequestException as err:
        raise ConfigError(f"{label}: no MLflow tracking server answers ({_root_cause(err)})") from None
    if resp.status_code >= 500:
        raise ConfigError(f"{label}: the tracking server answers HTTP {resp.status_code} at /health")


def _root_cause(err: BaseException) -> str:
    """A short reason for a failed connection: 'connection refused', 'host name not found', or the innermost
    error's text."""
    import socket

    seen: set[int] = set()
    stack: list[BaseException] = [err]
    innermost = err
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        innermost = e
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return "host name not found"
        # requests and urllib3 keep the cause in args[0] / .reason as well as in the exception chain
        linked = (e.__cause__, e.__context__, getattr(e, "reason", None), *e.args)
        stack += [x for x in linked if isinstance(x, BaseException)]
    text = str(innermost)
    if "Connection refused" in text:
        return "connection refused"
    return " ".join(text.split())[:200]


def not_a_store(db: Path, problem: str) -> ConfigError:
    return ConfigError(
        f"{db}: not a readable MLflow sqlite store ({problem}); move it aside or set tracking.uri"
    )


def check_sqlite_store(db: Path) -> None:
    """Refuse a file MLflow cannot use as its store, without writing to it.

    An absent or empty file is a new store (MLflow creates the tables). Anything else must be a readable
    sqlite database that is empty or has MLflow's tables: MLflow would otherwise add its tables to another
    program's database, or fail with a traceback that does not name the file. Opened read-only, so a
    corrupt file is left exactly as it was.
    """
    if not db.exists() or (db.is_file() and db.stat().st_size == 0):
        return
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=60)
        try:
            tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            raise ConfigError(f"{db}: the MLflow store stayed locked by another process ({err})") from None
        raise not_a_store(db, str(err)) from None
    except sqlite3.Error as err:
        raise not_a_store(db, str(err)) from None
    if tables and not tables & {"experiments", "alembic_version"}:
        raise not_a_store(db, f"a sqlite database with no MLflow tables: {', '.join(sorted(tables)[:5])}")


def new_store(db: Path) -> bool:
    """Whether the sqlite file `db` (check_sqlite_store has passed it) is no store yet: absent, empty, or
    one whose creation was stopped part way, as a vaerepro before `_create_store` could leave it: MLflow's
    tables, none of them with a row. MLflow adds the Default experiment as the last step of a creation, so
    a finished store holds at least that; such a file holds nothing, and MLflow refused it on every later
    run with a traceback ("table _alembic_tmp_... already exists"). `ensure_experiment` makes the store
    again in its place; readers find no store."""
    if not db.is_file() or db.stat().st_size == 0:
        return True
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=60)
        try:
            tables = [n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            if "experiments" in tables and con.execute("SELECT 1 FROM experiments LIMIT 1").fetchone():
                return False  # a finished store (the one query it costs)
            return all(
                con.execute(f'SELECT 1 FROM "{name}" LIMIT 1').fetchone() is None
                for name in tables
                if name != "alembic_version" and not name.startswith("sqlite_")
            )
        finally:
            con.close()
    except sqlite3.Error:
        return False  # MLflow's own open then says what it is


def causes(err: BaseException) -> Iterator[BaseException]:
    """`err` and what lies behind it: each exception of its __cause__ / __context__ chain, and the database
    driver's error that SQLAlchemy keeps in `.orig`; each once."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        if isinstance(orig := getattr(e, "orig", None), BaseException):
            yield orig
        e = e.__cause__ or e.__context__


def sqlite_corruption(err: BaseException) -> sqlite3.DatabaseError | None:
    """The sqlite error saying the file is damaged ('malformed', 'not a database') behind an MLflow or
    SQLAlchemy error, if that is what it is (a locked database or a constraint is not damage)."""
    for x in causes(err):
        if isinstance(x, sqlite3.DatabaseError) and not isinstance(
            x, (sqlite3.OperationalError, sqlite3.IntegrityError)
        ):
            return x
    return None


# How long a process waits for another to create or migrate the store before it gives up.
STORE_LOCK_TIMEOUT_S = 600.0


def _get_or_create_experiment(client, name: str, artifact_location: str | None) -> str:
    """The experiment's id, created if missing. Two processes may both find it missing and both create it:
    the loser's create fails with RESOURCE_ALREADY_EXISTS, and it reads the winner's."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def ensure_views(client, exp_id: str, measurements: Iterable[Measurement] = ()) -> None:
    """Give the experiment the saved views that `ui_url` opens (ui.experiment_tags): the runs view and one
    parallel-coordinates view per measurement, each set once. Remove the views vaerepro no longer offers
    (ui.withdrawn): a link printed earlier to one of them then gets the UI's "share key does not exist".
    Two processes may set or remove one tag at once (a sweep's trials evaluated together, each adding its
    measurement's view): the tag is the same whoever sets it, so one that another process set (or removed)
    meanwhile is taken as done."""
    from mlflow.exceptions import MlflowException

    have = client.get_experiment(exp_id).tags
    for key in [key for key, value in have.items() if ui.withdrawn(key, value)]:
        try:
            client.delete_experiment_tag(exp_id, key)
        except MlflowException:
            if key in client.get_experiment(exp_id).tags:
                raise
    for key, value in ui.experiment_tags(measurements=tuple(measurements)).items():
        if have.get(key) == value:
            continue
        try:
            client.set_experiment_tag(exp_id, key, value)
        except MlflowException:
            if client.get_experiment(exp_id).tags.get(key) != value:
                raise


def measurements(client, exp_id: str) -> list[Measurement]:
    """The measurements (compare.measurement: data source, test set, K) of the experiment's runs that a
    parallel-coordinates view can draw (ui.COMPARABLE_FILTER) and that recorded all three, sorted by source,
    test set and K."""
    found = client.search_runs([exp_id], ui.COMPARABLE_FILTER, max_results=50000)  # MLflow's most per call
    seen = {tuple(r.data.tags.get(tag) or UNRECORDED for tag in ui.MEASUREMENT_FILTER_TAGS) for r in found}
    recorded = [m for m in seen if ui.filterable(m)]
    return sorted(recorded, key=lambda m: (m[0], m[1], int(m[2])))


# Where `mlflow ui` (make mlflow-ui, vaerepro ui) serves a local store.
LOCAL_UI = "http://127.0.0.1:5000"


def is_server(uri: str) -> bool:
    """Whether the tracking uri is an MLflow tracking server (http or https) rather than a database."""
    return uri.startswith(("http://", "https://"))


def ui_url(
    uri: str, exp_id: str, mode: str = "TABLE", local: str = LOCAL_UI, measurement: Measurement | None = None
) -> str:
    """The link to the experiment's runs, set up for comparing them (ui.runs_url): on the tracking
    server for an http(s) store, else at `local`, where `vaerepro ui` serves the local store."""
    return ui.runs_url(uri if is_server(uri) else local, exp_id, mode=mode, measurement=measurement)


def parallel_links(uri: str, exp_id: str, local: str = LOCAL_UI) -> list[tuple[Measurement, str]]:
    """(measurement, link) for the parallel coordinates of each measurement the experiment's comparable runs
    hold (measurements), each view set on the experiment first (ensure_views): one log p(x) axis per K and
    test set, never two Ks on one."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = measurements(client, exp_id)
    ensure_views(client, exp_id, found)
    return [(m, ui_url(uri, exp_id, "PARALLEL", local, m)) for m in found]


def ensure_experiment(tcfg: TrackingConfig, root: Path | None = None) -> tuple[str, str]:
    """Create the project's experiment if needed, with the saved view of its runs that `ui_url` opens;
    return (tracking uri, experiment id).

    A sqlite store is created (whole: `_create_store`) and given the experiment by one process at a time,
    under a lock file beside the database (<db>.lock): MLflow's own creation of a new sqlite store is not
    safe when several runs start together, and a store left half-migrated fails every later run. Once this
    has run in a process, MLflow keeps the opened store, so the run's later MLflow calls do not migrate
    again.
    """
    import mlflow
    from filelock import FileLock, Timeout
    from mlflow import MlflowClient

    uri = tracking_uri(tcfg, root)
    name = tcfg.experiment
    source = tracking_uri_source(tcfg)  # before set_tracking_uri, which sets MLFLOW_TRACKING_URI
    if is_server(uri):
        check_tracking_server(uri, source)
    mlflow.set_tracking_uri(uri)
    db = sqlite_store_path(uri)
    if db is None:
        client = _open_client(uri, source)
        exp_id = _get_or_create_experiment(client, name, artifact_location(uri))
        ensure_views(client, exp_id)
        return uri, exp_id

    lock_file = Path(f"{db}.lock")
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_file, timeout=STORE_LOCK_TIMEOUT_S)
        lock.acquire()
    except Timeout:
        raise ConfigError(
            f"{lock_file}: another process held the MLflow store's lock for {STORE_LOCK_TIMEOUT_S:g} s"
        ) from None
    except OSError as err:
        raise ConfigError(f"{lock_file}: cannot lock the MLflow store ({err.strerror or err})") from None
    try:
        check_sqlite_store(db)
        try:
            if new_store(db):
                if db.is_file() and db.stat().st_size > 0:
                    log.warning(
                        "%s: an MLflow store whose creation was stopped part way (no row in any "
                        "table): made again",
                        db,
                    )
                _create_store(db)
            client = MlflowClient(uri)
            exp_id = _get_or_create_experiment(client, name, artifact_location(uri))
            ensure_views(client, exp_id)
        except Exception as err:
            if (damage := sqlite_corruption(err)) is not None:
                raise not_a_store(db, str(damage)) from None
            raise
    finally:
        lock.release()
    return uri, exp_id


def _create_store(db: Path) -> None:
    """A new sqlite store at `db`, made whole. On opening a new store MLflow creates its first tables, then
    migrates them in place (some 60 steps, each committed on its own: 1-2 s), and a kill, a SIGTERM or a
    Ctrl-C on the way left a half-made store that MLflow refused on every later run, with a traceback
    ("index ... already exists"). MLflow does it here in a hidden sibling (the same directory, so the same
    file system), which is renamed over `db` once complete. The caller holds the store's lock: a killed
    creation's leftovers (`.NAME.<token>.new`, its rollback journal) are removed by the next one. Each
    creation takes a new name, as MLflow keeps an engine, and its pool's idle connection, per store uri for
    the life of the process (MlflowClient has no call to close them)."""
    from mlflow import MlflowClient

    for leftover in db.parent.glob(f".{db.name}.*.new*"):
        leftover.unlink(missing_ok=True)
    tmp = db.with_name(f".{db.name}.{secrets.token_hex(4)}.new")
    try:
        MlflowClient(f"sqlite:///{tmp}").search_experiments(max_results=1)  # opening it creates it
        os.replace(tmp, db)
    finally:
        tmp.unlink(missing_ok=True)


def check_store(tcfg: TrackingConfig, root: Path | None = None) -> None:
    """The refusals `ensure_experiment` makes of the store, made without creating or writing anything (the
    check stage, before DVC deletes any stage's outputs): a server that does not answer, a file that is no
    MLflow sqlite store, a uri MLflow will not open (a plain directory, an unknown scheme, a database whose
    driver is not installed). A sqlite store that does not exist yet passes: the first training creates it."""
    uri, source = tracking_uri(tcfg, root), tracking_uri_source(tcfg)
    if (db := sqlite_store_path(uri)) is not None:
        check_sqlite_store(db)
        return
    if is_server(uri):
        check_tracking_server(uri, source)
    _open_client(uri, source)  # opens no connection: MLflow connects on the first call


def reading_client(uri: str, key: str | None = None):
    """An MlflowClient for reading the store at `uri`, or None when a sqlite store does not exist yet (or
    holds nothing: `new_store`).

    Reading never creates or migrates a store (MLflow's client would, on a missing or empty sqlite file,
    without the lock `ensure_experiment` takes), and a damaged file or an absent server is one clear error.
    """
    db = sqlite_store_path(uri)
    if db is not None:
        check_sqlite_store(db)
        if new_store(db):
            return None
    elif is_server(uri):
        check_tracking_server(uri, key)
    return _open_client(uri, key)


def _open_client(uri: str, key: str | None):
    """MlflowClient(uri); a ConfigError naming the setting for a store MLflow will not open: a directory or
    file: uri (MLflow 3's file store is refused), an unknown scheme, a database whose driver is not
    installed. Each was a traceback."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient(uri)
    except (MlflowException, ImportError) as err:  # ImportError: postgresql:// without its driver
        why = " ".join(str(getattr(err, "message", err)).split()).split(". ")[0]
        raise ConfigError(
            f"{key or 'tracking uri'}={uri}: MLflow will not open this store ({why}); use "
            "sqlite:///PATH/mlflow.db or an http(s):// tracking server"
        ) from None
