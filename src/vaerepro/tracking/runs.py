"""One run's bookkeeping in MLflow across the pipeline's stages: its tags, dataset, description and config,
the files that name it to the next stage, its numbers (named for their data space), and how it ends. Where an
evaluation's numbers go, and reading them back: evaluations.py.

The train stage creates the run (through Lightning's MLflow logger, tracking.training) and writes its id to
`models/mlflow_run.json`; evaluate and report add to the same run, so one configuration is one run whether it
went through `dvc repro` (a process per stage) or `vaerepro run` (one process).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from vaerepro import signals
from vaerepro.config import Config
from vaerepro.data import META_FILE, file_sha256, is_dequantized
from vaerepro.document import flatten
from vaerepro.errors import Stopped, UserError
from vaerepro.files import write_json
from vaerepro.tracking.names import ENVIRONMENT_KEYS, K_TAG, metric_name
from vaerepro.tracking.store import causes
from vaerepro.versions import git_commit, versions_text

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI


def tag_environment(client, run_id: str, record: Mapping[str, Any], stage: str) -> None:
    """Tag run `run_id` with where and with what a stage ran, as its record (train.json for stage "train",
    eval.json for "eval") says: vaerepro.<stage>.device, vaerepro.<stage>.versions (on one line,
    versions.versions_text) and vaerepro.<stage>.commit. A record from before it held one, or a commit
    recorded as none (not a git checkout), sets none."""
    for key in ENVIRONMENT_KEYS:
        value = record.get(key)
        if isinstance(value, Mapping):
            value = versions_text(value)
        if isinstance(value, str):
            client.set_tag(run_id, f"vaerepro.{stage}.{key}", value)


def data_version(root: Path) -> str | None:
    """The md5 of the raw data directory recorded in data.dvc (the data's version)."""
    f = root / "data.dvc"
    if not f.is_file():
        return None
    outs = (yaml.safe_load(f.read_text()) or {}).get("outs") or []
    return outs[0].get("md5") if outs else None


def run_tags(cfg: Config, root: Path, data_meta: Mapping[str, Any] | None = None) -> dict[str, str]:
    """A new run's tags; data_meta: prepared/meta.json, whose raw_files give an .npz its data_version."""
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
    if cfg.data.source == "npz":  # the user's file, which data.dvc does not track: the md5 prepare read
        version = next(iter((data_meta or {}).get("raw_files", {}).values()), None)
    else:
        version = data_version(root)
    if version is not None:
        tags["data_version"] = version
    # A sweep trial (vaerepro.sweep sets these): a child of the study's run, named by study and trial number.
    for env, tag in (
        ("VAEREPRO_PARENT_RUN_ID", "mlflow.parentRunId"),
        ("VAEREPRO_STUDY", "vaerepro.study"),
        ("VAEREPRO_TRIAL", "vaerepro.trial"),
    ):
        if value := os.environ.get(env):
            tags[tag] = value
    return {**tags, **dvc_experiment_tags()}


# A DVC experiment (`dvc exp run` sets these variables): its name and the commit it is based on.
DVC_EXPERIMENT_TAGS = (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev"))


def dvc_experiment_tags() -> dict[str, str]:
    """The tags naming the DVC experiment this process runs in; none outside `dvc exp run`."""
    return {tag: value for env, tag in DVC_EXPERIMENT_TAGS if (value := os.environ.get(env))}


def tag_dvc_experiment(client, run_id: str, tags: Mapping[str, str]) -> None:
    """Set evaluation run `run_id`'s DVC experiment tags (its current `tags`) to this process's: the
    experiment whose evaluation its numbers now are, or none."""
    now = dvc_experiment_tags()
    for _, tag in DVC_EXPERIMENT_TAGS:
        if tag in now:
            client.set_tag(run_id, tag, now[tag])
        elif tag in tags:
            client.delete_tag(run_id, tag)


def log_dataset(client, run_id: str, meta: Mapping[str, Any], data_space: str, source: str) -> None:
    """The run's data as an MLflow dataset input (the UI's Dataset column): name (the source and the data
    space, mnist5k-binary), digest, source, and the split sizes and data space as its profile. meta:
    prepared/meta.json; source: the config's data.source.

    The space is in the name because MLflow keeps one dataset per (experiment, name, digest), its profile
    the first run's: the same digits in another space would show the first space. `quantized` is eval.json's:
    8-bit levels dequantised into [0, 1], not binarised."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    digest = (meta.get("files") or {}).get("x_train.npy") or meta.get("split_indices_sha256") or ""
    origin = meta.get("path") or meta.get("source")
    profile = {
        **{f"num_{split}": n for split, n in (meta.get("sizes") or {}).items()},
        "data_dim": meta.get("data_dim"),
        "image_shape": meta.get("image_shape"),
        "data_space": data_space,
        "quantized": is_dequantized(data_space, bool(meta.get("quantized"))),
    }
    dataset = Dataset(
        name=f"{meta.get('source') or source}-{data_space}",
        digest=digest[:32],  # MLflow keeps at most 36 characters; the sha256 of x_train.npy, shortened
        source_type="local" if meta.get("path") else "code",
        source=json.dumps({"source": str(origin), "x_train_sha256": digest}),
        profile=json.dumps(profile),
    )
    inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])]
    for attempt in range(DATASET_ATTEMPTS):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except Exception as err:
            # MLflow's database store looks the dataset up, then inserts it: two runs of one experiment that
            # log the same data at once (a sweep's parallel trials) can both find it missing, and the second
            # insert fails on the (experiment, name, digest) key. The dataset exists then; logging it again
            # links this run to it. Any other error, or the same one every time, is raised.
            from sqlalchemy.exc import IntegrityError

            unique_key = any(isinstance(e, IntegrityError) for e in causes(err))
            if not unique_key or attempt == DATASET_ATTEMPTS - 1:
                raise


DATASET_ATTEMPTS = 3


def headline(
    cfg: Config, train: Mapping[str, Any] | None = None, evaluation: Mapping[str, Any] | None = None
) -> str:
    """The run's description (Markdown): what was trained and its headline numbers, each with its unit."""
    from vaerepro.compare import space_label

    space = space_label(cfg.data_space, cfg.improper)
    lines = [f"**{cfg.likelihood_object().label}, latent size {cfg.model.latent_dim}, {space}**"]
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
            f"nats/example at epoch {train['best_epoch']} (counted from 0)"
        )
    return "  \n".join(lines)


def describe(client, run_id: str, cfg: Config, **numbers: Mapping[str, Any] | None) -> None:
    """Set the run's description (the `mlflow.note.content` tag the UI shows as the run's description)."""
    client.set_tag(run_id, NOTE_TAG, headline(cfg, **numbers))


EVAL_RUN_DIR = "artifacts"  # the evaluate stage's output folder, where it names the run it logged to


def stage_run_id(out_dir: Path) -> tuple[str | None, str | None]:
    """The run the stages after training report to: the one the evaluation logged to
    (out_dir/artifacts/mlflow_run.json, evaluation_run); none when it logged to none (tracking off: its
    run_id is null, and the training's run holds another evaluation's numbers, or none); the training's
    (out_dir/models/mlflow_run.json) when no evaluation said."""
    if (out_dir / EVAL_RUN_DIR / RUN_FILE).is_file():
        return read_run_id(out_dir / EVAL_RUN_DIR)
    return read_run_id(out_dir / "models")


def test_set_digest(prepared: Path) -> str | None:
    """The first 12 hex digits of the sha256 of prepared/x_test.npy (from prepared/meta.json), or None."""
    try:
        meta = json.loads((prepared / META_FILE).read_text())
        return str(meta["files"]["x_test.npy"])[:12]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def log_report(out_dir: Path, report_dir: Path) -> None:
    """The report's files as `report/` artifacts of the run the evaluation logged to (stage_run_id); the run
    is then FINISHED (its last stage). So is the training's run when it is another one still RUNNING:
    `vaerepro run` leaves the training's run for its report to end, and a resumed training whose run held an
    evaluation of another measurement was evaluated and reported in a child (evaluation_run), which left the
    training's run RUNNING for ever."""
    run_id, uri = stage_run_id(out_dir)
    if not run_id:
        log.warning("the evaluation was not logged to MLflow (tracking was off): nor is this report")
    else:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        client.log_artifacts(run_id, str(report_dir), "report")
        end_run(client, run_id, "FINISHED")  # and without the reason of a report that failed before
        trained, trained_uri = read_run_id(out_dir / "models")
        if trained and trained != run_id and trained_uri == uri:
            if client.get_run(trained).info.status == "RUNNING":
                client.set_terminated(trained, "FINISHED")


def write_run_id(
    model_dir: Path,
    run_id: str | None,
    uri: str | None,
    *,
    evaluation: Path | None = None,
    logged: bool | None = None,
) -> None:
    """model_dir/mlflow_run.json naming the run, whole or not at all (written beside it, then renamed over
    it); `evaluation`: the eval.json whose numbers went to it, named by its sha256; `logged`: whether all of
    them have reached the run yet (`check_evaluation_run` reads both)."""
    record: dict[str, Any] = {"run_id": run_id, "tracking_uri": uri}
    if evaluation is not None:
        record["eval_json_sha256"] = file_sha256(evaluation)
    if logged is not None:
        record["logged"] = logged
    write_json(model_dir / RUN_FILE, record)


def check_evaluation_run(out_dir: Path) -> None:
    """UserError when out_dir/artifacts/mlflow_run.json names the run of another evaluation than
    out_dir/metrics/eval.json: a `vaerepro evaluate` that wrote its numbers but stopped before it logged
    them (an MLflow store that refused them, a SIGTERM) leaves the previous evaluation's run named, and a
    report would go to that run (another model's, or another K's). A record written before it named its
    eval.json is not checked."""
    pointer, ev = out_dir / EVAL_RUN_DIR / RUN_FILE, out_dir / "metrics" / "eval.json"
    if not (pointer.is_file() and ev.is_file()):
        return
    run_id, _ = read_run_id(out_dir / EVAL_RUN_DIR)  # a damaged file: one line naming it
    record = json.loads(pointer.read_text())
    logged = record.get("eval_json_sha256")
    if logged is not None and logged != file_sha256(ev):
        raise UserError(
            f"{pointer}: names the MLflow run of another evaluation than {ev} (the last `vaerepro evaluate` "
            "wrote its numbers but did not log them); run `vaerepro evaluate` again"
        )
    if record.get("logged") is False:
        raise UserError(
            f"{pointer}: the last `vaerepro evaluate` stopped while it logged the numbers of {ev} to MLflow "
            f"run {run_id}, which holds part of them and part of the previous evaluation's; run `vaerepro "
            "evaluate` again"
        )


def read_run_id(model_dir: Path) -> tuple[str | None, str | None]:
    f = model_dir / RUN_FILE
    if not f.is_file():
        return None, None
    try:
        d = json.loads(f.read_text())
        return d.get("run_id"), d.get("tracking_uri")
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:
        stage = "vaerepro evaluate" if model_dir.name == EVAL_RUN_DIR else "vaerepro train"
        raise UserError(f"{f}: not the JSON object `{stage}` writes ({exc})") from None


def log_config(client, run_id: str, raw: Mapping[str, Any], keys: tuple[str, ...] | None = None) -> None:
    """Log the resolved config (raw: Config.to_dict()) as params (flattened) and, whole, as a YAML artifact;
    keys: only these top-level sections.

    MLflow params are immutable; a stage re-run with a changed value (say eval.num_samples) records the new
    value as a tag `changed.<key>` instead of failing the run. The tag says what the run is on now: when
    the value is back to the param's (a resume from 2 x 25 back to 1 x 50 devices x batch), it is deleted.
    """
    flat = flatten({k: raw[k] for k in (keys or raw)})
    if (raw.get("train") or {}).get("lr_candidates") is not None:
        # the rate training runs at is the step-size pilots' choice, not train.lr (unused): the training's
        # run logs it as train.lr once chosen (TrainingRun.finish), never the unused value beside the others'
        flat.pop("train.lr", None)
    log_params(client, run_id, flat)
    if keys is None:
        client.log_text(run_id, yaml.safe_dump(raw, sort_keys=False), "config.yaml")


def log_params(client, run_id: str, flat: Mapping[str, Any]) -> None:
    """Log `flat` ({name: value}) as params of run `run_id`; a name the run holds with another value (MLflow
    params cannot change) as the tag `changed.<name>`, deleted when the value is back to the param's."""
    from mlflow.exceptions import MlflowException

    run = client.get_run(run_id)
    existing, tags = run.data.params, run.data.tags
    for k, v in flat.items():
        value = str(v)[:6000]
        if k in existing and existing[k] != value:
            client.set_tag(run_id, f"changed.{k}", value)
            continue
        if k in existing and f"changed.{k}" in tags:
            client.delete_tag(run_id, f"changed.{k}")
            continue
        if k not in existing:
            try:
                client.log_param(run_id, k, value)
            except MlflowException:
                client.set_tag(run_id, f"changed.{k}", value)


def log_metrics(client, run_id: str, metrics: Mapping[str, Any], prefix: str, space: str) -> None:
    """Log the finite numbers of `metrics` as `prefix + key`, named for the run's space (metric_name)."""
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


# --- how a run ends -------------------------------------------------------------------------------------

FAILURE_TAG = "vaerepro.failure"  # why a run ended FAILED or KILLED: one line
CONTINUED_TAG = "vaerepro.continued_in"  # the run a resumed training went on in (runs.supersede)
# Which models/ a training run's numbers are of (the resolved path) and which process last trained into it
# ('machine:pid', signals.this_process): end_abandoned tells a run whose process died from one still going.
MODEL_DIR_TAG = "vaerepro.model_dir"
PROCESS_TAG = "vaerepro.process"


def status_of(exc: BaseException, *, interrupted: bool = False) -> str:
    """The MLflow status of a run that `exc` ended: KILLED for a signal or Ctrl-C (Lightning turns Ctrl-C into
    SystemExit after marking the trainer interrupted), FAILED for anything else."""
    if isinstance(exc, (Stopped, KeyboardInterrupt)) or (isinstance(exc, SystemExit) and interrupted):
        return "KILLED"
    return "FAILED"


def end_run(client, run_id: str, status: str, reason: BaseException | str | None = None) -> None:
    """End a run as FINISHED, FAILED or KILLED, the reason (one line) as the `vaerepro.failure` tag.

    Called on the way out of an error: a store that fails now for FAILED or KILLED is logged, not raised
    over the error that is already on its way up; for FINISHED it is raised."""
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


def end_recorded_run(
    out_dir: Path, status: str, reason: BaseException | str | None = None, *, evaluated: bool = True
) -> None:
    """End the run a stage after `train` did not finish in: the one the evaluation logged to (stage_run_id)
    once it has (`evaluated`), else the training's, unless that run has ended holding a finished evaluation
    (its K_TAG): the failure or stop of a later one (another K, before its own run existed) leaves it as it
    is, and an earlier evaluation's run is never marked for a later one's failure. A RUNNING run is always
    ended: never RUNNING for ever."""
    run_id, uri = stage_run_id(out_dir) if evaluated else read_run_id(out_dir / "models")
    if not run_id:
        return
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    if not evaluated:
        try:
            run = client.get_run(run_id)
            done_k = run.data.tags.get(K_TAG) if run.info.status != "RUNNING" else None
        except Exception:  # noqa: BLE001 - on the way out of an error: mark it as before
            done_k = None
        if done_k is not None:
            log.warning(
                "MLflow run %s holds a finished evaluation (K=%s), left as it is; this evaluation did not "
                "finish: %s",
                run_id,
                done_k,
                one_line(reason) if reason is not None else status,
            )
            return
    end_run(client, run_id, status, reason)


def steps_beyond(client, run_id: str, keys: tuple[str, str], space: str, epochs: int | None) -> list[int]:
    """The per-epoch steps (sorted) the run holds at or past `epochs` (a checkpoint's epoch count) for either
    of the (training, validation) keys: epochs sent by a training stopped after that checkpoint."""
    if epochs is None:
        return []
    steps = {m.step for key in keys for m in client.get_metric_history(run_id, metric_name(key, space))}
    return sorted(s for s in steps if s >= epochs)


def supersede(client, run_id: str, epochs: list[int], successor: str) -> None:
    """Mark `run_id`, whose epochs `epochs` came from a training that was stopped after its last checkpoint,
    as continued in run `successor` (the tag vaerepro.continued_in), and end it KILLED with the reason if it
    was left RUNNING (killed outright: kill -9, a lost node); a FAILED one keeps its own reason."""
    client.set_tag(run_id, CONTINUED_TAG, successor)
    if client.get_run(run_id).info.status == "RUNNING":
        lost = f"epochs {epochs[0]}-{epochs[-1]} ran past models/last.ckpt"
        end_run(client, run_id, "KILLED", f"stopped outright; {lost}; training continued in run {successor}")


def end_abandoned(client, experiment_id: str, model_dir: Path, current: str) -> list[str]:
    """End KILLED, with the reason, the runs left RUNNING by processes that are gone (killed outright: kill
    -9, the out-of-memory killer): those of experiment `experiment_id`, and those of any experiment that
    trained into `model_dir`, which run `current` now trains into (under `dvc repro` DVC has deleted the
    models/mlflow_run.json that named them, and no later stage can end them). A run says which process
    holds it in PROCESS_TAG ('machine:pid', signals.this_process): one of a process alive here, or of
    another machine (which cannot be checked from here), is left RUNNING. So is one of this process, unless
    it trained into `model_dir` (a training this process ran before, whose models/ are now replaced).
    Returns the ids ended."""
    where, here, me = str(Path(model_dir).resolve()), signals.machine(), os.getpid()
    ids = [e.experiment_id for e in client.search_experiments()]
    # every experiment: an earlier training into the same directory may have logged to another
    # tracking.experiment. The tags are compared here, not in the filter: a path may hold quotes.
    running = client.search_runs(ids, filter_string="attributes.status = 'RUNNING'", max_results=50000)
    ended = []
    for r in running:
        tags, run_id = r.data.tags, r.info.run_id
        same_dir = tags.get(MODEL_DIR_TAG) == where
        if (
            run_id == current
            or PROCESS_TAG not in tags
            or not (same_dir or r.info.experiment_id == experiment_id)
        ):
            continue
        owner = tags[PROCESS_TAG]
        host, _, pid = owner.rpartition(":")
        if host != here or not pid.isdigit():
            if same_dir:
                log.warning(
                    "MLflow run %s, RUNNING, trained into %s in %s: left as it is", run_id, where, owner
                )
            continue
        if int(pid) == me:
            if not same_dir:
                continue
            reason = f"left RUNNING by an earlier training of this process ({owner})"
        elif signals.pid_alive(int(pid)):
            if same_dir:
                log.warning("MLflow run %s is RUNNING in %s, which trains into %s too", run_id, owner, where)
            continue
        else:
            reason = f"its process ({owner}) is gone and never ended the run: killed outright (kill -9, OOM)"
        if same_dir:
            reason += f"; {where} was trained again in run {current}"
        end_run(client, run_id, "KILLED", reason)
        log.warning("MLflow run %s was RUNNING, %s: ended KILLED", run_id, reason)
        ended.append(run_id)
    return ended


def complete_curve(
    client, run_id: str, rows: list[Mapping[str, Any]], keys: tuple[str, str], space: str
) -> int:
    """Send the per-epoch points of `rows` (a resumed checkpoint's curve: epoch, train_elbo, val_elbo) that
    the run lacks, e.g. because the process was killed before its metric buffer was sent; per-epoch metrics
    have step = epoch. keys: the (training, validation) keys as training logs them (named for `space` here).
    Returns how many points were sent."""
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
