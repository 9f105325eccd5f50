"""MLflow: where the store is, and the bookkeeping of one run across the pipeline's stages.

The train stage creates the run (through Lightning's MLFlowLogger) and writes its id to
`models/mlflow_run.json`; evaluate and report add to the same run, so one configuration is one run whether it
went through `dvc repro` (a process per stage) or `vaerepro run` (one process).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from vaerepro.config import Config, ConfigError, find_project_root

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"


def tracking_uri(cfg: Config, root: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI wins; then tracking.uri; then sqlite at the project root (absolute path).

    MLflow 3 refuses a plain ./mlruns file store, and a relative sqlite path would change meaning with the
    working directory (DVC's queued experiments run in temporary copies), hence the absolute path.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.tracking.uri:
        return cfg.tracking.uri
    root = store_root((root or find_project_root()).resolve())
    return f"sqlite:///{root / 'mlflow.db'}"


def tracking_uri_source(cfg: Config) -> str | None:
    """Which setting `tracking_uri` took its value from, for messages; None for the default store."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "MLFLOW_TRACKING_URI"
    if cfg.tracking.uri:
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


def artifact_location(uri: str, root: Path | None = None) -> str | None:
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


def _not_a_store(db: Path, problem: str) -> ConfigError:
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
        raise _not_a_store(db, str(err)) from None
    except sqlite3.Error as err:
        raise _not_a_store(db, str(err)) from None
    if tables and not tables & {"experiments", "alembic_version"}:
        raise _not_a_store(db, f"a sqlite database with no MLflow tables: {', '.join(sorted(tables)[:5])}")


def _sqlite_corruption(err: BaseException) -> sqlite3.DatabaseError | None:
    """The sqlite error saying the file is damaged ('malformed', 'not a database') behind an MLflow or
    SQLAlchemy error, if that is what it is (a locked database or a constraint is not damage)."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        orig = getattr(e, "orig", None)
        for x in (e, orig):
            if isinstance(x, sqlite3.DatabaseError) and not isinstance(
                x, (sqlite3.OperationalError, sqlite3.IntegrityError)
            ):
                return x
        e = e.__cause__ or e.__context__
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


def _ensure_view(client, exp_id: str) -> None:
    """Give the experiment the saved view that `ui_url` opens (mlflow_ui.experiment_tags), once."""
    from vaerepro import mlflow_ui

    have = client.get_experiment(exp_id).tags
    for key, value in mlflow_ui.experiment_tags().items():
        if have.get(key) != value:
            client.set_experiment_tag(exp_id, key, value)


# Where `mlflow ui` (make mlflow-ui, vaerepro ui) serves a local store.
LOCAL_UI = "http://127.0.0.1:5000"


def is_server(uri: str) -> bool:
    """Whether the tracking uri is an MLflow tracking server (http or https) rather than a database."""
    return uri.startswith(("http://", "https://"))


def ui_url(uri: str, exp_id: str, mode: str = "TABLE", local: str = LOCAL_UI) -> str:
    """The link to the experiment's runs, set up for comparing them (mlflow_ui.runs_url): on the tracking
    server for an http(s) store, else at `local`, where `vaerepro ui` serves the local store."""
    from vaerepro import mlflow_ui

    return mlflow_ui.runs_url(uri if is_server(uri) else local, exp_id, mode=mode)


def ensure_experiment(cfg: Config, root: Path | None = None) -> tuple[str, str]:
    """Create the project's experiment if needed, with the saved view of its runs that `ui_url` opens;
    return (tracking uri, experiment id).

    A sqlite store is created, migrated and given the experiment by one process at a time, under a lock
    file beside the database (<db>.lock): MLflow's own creation of a new sqlite store is not safe when
    several runs start together, and a store left half-migrated fails every later run. Once this has run
    in a process, MLflow keeps the opened store, so the run's later MLflow calls do not migrate again.
    """
    import mlflow
    from filelock import FileLock, Timeout
    from mlflow import MlflowClient

    uri = tracking_uri(cfg, root)
    name = cfg.tracking.experiment
    if is_server(uri):
        check_tracking_server(uri, tracking_uri_source(cfg))
    mlflow.set_tracking_uri(uri)
    db = sqlite_store_path(uri)
    if db is None:
        client = MlflowClient(uri)
        exp_id = _get_or_create_experiment(client, name, artifact_location(uri, root))
        _ensure_view(client, exp_id)
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
            client = MlflowClient(uri)
            exp_id = _get_or_create_experiment(client, name, artifact_location(uri, root))
            _ensure_view(client, exp_id)
        except Exception as err:
            if (damage := _sqlite_corruption(err)) is not None:
                raise _not_a_store(db, str(damage)) from None
            raise
    finally:
        lock.release()
    return uri, exp_id


# --- the names of numbers in MLflow ---------------------------------------------------------------------

# A number whose unit is its data space's (nats of a pmf on {0,1}^D, or of a density on [0,1]^D) is named in
# MLflow under that space: `binary/test/log_px`, `continuous/val/elbo`, `improper/test/log_px` (a Bernoulli
# on grey levels, not a normalised density). So no MLflow chart, table column or parallel-coordinates axis
# ever holds numbers of two spaces, while runs of every space (a sweep over likelihoods) share one
# experiment. The numbers below have no such unit and keep one name for every run; any other number is
# space-qualified, so a new one is never put on a shared axis by mistake.
SPACE_FREE = frozenset(
    {
        "kl",
        "ess",
        "ess_fraction",
        "ess_hmean",
        "active_units",
        "knn_accuracy",
        "converged",
        "train_time_s",
        "epochs",
        "best_epoch",
    }
)
# Facts about a run, not results: MLflow params, tags or the logged dataset hold them, not metric charts.
BOOKKEEPING = frozenset({"epoch", "num_samples", "num_examples", "data_dim", "latent_dim"})
SPACES = ("binary", "continuous", "improper")


def space_name(data_space: str, improper: bool) -> str:
    """The prefix of a run's space-dependent metric names: 'binary', 'continuous', or 'improper'."""
    return "improper" if improper else data_space


def metric_name(key: str, space: str) -> str | None:
    """The MLflow name of one of vaerepro's numbers (`test/log_px`, `val/elbo`, `final/epochs`, ...) in a run
    of `space` (see space_name); None for bookkeeping that is not logged as a metric."""
    leaf = key.rsplit("/", 1)[-1]
    if leaf in BOOKKEEPING:
        return None
    return key if leaf in SPACE_FREE else f"{space}/{key}"


def reading_client(uri: str, key: str | None = None):
    """An MlflowClient for reading the store at `uri`, or None when a sqlite store does not exist yet.

    Reading never creates or migrates a store (MLflow's client would, on a missing or empty sqlite file,
    without the lock `ensure_experiment` takes), and a damaged file or an absent server is one clear error.
    """
    from mlflow import MlflowClient

    db = sqlite_store_path(uri)
    if db is not None:
        if not db.is_file() or db.stat().st_size == 0:
            return None
        check_sqlite_store(db)
    elif is_server(uri):
        check_tracking_server(uri, key)
    return MlflowClient(uri)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Files the pipeline itself writes or rewrites (dvc repro, dvc exp run -S): a change in them does not make the
# code a run used differ from its commit (the config is logged as params, the data by its digest).
PIPELINE_FILES = ("dvc.lock", "params.yaml", "data.dvc", "metrics", "plots", "reports")


def git_commit(root: Path) -> str | None:
    """HEAD's commit, with '-dirty' when tracked files other than the pipeline's own differ from it."""
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                *(f":(exclude){f}" for f in PIPELINE_FILES),
            ],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return res.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def data_version(root: Path) -> str | None:
    """The md5 of the raw data directory recorded in data.dvc (the data's version)."""
    f = root / "data.dvc"
    if not f.is_file():
        return None
    outs = (yaml.safe_load(f.read_text()) or {}).get("outs") or []
    return outs[0].get("md5") if outs else None


def run_tags(cfg: Config, root: Path) -> dict[str, str]:
    tags = {
        "likelihood": cfg.likelihood.name,
        "data_space": cfg.data_space,
        "improper": str(cfg.improper).lower(),
        "latent_dim": str(cfg.model.latent_dim),
        "source": cfg.data.source,
    }
    if (commit := git_commit(root)) is not None:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    if (version := data_version(root)) is not None:
        tags["data_version"] = version
    # A sweep trial (vaerepro.sweep sets these): a child of the study's run, named by study and trial number.
    # A DVC experiment (`dvc exp run` sets these): its name and the commit it is based on.
    for env, tag in (
        ("VAEREPRO_PARENT_RUN_ID", "mlflow.parentRunId"),
        ("VAEREPRO_STUDY", "vaerepro.study"),
        ("VAEREPRO_TRIAL", "vaerepro.trial"),
        ("DVC_EXP_NAME", "dvc.exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev"),
    ):
        if value := os.environ.get(env):
            tags[tag] = value
    return tags


def log_dataset(client, run_id: str, meta: Mapping[str, Any], cfg: Config) -> None:
    """The run's data as an MLflow dataset input (the UI's Dataset column): name, digest, source, and the
    split sizes and data space as its profile. meta: prepared/meta.json."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    digest = (meta.get("files") or {}).get("x_train.npy") or meta.get("split_indices_sha256") or ""
    source = meta.get("path") or meta.get("source")
    profile = {
        **{f"num_{split}": n for split, n in (meta.get("sizes") or {}).items()},
        "data_dim": meta.get("data_dim"),
        "image_shape": meta.get("image_shape"),
        "data_space": cfg.data_space,
        "quantized": bool(meta.get("quantized")),
    }
    dataset = Dataset(
        name=str(meta.get("source") or cfg.data.source),
        digest=digest[:32],  # MLflow keeps at most 36 characters; the sha256 of x_train.npy, shortened
        source_type="local" if meta.get("path") else "code",
        source=json.dumps({"source": str(source), "x_train_sha256": digest}),
        profile=json.dumps(profile),
    )
    client.log_inputs(
        run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])]
    )


def headline(
    cfg: Config, train: Mapping[str, Any] | None = None, evaluation: Mapping[str, Any] | None = None
) -> str:
    """The run's description (Markdown): what was trained and its headline numbers, each with its unit."""
    from vaerepro.compare import space_label

    space = space_label(cfg.data_space, cfg.improper)
    lines = [f"**{cfg.likelihood.name}, latent size {cfg.model.latent_dim}, {space}**"]
    if evaluation is not None:
        e = evaluation
        verdict = (
            "" if e.get("converged") is None else (", converged" if e["converged"] else ", NOT converged")
        )
        lines.append(
            f"log p(x) = {e['log_px']:.2f} ± {e['log_px_se']:.2f} nats/example "
            f"(K = {e.get('num_samples')}{verdict}); ELBO {e['elbo']:.2f}; KL {e['kl']:.2f}; "
            f"{e['bits_per_dim']:.4f} bits/dim"
            + (f"; kNN accuracy {e['knn_accuracy']:.3f}" if e.get("knn_accuracy") is not None else "")
        )
    if train is not None:
        lines.append(
            f"trained {train['epochs']} epochs; best validation ELBO {train['best_val_elbo']:.2f} "
            f"nats/example at epoch {train['best_epoch']}"
        )
    return "  \n".join(lines)


def describe(client, run_id: str, cfg: Config, **numbers: Mapping[str, Any] | None) -> None:
    """Set the run's description (the `mlflow.note.content` tag the UI shows as the run's description)."""
    client.set_tag(run_id, "mlflow.note.content", headline(cfg, **numbers))


def log_evaluation(cfg: Config, out_dir: Path, metrics: Mapping[str, Any]) -> None:
    """Add the evaluate stage's results to the run that out_dir/models/mlflow_run.json names: the eval
    config, the numbers (named for the run's data space, metric_name), the ladder as test/log_px_ladder
    with step = K, the convergence verdict (a tag, and a 1/0 metric for tables and filters), the run's
    description, and metrics/eval.json."""
    run_id, uri = read_run_id(out_dir / "models")
    if not (cfg.tracking.enabled and run_id):
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(uri)
    space = space_name(cfg.data_space, cfg.improper)
    log_config(client, run_id, cfg, keys=("eval",))
    conv = metrics.get("convergence") or {}
    numbers = {**metrics, **{k: conv.get(k) for k in ("ladder_gain", "ladder_gain_se", "ess_hmean")}}
    if metrics.get("converged") is not None:
        numbers["converged"] = float(metrics["converged"])
        client.set_tag(run_id, "vaerepro.converged", str(bool(metrics["converged"])).lower())
    log_metrics(client, run_id, numbers, prefix="test/", space=space)
    name = metric_name("test/log_px_ladder", space)
    client.log_batch(run_id, metrics=[Metric(name, r["log_px"], 0, r["k"]) for r in metrics["log_px_ladder"]])
    train_json = out_dir / "metrics" / "train.json"
    trained = json.loads(train_json.read_text()) if train_json.is_file() else None
    describe(client, run_id, cfg, train=trained, evaluation=metrics)
    client.log_artifact(run_id, str(out_dir / "metrics" / "eval.json"), "metrics")


def log_report(model_dir: Path, report_dir: Path) -> None:
    """The report's files as the run's `report/` artifacts; the run is then FINISHED (its last stage)."""
    run_id, uri = read_run_id(model_dir)
    if run_id:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        client.log_artifacts(run_id, str(report_dir), "report")
        client.set_terminated(run_id, "FINISHED")


def write_run_id(model_dir: Path, run_id: str | None, uri: str | None) -> None:
    (model_dir / RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}, indent=2) + "\n")


def read_run_id(model_dir: Path) -> tuple[str | None, str | None]:
    f = model_dir / RUN_FILE
    if not f.is_file():
        return None, None
    try:
        d = json.loads(f.read_text())
        return d.get("run_id"), d.get("tracking_uri")
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:
        from vaerepro.errors import UserError

        raise UserError(f"{f}: not the JSON object `vaerepro train` writes ({exc})") from None


def log_config(client, run_id: str, cfg: Config, keys: tuple[str, ...] | None = None) -> None:
    """Log the resolved config as params (flattened) and as a YAML artifact.

    MLflow params are immutable; a stage re-run with a changed value (say eval.num_samples) records the new
    value as a tag instead of failing the run.
    """
    from mlflow.exceptions import MlflowException

    raw = cfg.to_dict()
    flat = flatten({k: raw[k] for k in (keys or raw)})
    existing = client.get_run(run_id).data.params
    for k, v in flat.items():
        value = str(v)[:6000]
        if k in existing and existing[k] != value:
            client.set_tag(run_id, f"changed.{k}", value)
            continue
        if k not in existing:
            try:
                client.log_param(run_id, k, value)
            except MlflowException:
                client.set_tag(run_id, f"changed.{k}", value)
    if keys is None:
        client.log_text(run_id, yaml.safe_dump(raw, sort_keys=False), "config.yaml")


def log_metrics(client, run_id: str, metrics: Mapping[str, Any], prefix: str, space: str) -> None:
    """Log the finite numbers of `metrics` as `prefix + key`, named for the run's space (metric_name)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(name, float(v), now, 0)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        if (name := metric_name(f"{prefix}{k}", space)) is not None
    ]
    if batch:
        client.log_batch(run_id, metrics=batch)


def experiment_runs(cfg: Config, root: Path | None = None) -> list[dict[str, Any]]:
    """Every run of the project's experiment as a plain row for the report's comparison."""
    uri = tracking_uri(cfg, root)
    db = sqlite_store_path(uri)
    try:
        client = reading_client(uri, tracking_uri_source(cfg))
        if client is None:
            return []
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        found = [] if exp is None else client.search_runs([exp.experiment_id], max_results=5000)
    except Exception as err:
        if db is not None and (damage := _sqlite_corruption(err)) is not None:
            raise _not_a_store(db, str(damage)) from None
        raise
    rows = []
    for r in found:
        tags, params, metrics = r.data.tags, r.data.params, r.data.metrics
        if "data_space" not in tags:  # a parent (sweep) run or a foreign run: no numbers of its own
            continue
        rows.append(
            {
                "run_id": r.info.run_id,
                "run_name": r.info.run_name,
                "status": r.info.status,
                "likelihood": tags.get("likelihood", params.get("likelihood.name")),
                "data_space": tags["data_space"],
                "improper": tags.get("improper") == "true",
                "latent_dim": int(tags.get("latent_dim", params.get("model.latent_dim", 0))),
                "source": tags.get("source"),
            }
        )
        # the evaluation metrics by their plain names (test/kl, binary/test/log_px -> kl, log_px), without
        # letting a metric overwrite the run's own descriptors
        own = f"{space_name(rows[-1]['data_space'], rows[-1]['improper'])}/test/"
        for k, v in metrics.items():
            name = k.removeprefix(own) if k.startswith(own) else k.removeprefix("test/")
            if name != k and "/" not in name and name not in rows[-1]:
                rows[-1][name] = v
    return rows


# --- how a run ends -------------------------------------------------------------------------------------

FAILURE_TAG = "vaerepro.failure"  # why a run ended FAILED or KILLED: one line


def status_of(exc: BaseException, *, interrupted: bool = False) -> str:
    """The MLflow status of a run that `exc` ended: KILLED for a signal or Ctrl-C (Lightning turns Ctrl-C into
    SystemExit after marking the trainer interrupted), FAILED for anything else."""
    from vaerepro.errors import Stopped

    if isinstance(exc, (Stopped, KeyboardInterrupt)) or (isinstance(exc, SystemExit) and interrupted):
        return "KILLED"
    return "FAILED"


def end_run(client, run_id: str, status: str, reason: BaseException | str | None = None) -> None:
    """End a run as FINISHED, FAILED or KILLED, the reason (one line) as the `vaerepro.failure` tag.

    Called on the way out of an error: a store that fails now is logged, not raised over the error that
    is already on its way up."""
    try:
        if reason is not None:
            client.set_tag(run_id, FAILURE_TAG, one_line(reason)[:5000])
        elif status == "FINISHED" and FAILURE_TAG in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, FAILURE_TAG)  # a stage that failed before has now finished
        client.set_terminated(run_id, status)
    except Exception as err:  # noqa: BLE001 - see the docstring
        if status == "FINISHED":
            raise
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, err)


def one_line(reason: BaseException | str) -> str:
    """'Type: first line of the message' for an exception; the text itself for a string."""
    if not isinstance(reason, BaseException):
        return str(reason)
    text = str(reason).strip().splitlines()
    return f"{type(reason).__name__}: {text[0] if text else ''}"


def end_recorded_run(model_dir: Path, status: str, reason: BaseException | str | None = None) -> None:
    """End the run that models/mlflow_run.json names (the pipeline's stages after `train` share it)."""
    run_id, uri = read_run_id(model_dir)
    if run_id:
        from mlflow import MlflowClient

        end_run(MlflowClient(uri), run_id, status, reason)


def complete_curve(
    client, run_id: str, rows: list[Mapping[str, Any]], keys: tuple[str, str], space: str
) -> int:
    """Send the per-epoch points of `rows` (a resumed checkpoint's curve: epoch, train_elbo, val_elbo) that
    the run lacks, e.g. because the process was killed before its metric buffer was sent; per-epoch metrics
    have step = epoch. keys: the (training, validation) keys as training logs them (named for `space` here).
    Returns how many points were sent."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = []
    for key, column in zip(keys, ("train_elbo", "val_elbo"), strict=True):
        key = metric_name(key, space)
        have = {m.step for m in client.get_metric_history(run_id, key)}
        batch += [
            Metric(key, float(r[column]), now, int(r["epoch"])) for r in rows if int(r["epoch"]) not in have
        ]
    if batch:
        client.log_batch(run_id, metrics=batch)
        log.info("sent %d per-epoch values the MLflow run lacked, from the resumed checkpoint", len(batch))
    return len(batch)
