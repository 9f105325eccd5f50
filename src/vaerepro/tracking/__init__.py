"""MLflow, in one place: every MLflow call vaerepro makes is in this package.

    store.py         where the store is (tracking uri), creating it and the experiment safely, reading it
    names.py         the names of numbers in MLflow (space-qualified where the unit depends on the data space)
    runs.py          one run across the pipeline's stages: tags, dataset, config, description, end
    evaluations.py   an evaluation's numbers: their run (a child per other K), the measurements read back
    training.py      the train stage's run and Lightning's MLflow logger (imports Lightning: not re-exported)
    sweep.py         a sweep's parent run and its trials' child runs
    reproduction.py  a reproduction's parent run and its seeds' child runs
    ui.py            links into the MLflow UI and its saved views (no MLflow calls)

The stages (prepare, train, evaluate, report) do not import it: the command line hands training a
`training.TrainingRun`, and logs evaluation and the report after those stages have written their files.
"""

from vaerepro.tracking.evaluations import experiment_runs, log_evaluation
from vaerepro.tracking.names import BOOKKEEPING, SPACE_FREE, SPACES, metric_name, space_name
from vaerepro.tracking.runs import (
    EVAL_RUN_DIR,
    FAILURE_TAG,
    RUN_FILE,
    check_evaluation_run,
    complete_curve,
    describe,
    end_recorded_run,
    end_run,
    headline,
    log_config,
    log_dataset,
    log_metrics,
    log_report,
    read_run_id,
    run_tags,
    stage_run_id,
    status_of,
    write_run_id,
)
from vaerepro.tracking.store import (
    LOCAL_UI,
    artifact_location,
    check_sqlite_store,
    check_store,
    check_tracking_server,
    ensure_experiment,
    is_server,
    parallel_links,
    reading_client,
    sqlite_store_path,
    tracking_uri,
    tracking_uri_source,
    ui_url,
)

__all__ = [
    "BOOKKEEPING",
    "EVAL_RUN_DIR",
    "FAILURE_TAG",
    "LOCAL_UI",
    "RUN_FILE",
    "SPACES",
    "SPACE_FREE",
    "artifact_location",
    "check_evaluation_run",
    "check_sqlite_store",
    "check_store",
    "check_tracking_server",
    "complete_curve",
    "describe",
    "end_recorded_run",
    "end_run",
    "ensure_experiment",
    "experiment_runs",
    "headline",
    "is_server",
    "log_config",
    "log_dataset",
    "log_evaluation",
    "log_metrics",
    "log_report",
    "metric_name",
    "parallel_links",
    "read_run_id",
    "reading_client",
    "run_tags",
    "stage_run_id",
    "space_name",
    "sqlite_store_path",
    "status_of",
    "tracking_uri",
    "tracking_uri_source",
    "ui_url",
    "write_run_id",
]
