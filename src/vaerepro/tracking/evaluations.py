"""An evaluation's numbers in MLflow: the run they go to, what is logged there, the measurements read back.

An evaluation of a trained model is logged to its training's run (runs.py), unless that run already holds
an evaluation of another measurement (another K or test set): then to a child run of it, one per
measurement (evaluation_run). A training resumed after its evaluation replaces the weights those numbers
are of: they are labelled as such (label_stale_numbers). experiment_runs reads the experiment back as one
row per measurement of a trained model, for the report's comparison.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vaerepro import signals
from vaerepro.compare import Measurement, measurement, measurement_text
from vaerepro.config import Config, TrackingConfig
from vaerepro.data import META_FILE
from vaerepro.tracking import ui
from vaerepro.tracking.names import (
    BEST_CKPT_TAG,
    CONVERGED_TAG,
    EVALUATED_CKPT_TAG,
    K_TAG,
    STALE_TAG,
    TEST_SET_TAG,
    likelihood_label,
    metric_name,
    space_name,
)
from vaerepro.tracking.runs import (
    EVAL_RUN_DIR,
    FAILURE_TAG,
    NOTE_TAG,
    PROCESS_TAG,
    describe,
    dvc_experiment_tags,
    end_run,
    log_config,
    log_dataset,
    log_metrics,
    log_params,
    read_run_id,
    status_of,
    tag_dvc_experiment,
    tag_environment,
    test_set_digest,
    write_run_id,
)
from vaerepro.tracking.store import (
    ensure_views,
    not_a_store,
    reading_client,
    sqlite_corruption,
    sqlite_store_path,
    tracking_uri,
    tracking_uri_source,
)

log = logging.getLogger(__name__)

STALE_NOTE = "**Not this run's model:** "  # the description's first line on a run tagged STALE_TAG
EVALUATES_TAG = "vaerepro.evaluates"  # an evaluation run's training run (evaluation_run)


def log_evaluation(cfg: Config, out_dir: Path, metrics: Mapping[str, Any]) -> None:
    """Add the evaluate stage's results to the run that out_dir/models/mlflow_run.json names: the eval
    config, the numbers (named for the run's data space, metric_name), the ladder as test/log_px_ladder
    with step = K, the convergence verdict (a tag, and a 1/0 metric for tables and filters), a reduced
    eval.precision's measured difference from float32, the run's description, and metrics/eval.json."""
    run_id, uri = read_run_id(out_dir / "models")
    if not (cfg.tracking.enabled and run_id):
        return
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    k, test_set = str(metrics.get("num_samples", cfg.eval.num_samples)), test_set_digest(out_dir / "prepared")
    trained, run_id = run_id, evaluation_run(client, run_id, cfg, k, test_set)
    # the run these numbers go to, the report's too, and which eval.json they are (check_evaluation_run);
    # written first, so that a failure while logging marks this run (end_recorded_run)
    # (`logged` false until every number is logged: a kill while logging leaves the run holding part of
    # these numbers and part of the evaluation before's, which the report then refuses to go to)
    pointer = {"run_id": run_id, "uri": uri, "evaluation": out_dir / "metrics" / "eval.json"}
    write_run_id(out_dir / EVAL_RUN_DIR, **pointer, logged=False)
    # An evaluation run (a child: another K than the training's) is this stage's own, as the training's run
    # is the train stage's: it ends FINISHED once its numbers are logged, whether or not a report follows (a
    # report then adds its files and ends it again), and FAILED or KILLED with the reason if logging them
    # does not finish (its numbers may be part this evaluation's, part the one before's). So no evaluation
    # run is left RUNNING; the training's own run is ended as before (the pipeline, end_recorded_run).
    try:
        if run_id != trained:  # a child: the data it measured, as its training run shows it
            _log_dataset_once(client, run_id, cfg, out_dir / "prepared")
        _log_evaluation(client, run_id, cfg, out_dir, metrics, k, test_set)
    except BaseException as exc:
        if run_id != trained:
            end_run(client, run_id, status_of(exc), exc)
        raise
    write_run_id(out_dir / EVAL_RUN_DIR, **pointer, logged=True)
    label_stale_numbers(client, trained)  # these numbers are of the training's best.ckpt, or not
    if run_id != trained:
        end_run(client, run_id, "FINISHED")
    measured = measurement({"source": cfg.data.source, "test_set": test_set, "num_samples": k})
    _add_parallel_view(client, run_id, measured)


def _add_parallel_view(client, run_id: str, measured: Measurement) -> None:
    """Save the parallel-coordinates view of this evaluation's measurement on its experiment (the UI's Views
    menu lists it; `vaerepro ui` prints its link): a K no run had before gets its own log p(x) axis. The view
    is a way to look at numbers already logged, so not saving it is a warning, never a failed evaluation."""
    if not ui.filterable(measured):  # no test set recorded (a prepared/ without meta.json)
        return
    try:
        ensure_views(client, client.get_run(run_id).info.experiment_id, [measured])
    except Exception as err:
        log.warning(
            "MLflow: the parallel-coordinates view of %s is not saved (%s); `vaerepro ui` saves it",
            measurement_text(measured),
            err,
        )


def _log_dataset_once(client, run_id: str, cfg: Config, prepared: Path) -> None:
    """Log the data of prepared/meta.json as run `run_id`'s dataset (log_dataset) unless it has one: an
    evaluation run at another K showed no dataset where its training's run showed mnist5k-binary."""
    run = client.get_run(run_id)
    if run.inputs is not None and run.inputs.dataset_inputs:
        return
    try:
        meta = json.loads((prepared / META_FILE).read_text())
    except (OSError, ValueError):
        return
    if isinstance(meta, dict):
        log_dataset(client, run_id, meta, cfg.data_space, cfg.data.source)


def _log_evaluation(
    client, run_id: str, cfg: Config, out_dir: Path, metrics: Mapping[str, Any], k: str, test_set: str | None
) -> None:
    """log_evaluation's logging to run `run_id`, which evaluation_run chose."""
    from mlflow.entities import Metric

    space = space_name(cfg.data_space, cfg.improper)
    log_config(client, run_id, cfg.to_dict(), keys=("eval",))
    conv = metrics.get("convergence") or {}
    numbers = {**metrics, **{k: conv.get(k) for k in ("ladder_gain", "ladder_gain_se", "ess_hmean")}}
    by_layer = metrics.get("active_units_by_layer") or []
    if len(by_layer) > 1:  # test/active_units_z1, _z2 beside their sum test/active_units
        numbers.update({f"active_units_z{i}": a for i, a in enumerate(by_layer, start=1)})
    # eval.precision's measured change of log p(x) against float32 (nats/example; its name is the param
    # eval.precision): test/precision_log_px_diff, ..._se, ..._max_abs
    prec = metrics.get("precision") or {}
    numbers.update({f"precision_{k}": v for k, v in prec.items() if k.startswith("log_px_diff")})
    if metrics.get("converged") is not None:
        numbers["converged"] = float(metrics["converged"])
        client.set_tag(run_id, CONVERGED_TAG, str(bool(metrics["converged"])).lower())
    # what the numbers measured (compare.measurement): tags, which a later evaluation of the run updates with
    # its numbers, where the eval.* params keep the first evaluation's values
    client.set_tag(run_id, K_TAG, k)
    if test_set is not None:
        client.set_tag(run_id, TEST_SET_TAG, test_set)
    if metrics.get("checkpoint_sha256"):  # which weights (experiment_runs: a model trained further since)
        client.set_tag(run_id, EVALUATED_CKPT_TAG, str(metrics["checkpoint_sha256"])[:12])
    tag_environment(client, run_id, metrics, "eval")
    log_metrics(client, run_id, numbers, prefix="test/", space=space)
    name = metric_name("test/log_px_ladder", space)
    client.log_batch(run_id, metrics=[Metric(name, r["log_px"], 0, r["k"]) for r in metrics["log_px_ladder"]])
    trained = _training_record(out_dir / "metrics" / "train.json")
    describe(client, run_id, cfg, train=trained, evaluation=metrics)
    client.log_artifact(run_id, str(out_dir / "metrics" / "eval.json"), "metrics")


def _training_record(path: Path) -> dict[str, Any] | None:
    """metrics/train.json for the run's description; None, with a warning naming it, when it is missing or
    damaged (a training killed while writing it): the evaluation's numbers are whole and still logged, the
    description then leaves out the training's, and the report refuses the file in its own one line."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        record = err
    if isinstance(record, dict):
        return record
    why = f"not valid JSON ({record})" if isinstance(record, Exception) else "not a JSON object"
    log.warning("%s: %s; the MLflow run's description leaves out the training's numbers", path, why)
    return None


def evaluation_run(client, run_id: str, cfg: Config, k: str, test_set: str | None) -> str:
    """The run an evaluation of training run `run_id` is logged to: that run, unless it already holds an
    evaluation of another measurement (another K or test set: `dvc exp run -S eval.num_samples=5000` on a
    trained model); then the child of it (tag vaerepro.evaluates) that holds an earlier evaluation of this
    measurement, whose numbers it replaces (evaluation_children), or else a new child, so that neither
    evaluation's numbers are shown under the other's K, and no measurement in two runs. MLflow params cannot
    change, and metrics show the latest value."""
    run = client.get_run(run_id)
    tags, params = run.data.tags, run.data.params
    done_k = tags.get(K_TAG)
    if done_k is None:  # evaluated before these tags existed, or not evaluated yet
        if metric_name("test/log_px", space_name(cfg.data_space, cfg.improper)) not in run.data.metrics:
            return run_id
        done_k = tags.get("changed.eval.num_samples", params.get("eval.num_samples"))
    if done_k == k and tags.get(TEST_SET_TAG, test_set) == test_set:
        return run_id  # the same measurement again (e.g. after a code change): it replaces the numbers
    if earlier := evaluation_children(client, run, k, test_set):
        # the same measurement as an earlier evaluation run of this training: it replaces that run's numbers,
        # as above, instead of a second run showing the same measurement again
        chosen = earlier[0].info.run_id
        tag_dvc_experiment(client, chosen, earlier[0].data.tags)  # its numbers are this evaluation's now
        for r in earlier[1:]:  # made before this lookup existed; see evaluation_children
            if r.info.status == "RUNNING":
                reason = f"left RUNNING by an earlier evaluation; this measurement is now in run {chosen}"
                end_run(client, r.info.run_id, "KILLED", reason)
        log.info(
            "run %s holds an evaluation with K=%s: this one, K=%s, replaces the numbers of run %s, the same "
            "measurement's",
            run_id,
            done_k,
            k,
            chosen,
        )
        return chosen
    kept = {
        key: v
        for key, v in tags.items()
        if not key.startswith(("mlflow.", "changed.", "dvc."))
        and key not in (K_TAG, TEST_SET_TAG, FAILURE_TAG, CONVERGED_TAG)  # the evaluation's own
    }
    kept[PROCESS_TAG] = signals.this_process()  # this evaluation's process, not the training's
    # the DVC experiment that made this evaluation, not the one that trained the model (the training's tags)
    new = client.create_run(
        run.info.experiment_id,
        run_name=f"{run.info.run_name}-K{k}",
        tags={**kept, **dvc_experiment_tags(), "mlflow.parentRunId": run_id, EVALUATES_TAG: run_id},
    ).info.run_id
    log_config(client, new, cfg.to_dict())
    if cfg.train.lr_candidates is not None and (chosen := params.get("train/lr_selected")) is not None:
        # the rate the model trained at, which log_config leaves out: the pilots' choice, as the training's
        # run holds it (TrainingRun.finish)
        log_params(client, new, {name: chosen for name in ("train.lr", "train/lr_selected")})
    log.info("run %s holds an evaluation with K=%s: this one, K=%s, goes to run %s", run_id, done_k, k, new)
    return new


def evaluation_children(client, run, k: str, test_set: str | None) -> list:
    """The evaluation runs (tag vaerepro.evaluates, evaluation_run) of training run `run` (an MLflow Run)
    that hold this measurement, K and test set, newest first (latest start; on a tie the larger run id).
    A child without a test-set tag is not taken for one with it: it may be of other test images, and its
    numbers would be replaced under another label.

    There is one at most, except from evaluations before this lookup existed, which made a new child each
    time: the newest is the one an evaluation goes to, and the one the comparison shows (experiment_runs
    keeps the newest run of each measurement of a training run); the older ones stay in the store, an
    earlier evaluation of that measurement, left out of the comparison, and one still RUNNING (no report
    came after it) is ended KILLED by evaluation_run, with the reason, never left RUNNING."""
    runs = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`{EVALUATES_TAG}` = '{run.info.run_id}' and tags.`{K_TAG}` = '{k}'",
    )
    same = [r for r in runs if r.data.tags.get(TEST_SET_TAG) == test_set]
    return sorted(same, key=lambda r: (r.info.start_time or 0, r.info.run_id), reverse=True)


def stale_reason(evaluated: str | None, now: str | None) -> str | None:
    """Why a run's test numbers, of models/best.ckpt `evaluated` (EVALUATED_CKPT_TAG: 12 hex digits), are not
    of the model its training run holds now, best.ckpt `now` (BEST_CKPT_TAG); None when they are, or when
    either is unknown (a run logged before these tags)."""
    if not (evaluated and now) or evaluated == now:
        return None
    return (  # its start is what the UI's narrow column shows
        f"numbers of replaced weights: models/best.ckpt {evaluated}, which its training, trained further "
        f"since, replaced with {now}"
    )


def label_stale_numbers(client, trained: str) -> None:
    """Label, in the UI, the numbers of training run `trained` and of its evaluation runs (other K) that are
    of a best.ckpt the training has since replaced (a training resumed after its evaluation): STALE_TAG, and
    the reason atop the description. Lift both from a run whose numbers are of the training's best.ckpt
    again (an evaluation of the new weights). MLflow cannot delete metric points, so the stale numbers stay
    in their columns; the tag says beside them that they are not the run's model's."""
    run = client.get_run(trained)
    now = run.data.tags.get(BEST_CKPT_TAG)
    if not now:  # an evaluation logged before its training finished (or a run without the tag): unknown
        return
    children = client.search_runs([run.info.experiment_id], f"tags.`{EVALUATES_TAG}` = '{trained}'")
    for r in (run, *children):
        if r.info.lifecycle_stage != "active":  # deleted in the UI: MLflow refuses its tags
            continue
        tags = r.data.tags
        reason = stale_reason(tags.get(EVALUATED_CKPT_TAG), now)
        note = tags.get(NOTE_TAG, "")
        kept = note.split("  \n", 1)[1] if note.startswith(STALE_NOTE) and "  \n" in note else note
        if reason is not None:
            client.set_tag(r.info.run_id, STALE_TAG, reason)
            kept = f"{STALE_NOTE}{reason}  \n{kept}"
        elif STALE_TAG in tags:
            client.delete_tag(r.info.run_id, STALE_TAG)
        if kept != note:
            client.set_tag(r.info.run_id, NOTE_TAG, kept)


def experiment_runs(tcfg: TrackingConfig, root: Path | None = None) -> list[dict[str, Any]]:
    """Every run of the project's experiment as a plain row for the report's comparison, one per measurement
    of a trained model: of the evaluation runs of one training run with one K and test set (several, made
    before evaluation_run took the earlier one again), only the newest, whose numbers are that measurement's
    latest (evaluation_children), so that no comparison shows one measurement twice."""
    uri = tracking_uri(tcfg, root)
    db = sqlite_store_path(uri)
    try:
        client = reading_client(uri, tracking_uri_source(tcfg))
        if client is None:
            return []
        exp = client.get_experiment_by_name(tcfg.experiment)
        found = [] if exp is None else client.search_runs([exp.experiment_id], max_results=5000)
    except Exception as err:
        if db is not None and (damage := sqlite_corruption(err)) is not None:
            raise not_a_store(db, str(damage)) from None
        raise
    rows, newest = [], {}
    best = {r.info.run_id: r.data.tags.get(BEST_CKPT_TAG) for r in found}  # each training run's weights now
    for r in found:
        tags, params, metrics = r.data.tags, r.data.params, r.data.metrics
        if "data_space" not in tags:  # a parent (sweep) run or a foreign run: no numbers of its own
            continue
        rows.append(
            {
                "run_id": r.info.run_id,
                "run_name": r.info.run_name,
                "status": r.info.status,
                # with a Gaussian's variant (fixed sigma, log-variance scale): two models, never one line
                "likelihood": likelihood_label(tags.get("likelihood", params.get("likelihood.name")), params),
                "data_space": tags["data_space"],
                "improper": tags.get("improper") == "true",
                "latent_dim": int(tags.get("latent_dim", params.get("model.latent_dim", 0))),
                "source": tags.get("source"),
                # what the estimates measured (compare.measurement); runs evaluated before these tags have
                # K from their param (or the tag a changed value went to) and an unrecorded test set
                "test_set": tags.get(TEST_SET_TAG),
                "num_samples": tags.get(
                    K_TAG, tags.get("changed.eval.num_samples", params.get("eval.num_samples"))
                ),
            }
        )
        # numbers of weights the training has since replaced (resumed with more epochs after its evaluation):
        # not a result of the model its run now holds
        # (from the checkpoint tags, not STALE_TAG: a run logged before that tag existed is told too)
        now = best.get(tags.get(EVALUATES_TAG, r.info.run_id))
        if reason := stale_reason(tags.get(EVALUATED_CKPT_TAG), now):
            rows[-1]["stale"] = reason
        # the evaluation metrics by their plain names (test/kl, binary/test/log_px -> kl, log_px), without
        # letting a metric overwrite the run's own descriptors
        own = f"{space_name(rows[-1]['data_space'], rows[-1]['improper'])}/test/"
        for k, v in metrics.items():
            name = k.removeprefix(own) if k.startswith(own) else k.removeprefix("test/")
            if name != k and "/" not in name and name not in rows[-1]:
                rows[-1][name] = v
        # (the model: the training run, which an evaluation run names; K; test set) -> the newest run's id
        key = (tags.get(EVALUATES_TAG, r.info.run_id), rows[-1]["num_samples"], rows[-1]["test_set"])
        order = (r.info.start_time or 0, r.info.run_id)
        if key not in newest or order > newest[key][0]:
            newest[key] = (order, r.info.run_id)
    kept = {run_id for _, run_id in newest.values()}
    return [row for row in rows if row["run_id"] in kept]
