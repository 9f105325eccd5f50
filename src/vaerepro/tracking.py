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
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from vaerepro.config import Config, find_project_root

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


def artifact_location(uri: str, root: Path | None = None) -> str | None:
    """Artifacts beside a local sqlite store; a tracking server chooses its own."""
    if uri.startswith("sqlite:"):
        root = Path(uri.removeprefix("sqlite:///")).parent
        return (root / "mlartifacts").resolve().as_uri()
    return None


def ensure_experiment(cfg: Config, root: Path | None = None) -> tuple[str, str]:
    """Create the project's experiment if needed; return (tracking uri, experiment id)."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(cfg, root)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        exp_id = client.create_experiment(
            cfg.tracking.experiment, artifact_location=artifact_location(uri, root)
        )
    else:
        exp_id = exp.experiment_id
    return uri, exp_id


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit(root: Path) -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
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
    for env, tag in (
        ("VAEREPRO_PARENT_RUN_ID", "mlflow.parentRunId"),
        ("VAEREPRO_STUDY", "vaerepro.study"),
        ("VAEREPRO_TRIAL", "vaerepro.trial"),
    ):
        if value := os.environ.get(env):
            tags[tag] = value
    return tags


def write_run_id(model_dir: Path, run_id: str | None, uri: str | None) -> None:
    (model_dir / RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}, indent=2) + "\n")


def read_run_id(model_dir: Path) -> tuple[str | None, str | None]:
    f = model_dir / RUN_FILE
    if not f.is_file():
        return None, None
    d = json.loads(f.read_text())
    return d.get("run_id"), d.get("tracking_uri")


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


def log_metrics(client, run_id: str, metrics: Mapping[str, Any], prefix: str = "") -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(f"{prefix}{k}", float(v), now, 0)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    ]
    if batch:
        client.log_batch(run_id, metrics=batch)


def experiment_runs(cfg: Config, root: Path | None = None) -> list[dict[str, Any]]:
    """Every run of the project's experiment as a plain row for the report's comparison."""
    from mlflow import MlflowClient

    uri = tracking_uri(cfg, root)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return []
    rows = []
    for r in client.search_runs([exp.experiment_id], max_results=5000):
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
        # the evaluation metrics, without letting e.g. test/latent_dim overwrite the run's own descriptors
        rows[-1].update(
            {k[5:]: v for k, v in metrics.items() if k.startswith("test/") and k[5:] not in rows[-1]}
        )
    return rows
