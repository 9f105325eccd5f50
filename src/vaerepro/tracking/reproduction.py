"""A reproduction's MLflow runs: the reproduction's run (the parent) and its seeds' runs (its children).

`vaerepro reproduce NAME` makes the parent here, before the first seed, tagged with the preset (`--resume`
puts the recorded one back to RUNNING: a reproduction has one parent however often it was resumed); each
seed is a `vaerepro run` process whose training makes its own run, tagged as the parent's child by
runs.run_tags from the environment this module gives it (VAEREPRO_PARENT_RUN_ID, MLFLOW_TRACKING_URI).
After a seed, its run is tagged with the preset and the seed; at the end the parent gets the verdict
(tags), the numbers across seeds (metrics), the reproduction card (artifacts under card/) and its status.

MLflow is imported inside the functions, as in the rest of this package.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vaerepro.config import TrackingConfig
from vaerepro.reproductions.judge import UNIT, Measurement, Preset, Published
from vaerepro.tracking.names import space_name
from vaerepro.tracking.runs import FAILURE_TAG, NOTE_TAG, end_run, read_run_id
from vaerepro.tracking.store import ensure_experiment
from vaerepro.versions import git_commit

log = logging.getLogger("vaerepro")

ENV_PARENT_RUN_ID = "VAEREPRO_PARENT_RUN_ID"  # read by runs.run_tags: the run it makes is a child
MAX_PARAM_CHARS = 6000  # MLflow refuses a longer param value
MAX_TAG_CHARS = 5000  # the most of a long text (the reasons) kept in a tag


@dataclass(frozen=True)
class ReproductionRun:
    """The parent run of one reproduction, in the store at `uri`."""

    uri: str
    run_id: str

    def child_env(self) -> dict[str, str]:
        """What a seed's process needs in its environment: its run is then this run's child, in this store."""
        return {"MLFLOW_TRACKING_URI": self.uri, ENV_PARENT_RUN_ID: self.run_id}


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def open_parent(
    tcfg: TrackingConfig, root: Path, preset: Preset, *, smoke: bool, params: Mapping[str, str]
) -> ReproductionRun:
    """Create the reproduction's run (RUNNING) in the project's experiment, the store created if need be;
    `params`: the seeds, the overrides and the like, as text."""
    uri, exp_id = ensure_experiment(tcfg, root)
    client = _client(uri)
    tags = {
        "vaerepro.role": "reproduction",
        "vaerepro.preset": preset.name,
        "vaerepro.paper": preset.paper,
        "vaerepro.smoke": str(smoke).lower(),
        NOTE_TAG: f"Reproduction of {preset.title} ({preset.paper})"
        f"{' (smoke run)' if smoke else ''}: "
        "one child run per seed; the verdict is set when the last seed has finished.",
    }
    if (commit := git_commit(root)) is not None:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    run = client.create_run(exp_id, run_name=f"reproduce-{preset.name}{'-smoke' if smoke else ''}", tags=tags)
    for k, v in params.items():
        client.log_param(run.info.run_id, k, str(v)[:MAX_PARAM_CHARS])
    return ReproductionRun(uri, run.info.run_id)


def parent_run(
    tcfg: TrackingConfig,
    root: Path,
    preset: Preset,
    recorded: tuple[str, str] | None,
    *,
    smoke: bool,
    params: Mapping[str, str],
    resumed: int = 0,
) -> ReproductionRun:
    """The reproduction's run: a new one (`open_parent`), or, resuming (`recorded`: the tracking uri and run
    id the reproduction recorded; `resumed`: how many times it has been resumed, this one included), the
    recorded run back to RUNNING, its failure tag from the stop removed and the count as the
    `vaerepro.resumed` tag. When the store no longer has the recorded run (deleted, or another store now),
    a new one, said in the log."""
    from mlflow.exceptions import MlflowException

    if recorded is None:
        return open_parent(tcfg, root, preset, smoke=smoke, params=params)
    uri, _ = ensure_experiment(tcfg, root)
    client = _client(uri)
    try:
        run = client.get_run(recorded[1])
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        rep = open_parent(tcfg, root, preset, smoke=smoke, params=params)
        log.warning(
            "the reproduction's MLflow run %s (recorded in %s) is not in %s: it goes on in a new run, %s",
            recorded[1], recorded[0], uri, rep.run_id,
        )  # fmt: skip
        return rep
    client.update_run(run.info.run_id, status="RUNNING")
    if FAILURE_TAG in run.data.tags:
        client.delete_tag(run.info.run_id, FAILURE_TAG)
    client.set_tag(run.info.run_id, "vaerepro.resumed", str(resumed))
    return ReproductionRun(uri, run.info.run_id)


def adopt_seed_run(rep: ReproductionRun, run_id: str, *, preset: str, seed: int) -> bool:
    """Tag a seed's run as the parent's child, with the preset and the seed (a seed resumed into a new
    parent keeps the run it was made with); False, and a warning, when the store has no such run."""
    from mlflow.exceptions import MlflowException

    client = _client(rep.uri)
    tags = {"mlflow.parentRunId": rep.run_id, "vaerepro.role": "seed", "vaerepro.preset": preset}
    try:
        client.get_run(run_id)
    except MlflowException:
        log.warning(
            "seed %d's MLflow run %s is not in %s: the reproduction's run lacks it", seed, run_id, rep.uri
        )
        return False
    for k, v in (tags | {"vaerepro.seed": str(seed)}).items():
        client.set_tag(run_id, k, v)
    return True


def tag_seed_run(rep: ReproductionRun, model_dir: Path, *, preset: str, seed: int) -> str | None:
    """Tag the run a seed's training made (models/mlflow_run.json names it) as `adopt_seed_run` does; its
    id, or None when the seed made no run."""
    run_id, _ = read_run_id(model_dir)
    if not run_id:
        return None
    adopt_seed_run(rep, run_id, preset=preset, seed=seed)
    return run_id


def _metric_name(pub: Published, space: str | None = None) -> str:
    """The parent run's name for a published value's numbers: test_log_px, test_elbo, train_elbo,
    test_knn_accuracy, under a data space when its unit is one (names.py: a nats number is never put on
    the same axis as another space's): `space`, the space the run measured in (names.space_name), else the
    published value's."""
    file, _, key = pub.measured.partition(":")
    name = key if file == "train.json" else f"test_{key}"
    space = space or space_name(pub.data_space, pub.improper)
    return f"{space}/reproduction/{name}" if pub.unit == UNIT else f"reproduction/{name}"


def finish_parent(
    rep: ReproductionRun,
    verdict: str,
    measurements: Sequence[Measurement],
    title: str,
    *card: Path,
    figures: Sequence[Path] = (),
    space: str | None = None,
) -> None:
    """The verdict as tags (`vaerepro.verdict`, and `vaerepro.verdict.<value>` for each published value),
    the reasons as a tag (one per line) and in the description with the notes (judge.Measurement.notes),
    each value's numbers across seeds as
    metrics (<name>_mean, _half_width, _sd, _se_examples, _difference, _published), the `card` files under
    card/ (its figures under card/<their folder>/), then the run FINISHED. `space`: the data space the seeds
    measured in (names.space_name of the run's config): the numbers are named under it, and where it is not
    the published value's, the published number and the difference (of two units) are not logged."""
    from mlflow.entities import Metric

    client = _client(rep.uri)
    now = int(time.time() * 1000)  # ms
    batch, reasons, notes = [], {}, {}
    client.set_tag(rep.run_id, "vaerepro.verdict", verdict)
    for m in measurements:
        name, a, v = _metric_name(m.published, space), m.aggregate, m.verdict
        client.set_tag(rep.run_id, f"vaerepro.verdict.{name.replace('/', '.')}", v.kind)
        reasons |= dict.fromkeys(v.reasons)
        notes |= dict.fromkeys(m.notes)
        numbers = {"mean": a.mean, "half_width": a.half_width, "sd": a.sd, "se_examples": a.se_examples}
        if name == _metric_name(m.published):  # the paper's number is in the run's unit
            numbers |= {"difference": v.difference, "published": m.published.value}
        batch += [Metric(f"{name}_{k}", float(x), now, 0) for k, x in numbers.items() if x is not None]
    client.set_tag(rep.run_id, "vaerepro.reasons", "\n".join(reasons)[:MAX_TAG_CHARS])
    note = f"**{title}**: {verdict}  \n" + "  \n".join([*list(reasons)[:20], *(f"Note: {n}" for n in notes)])
    client.set_tag(rep.run_id, NOTE_TAG, note)
    if batch:
        client.log_batch(rep.run_id, metrics=batch)
    for f in card:
        client.log_artifact(rep.run_id, str(f), "card")
    for f in figures:
        client.log_artifact(rep.run_id, str(f), f"card/{f.parent.name}")
    client.set_terminated(rep.run_id, "FINISHED")


def end_parent(rep: ReproductionRun, status: str, reason: BaseException | str | None = None) -> None:
    """End the reproduction's run FAILED or KILLED (a seed failed or was stopped), the reason as a tag."""
    end_run(_client(rep.uri), rep.run_id, status, reason)
