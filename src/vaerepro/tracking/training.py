"""MLflow for the train stage: Lightning's MLflow logger with buffered metrics, and `TrainingRun`, the run a
training records itself in (created, or continued when resuming; described, and ended).

`train.train` knows nothing of MLflow: whoever starts a training (the command line) hands it a `TrainingRun`,
which it opens on global rank 0 once the trainer knows its rank.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from vaerepro import signals
from vaerepro.config import Config
from vaerepro.tracking import evaluations, runs
from vaerepro.tracking.names import BEST_CKPT_TAG, metric_name, space_name
from vaerepro.tracking.store import ensure_experiment

log = logging.getLogger(__name__)


class BufferedMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger, except that metrics reach the store in one batch every `flush_every_s`
    seconds (0: at every call), when training ends and when it fails, each with the time and step at which it
    was logged.

    Why: every batch MLflow writes is one SQL transaction of a few milliseconds of Python (SQLAlchemy), and
    Lightning logs once an epoch (validation end: the training and validation means together);
    `synchronous=False` moves that work to MLflow's writer thread, which then competes with training for
    the GIL. Buffered, a training's curve shows in the MLflow UI at most `flush_every_s` late, which is how
    TensorBoard's writer (flush_secs) and Lightning's CSVLogger (flush_logs_every_n_steps) treat their files
    too.
    """

    def __init__(
        self, *args: Any, flush_every_s: float, space: str, synchronous: bool = False, **kwargs: Any
    ):
        super().__init__(*args, synchronous=synchronous, **kwargs)
        self.synchronous = synchronous  # MlflowClient.log_batch's: False sends from MLflow's writer thread
        self.flush_every_s = float(flush_every_s)
        self.space = space  # metric names carry the run's data space (names.metric_name)
        self._pending: list = []  # mlflow.entities.Metric, in the order they were logged
        self._last_flush = time.monotonic()

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        # Per-epoch curves against the epoch, not the optimiser step Lightning passes: Lightning adds the
        # epoch to every metrics dict it logs, and epochs are how a VAE's curves are read and compared
        # (the step depends on the batch size and the number of devices).
        if "epoch" in metrics:
            step = int(metrics["epoch"])
        for key, value in metrics.items():
            # the names MLflow accepts, as MLFlowLogger.log_metrics cleans them (no prefix is set here)
            name = metric_name(re.sub(r"[^a-zA-Z0-9_/. -]+", "", key), self.space)
            if name is not None:
                self._pending.append(
                    Metric(key=name, value=float(value), timestamp=timestamp_ms, step=step or 0)
                )
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        """Send the buffered metrics to the store (one batch; MLflow splits it at its per-batch limit)."""
        self._last_flush = time.monotonic()
        if self._pending:
            pending, self._pending = self._pending, []
            self.experiment.log_batch(run_id=self.run_id, metrics=pending, synchronous=self.synchronous)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:  # Lightning calls it at the end and on an error
        # Only the metrics: whether the run ended, and how, is TrainingRun's and the pipeline's to say (a run
        # is FINISHED when every stage has finished, KILLED when a signal stopped it, FAILED otherwise).
        self.flush()


class TrainingRun:
    """The MLflow run of one training in out_dir/models, for `train.train(..., tracker=...)`.

    open: creates the run (or, resuming, continues the one models/mlflow_run.json names when it is in the
    same store), records its id there at once (a crashed training is resumed into it), logs the config and
    the dataset (or, resuming, the checkpoint's epochs the run lacks); returns the Lightning logger.
    finish: the final numbers, the description and best.ckpt; the run ends FINISHED when `finish` is true
    (the pipeline passes False and ends it after its last stage). fail: FAILED with the reason as a tag, or
    KILLED when a signal stopped training. With tracking disabled, `finish` still records "no run" in
    models/mlflow_run.json, so later stages never add to a run an earlier training left there.
    """

    def __init__(self, cfg: Config, root: Path, model_dir: Path, *, finish: bool = True):
        self.cfg, self.root, self.model_dir, self.finish_run = cfg, Path(root), Path(model_dir), finish
        self.logger: BufferedMLFlowLogger | None = None
        self.uri: str | None = None

    @property
    def run_id(self) -> str | None:
        return self.logger.run_id if self.logger is not None else None

    def open(
        self,
        *,
        resumed_curve: Sequence[Mapping[str, Any]] | None,
        data_meta: Mapping[str, Any],
        keys,
        chosen_lr: float | None = None,
        environment: Mapping[str, Any] | None = None,
    ):
        """Start recording; keys: the (training, validation) per-epoch metric keys as training logs them;
        chosen_lr: the rate train.lr_candidates' pilots chose; environment: this training's device, versions
        and commit, as train.json will record them. Returns the Lightning logger to attach, or None when
        tracking is disabled."""
        if not self.cfg.tracking.enabled:
            return None
        self.uri, _ = ensure_experiment(self.cfg.tracking, self.root)
        continued, orphaned = None, None
        if resumed_curve is not None:
            continued, orphaned = self._resumable_run(len(resumed_curve), keys)
        self.logger = self._logger(continued, data_meta)
        run = (self.logger.experiment, self.logger.run_id)
        runs.write_run_id(self.model_dir, self.run_id, self.uri)
        runs.log_config(*run, self.cfg.to_dict())
        if chosen_lr is not None:  # before fitting: a training that then fails or is killed shows it too
            self._log_chosen_lr(chosen_lr)
        if environment is not None:  # before fitting too: a failed run says where and with what it ran
            runs.tag_environment(*run, environment, "train")
        if resumed_curve is not None:  # epochs the checkpoint holds that never reached the store (a kill -9)
            runs.complete_curve(*run, list(resumed_curve), keys, self.logger.space)
        if continued is None:  # a new run: its data set (a resumed training's too, when its run is gone)
            runs.log_dataset(*run, data_meta, self.cfg.data_space, self.cfg.data.source)
        if orphaned is not None:  # the run this training left, whose last epochs are not its history
            runs.supersede(self.logger.experiment, *orphaned, self.run_id)
        try:  # runs dead processes left RUNNING, here and in models/ (no later stage can end those)
            runs.end_abandoned(self.logger.experiment, self.logger.experiment_id, self.model_dir, self.run_id)
        except Exception as err:  # noqa: BLE001 - other runs' bookkeeping never stops this training
            log.warning("could not look for MLflow runs that dead processes left RUNNING: %s", err)
        return self.logger

    def finish(self, metrics: Mapping[str, Any]) -> None:
        runs.write_run_id(self.model_dir, self.run_id, self.uri)
        if self.logger is None:
            return
        run = (self.logger.experiment, self.logger.run_id)
        runs.log_metrics(*run, metrics, prefix="final/", space=self.logger.space)
        if (selection := metrics.get("lr_selection")) is not None:
            self._log_chosen_lr(selection["chosen"])  # as open did, for a tracker opened without it
        runs.describe(*run, self.cfg, train=metrics)
        runs.tag_environment(*run, metrics, "train")  # as train.json (open tagged the same from it)
        if metrics.get("best_checkpoint_sha256"):  # its weights now (evaluations.experiment_runs)
            self.logger.experiment.set_tag(self.run_id, BEST_CKPT_TAG, metrics["best_checkpoint_sha256"][:12])
            # a resumed training's new weights: its run's and evaluation runs' earlier test numbers are not
            # of them, which the UI's table then says (the report's comparison tells by the same tags)
            evaluations.label_stale_numbers(self.logger.experiment, self.run_id)
        self.logger.experiment.log_artifact(self.run_id, str(self.model_dir / "best.ckpt"), "checkpoints")
        if self.finish_run:
            runs.end_run(*run, "FINISHED")

    def _log_chosen_lr(self, lr: float) -> None:
        """The rate training runs at, the step-size pilots' choice from train.lr_candidates, as train.lr (the
        column runs are compared by; log_config left the configured, unused value out) and
        train/lr_selected. A resumed run logs the same value again (its checkpoint recorded the choice); a
        run an earlier vaerepro logged train.lr to, the configured value, gets changed.train.lr."""
        runs.log_params(
            self.logger.experiment, self.run_id, {n: lr for n in ("train.lr", "train/lr_selected")}
        )

    def fail(self, exc: BaseException, *, interrupted: bool) -> None:
        if self.logger is not None:
            runs.end_run(
                self.logger.experiment, self.run_id, runs.status_of(exc, interrupted=interrupted), exc
            )

    @property
    def space(self) -> str:
        return space_name(self.cfg.data_space, self.cfg.improper)

    def _resumable_run(
        self, epochs: int, keys: tuple[str, str]
    ) -> tuple[str | None, tuple[str, list[int]] | None]:
        """For a training resumed from a checkpoint of `epochs` epochs: (the run to continue, or None for a
        new one; (the earlier run, its epochs past the checkpoint) when that run is left for that reason)."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        previous, previous_uri = runs.read_run_id(self.model_dir)
        if not previous or previous_uri != self.uri:
            return None, None
        client = MlflowClient(self.uri)
        try:
            stage = client.get_run(previous).info.lifecycle_stage
        except MlflowException:
            log.warning("MLflow run %s is not in %s: resuming into a new run", previous, self.uri)
            return None, None
        if stage != "active":  # deleted in the UI (get_run still finds it; logging to it fails)
            log.warning("MLflow run %s is %s: resuming into a new run", previous, stage)
            return None, None
        if beyond := runs.steps_beyond(client, previous, keys, self.space, epochs):
            # Epochs the killed process sent after its last checkpoint: the resumed training trains them
            # again from the checkpoint, another history; one run holding both would show two values at each
            # of those epochs, and MLflow cannot delete metric points.
            log.warning(
                "MLflow run %s holds epochs %d-%d past models/last.ckpt, from the training that was stopped: "
                "resuming into a new run, which the old one names",
                previous,
                beyond[0],
                beyond[-1],
            )
            return None, (previous, beyond)
        return previous, None

    def _logger(self, run_id: str | None, data_meta: Mapping[str, Any]) -> BufferedMLFlowLogger:
        """Lightning's MLflow logger on run `run_id`, or on a new run (its tags: runs.run_tags)."""
        cfg = self.cfg
        logger = BufferedMLFlowLogger(
            flush_every_s=cfg.tracking.flush_every_s,
            space=self.space,
            experiment_name=cfg.tracking.experiment,
            run_name=cfg.run_name,
            tracking_uri=self.uri,
            tags=None if run_id else {**runs.run_tags(cfg, self.root, data_meta), **self._whereabouts()},
            log_model=False,
            run_id=run_id,
        )
        if run_id:
            logger.experiment.update_run(run_id, status="RUNNING")
            for tag, value in self._whereabouts().items():  # this process trains into it now
                logger.experiment.set_tag(run_id, tag, value)
        return logger

    def _whereabouts(self) -> dict[str, str]:
        """The run's models/ (resolved) and the process training into it (runs.end_abandoned reads both)."""
        return {runs.MODEL_DIR_TAG: str(self.model_dir.resolve()), runs.PROCESS_TAG: signals.this_process()}
