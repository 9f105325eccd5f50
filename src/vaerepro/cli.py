"""`vaerepro` command line.

vaerepro params [OVERRIDES]     compose conf/ (+ Hydra overrides) into params.yaml
vaerepro fetch                  put the configured data source's raw files under data/
vaerepro check|prepare|train|evaluate|report [--params params.yaml] [--out .]
                                the DVC stages; each reads the resolved config (OUT/params.yaml when
                                --out names a run's directory holding one)
vaerepro run [OVERRIDES]        one configuration through every stage, outside DVC (a Hydra app:
                                --multirun, --cfg job, hydra.run.dir=... all work)
vaerepro ui [--port N] [--print-url]
                                serve the MLflow store and print the links to the runs, set up for comparing
vaerepro reproduce --list [NAME ...]
                                the papers' presets: source, published value, estimated time
vaerepro reproduce NAME [--smoke] [--seeds N] [--resume | --fresh] [--out DIR] [OVERRIDES]
                                run a preset: a run per seed, a reproduction card and a verdict

A mistake in the input (a config key, a file, a checkpoint, the tracking store) is one line on stderr naming
the key or file and the problem, exit status 2; --debug (or VAEREPRO_DEBUG=1) shows the traceback instead.
SIGTERM stops a command with exit status 143 (training at the end of its epoch, with models/last.ckpt
written) and says how to resume; Ctrl-C does the same with exit status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from vaerepro import config as config_mod
from vaerepro import params_file, quick_exit, run_dirs, run_overrides, signals
from vaerepro.config import Config, ConfigError
from vaerepro.errors import Stopped, UserError
from vaerepro.files import try_lock, write_whole

log = logging.getLogger("vaerepro")
# The name Hydra gives the job of `vaerepro run` (its app is defined in this module; its log is cli.log)
HYDRA_JOB = Path(__file__).stem


def _user_error(err: BaseException) -> str | None:
    """The one-line message for a mistake in the user's input, or None for a fault of the program."""
    if isinstance(err, UserError):
        return " ".join(str(err).split())
    if isinstance(err, OSError) and err.filename is not None:  # unwritable models/, a missing file, ...
        if isinstance(err, FileExistsError) and os.path.isfile(err.filename):  # mkdir: strerror "File exists"
            return f"{err.filename}: a file, where a directory is needed"
        return f"{err.filename}: {err.strerror or type(err).__name__}"
    return None


def _on_terminal() -> bool:
    """Progress bars only for a person watching: in a log file (a sweep trial, dvc queue, SLURM) they are
    thousands of carriage-return lines."""
    return sys.stderr.isatty()


def _raw_dir(cfg: Config, root: Path) -> Path:
    p = Path(cfg.data.raw_dir)
    return p if p.is_absolute() else root / p


def _data_path(cfg: Config) -> Path | None:
    return Path(cfg.data.path).expanduser().resolve() if cfg.data.path else None


def stage_fetch(cfg: Config, root: Path) -> Path:
    from vaerepro import data

    return data.fetch(cfg.data.source, _raw_dir(cfg, root), url=cfg.data.url, path=_data_path(cfg))


CHECK_FILE = ".params-checked"  # the check stage's output: the same text every time, so it triggers nothing


def stage_check(cfg: Config, out_dir: Path, root: Path) -> Path:
    """The refusals that need no data (the config: `load` has validated it; the trainer and the evaluation
    device on this machine; train.resume; the MLflow store, tracking.check_store; a likelihood unbounded on
    data whose files say they are not 8-bit levels), as the first stage of the DVC pipeline. DVC deletes a
    stage's outputs before it runs the stage, so a refusal inside train or evaluate (`dvc exp run -S
    model.latent_dim=0`, eval.precision=tf32 on a CPU) came after models/, metrics/ and plots/ were gone;
    prepare depends on this stage's output, so DVC runs it first whenever params.yaml changed, and stops
    there. Writes CHECK_FILE."""
    check_before_data(cfg, root)
    out = out_dir / CHECK_FILE
    write_whole(out, "params.yaml passed `vaerepro check` (the DVC pipeline's first stage; see dvc.yaml)\n")
    return out


def check_before_data(cfg: Config, root: Path) -> None:
    """The refusals of `stage_check`, which need no data: the check stage and `vaerepro run` make them
    before anything is fetched, prepared or trained."""
    from vaerepro import data, tracking
    from vaerepro.devices import check_trainer
    from vaerepro.evaluate import check_precision, eval_device

    check_trainer(cfg.trainer)
    check_precision(cfg.eval.precision, eval_device(cfg.eval.device), cfg.eval.device)
    check_no_resume_under_dvc(cfg)
    if cfg.tracking.enabled:  # the store train logs to: an address that does not answer, a damaged file
        tracking.check_store(cfg.tracking, root)
    # a likelihood unbounded on the data (a learned sigma without a floor on float pixels), where the data's
    # files tell whether they are 8-bit levels before prepare reads them (else train refuses it)
    path = _data_path(cfg)
    if (quantized := data.stored_quantized(cfg.data.source, path)) is not None:
        data.check_bounded(cfg.likelihood_object(), cfg.data_space, quantized, path or cfg.data.source)


def check_no_resume_under_dvc(cfg: Config) -> None:
    """A UserError for train.resume=true in a stage DVC runs (DVC_STAGE is set): DVC deletes a stage's
    outputs, models/ among them, before it runs the stage, so the train stage would find no last.ckpt and
    train from the start under a config that says it resumed. Checked by the check stage, before anything
    is deleted, and by the train stage (`dvc repro -s train` skips check)."""
    if cfg.train.resume and (stage := os.environ.get("DVC_STAGE")):
        raise UserError(
            f"train.resume=true under DVC (stage {stage}): DVC deletes models/ before it runs the train "
            "stage, so there is no last.ckpt to resume; resume outside DVC (`vaerepro train`), or set "
            "train.resume=false (`vaerepro params train.resume=false`)"
        )


def stage_prepare(cfg: Config, out_dir: Path, root: Path) -> dict:
    from vaerepro import data

    d = cfg.data
    return data.prepare(
        d.source,
        _raw_dir(cfg, root),
        out_dir / "prepared",
        path=_data_path(cfg),
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=d.split_seed,
        max_examples=d.max_examples,
        max_npz_bytes=d.max_npz_bytes,
        split=d.split,
        val_size=d.val_size,
    )


def stage_train(
    cfg: Config, out_dir: Path, root: Path, progress: bool = True, *, finish_run: bool = True
) -> dict:
    """Training, recorded in its MLflow run (ended FINISHED when `finish_run`: the pipeline passes False and
    ends it after its last stage), with Optuna's pruning when this process is a sweep trial."""
    from vaerepro.sweep.pruning import trial_callbacks
    from vaerepro.tracking.training import TrainingRun
    from vaerepro.train import train

    signals.check()  # a stop that Python dropped in a finalizer (the stages before): stop before this one
    check_no_resume_under_dvc(cfg)
    run = TrainingRun(cfg, root, out_dir / "models", finish=finish_run)
    return train(
        cfg, out_dir, enable_progress_bar=progress, callbacks=trial_callbacks(), tracker=run, root=root
    )


def stage_evaluate(cfg: Config, out_dir: Path, root: Path, progress: bool = True) -> dict | None:
    """Evaluation, then its numbers, verdict and eval.json added to the training's MLflow run (rank 0)."""
    from vaerepro import tracking
    from vaerepro.evaluate import evaluate

    signals.check()  # as in stage_train
    held = _hold_for_evaluation(out_dir)
    try:
        metrics = evaluate(cfg, out_dir, progress=progress, root=root)
        if metrics is not None and cfg.tracking.enabled:
            tracking.log_evaluation(cfg, out_dir, metrics)  # names the run it logged to in artifacts/
        elif metrics is not None:  # an earlier evaluation's run is not this one's: say it went to none
            tracking.write_run_id(
                out_dir / tracking.EVAL_RUN_DIR, None, None, evaluation=out_dir / "metrics" / "eval.json"
            )
    finally:
        if held is not None:
            os.close(held)  # releases the lock
    return metrics


def _hold_for_evaluation(out_dir: Path) -> int | None:
    """The lock a training holds on out_dir (train.hold), taken by the evaluation's first process for its
    files and its MLflow logging (the caller closes the descriptor); None on the other ranks, which write
    nothing, and for a directory that does not exist (evaluate names what is missing). Two evaluations of
    one directory at once (two K) interleaved eval.json, eval_summary.json, the arrays and their MLflow
    numbers; an evaluation during a training read a best.ckpt that the training then replaces."""
    import torch.distributed as dist

    if run_dirs.ddp_child() or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return None
    if not out_dir.is_dir():
        return None
    if (fd := try_lock(out_dir)) is None:
        raise UserError(
            f"{out_dir}: another evaluation or a training is running in this directory now (a `vaerepro "
            "evaluate`, `vaerepro train`, `vaerepro run` or `dvc repro`); nothing was changed: wait for it "
            "to end, then evaluate"
        )
    return fd


def stage_report(cfg: Config, out_dir: Path, root: Path) -> dict:
    from vaerepro import tracking
    from vaerepro.report import check_config, config_drift, config_labels, load_results, write_report

    signals.check()  # as in stage_train
    # before any file is written: the result files are whole, of one model and of this configuration (their
    # own errors first), and the run the evaluation named holds these numbers
    ev, _ = load_results(out_dir)
    check_config(out_dir / "metrics" / "eval.json", ev, config_labels(cfg.to_dict(), cfg.data_space))
    if drift := config_drift(ev, cfg.to_dict()):
        shown = ", ".join(drift[:5]) + (f" and {len(drift) - 5} more" if len(drift) > 5 else "")
        log.warning(
            "the report prints the configuration %s was evaluated under, which differs from this one in %s",
            out_dir / "metrics" / "eval.json",
            shown,
        )
    runs, this_run = [], None
    if cfg.tracking.enabled:
        tracking.check_evaluation_run(out_dir)
        runs, this_run = tracking.experiment_runs(cfg.tracking, root), tracking.stage_run_id(out_dir)[0]
    paths = write_report(out_dir, cfg.to_dict(), runs, this_run=this_run)
    log.info("report: %s (and %s)", paths["html"], Path(paths["md"]).name)
    if cfg.tracking.enabled:
        tracking.log_report(out_dir, Path(paths["html"]).parent)
        _print_ui_link(cfg, root)
    return paths


def _print_ui_link(cfg: Config, root: Path) -> None:
    """Where to compare this run with the others in the MLflow UI."""
    from vaerepro import tracking

    try:
        uri, exp_id = tracking.ensure_experiment(cfg.tracking, root)
    except Exception as err:  # noqa: BLE001 - the stage's work is done and recorded; only the link is lost
        log.warning("no link to the MLflow UI: %s", err)
        return
    serve = "" if tracking.is_server(uri) else " (serve the store first: vaerepro ui)"
    log.info("compare runs in MLflow: %s%s", tracking.ui_url(uri, exp_id), serve)


LAUNCHER_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _external_launcher() -> str | None:
    """'torchrun' or 'srun' when this process is one of several that a cluster launcher started."""
    env = os.environ
    if "RANK" in env and int(env.get("WORLD_SIZE", 1)) > 1:
        return "torchrun"
    if int(env.get("SLURM_NTASKS", 1)) > 1 and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return "srun"
    return None


def result_line(cfg: Config, metrics: dict) -> str:
    """The line `vaerepro run` ends with: log p(x) ± SE in nats per example, with what it is a number of (the
    likelihood and data space, IMPROPER for a Bernoulli on grey levels, which is no normalised density), the K
    it was estimated with and its convergence verdict, as the report and the MLflow description give them."""
    verdict = {True: ", converged", False: ", NOT CONVERGED"}.get(metrics.get("converged"), "")
    k = metrics.get("num_samples", cfg.eval.num_samples)
    return (
        f"log p(x) = {metrics['log_px']:.3f} ± {metrics['log_px_se']:.3f} nats/example "
        f"({cfg.numbers_of}; K = {k}{verdict})"
    )


def run_pipeline(
    cfg: Config, out_dir: Path, root: Path, progress: bool = True, *, checked: bool = False
) -> dict | None:
    """prepare → train → evaluate → report for one configuration in out_dir; returns eval metrics.

    Under DDP (trainer=ddp), Lightning re-runs this command for ranks 1..N-1 once training starts; those
    join training and the sharded evaluation only, write nothing, and return None. `checked`: the caller
    has run check_before_data already (`vaerepro run`, before it marks the run's directory).
    """
    import torch.distributed as dist

    if run_dirs.ddp_child():
        try:
            stage_train(cfg, out_dir, root, progress=False, finish_run=False)
            if dist.is_available() and dist.is_initialized():  # the DDP process group: share out evaluation
                stage_evaluate(cfg, out_dir, root, progress=False)
        finally:
            _leave_process_group()
        return None
    if not checked:
        # what the check stage refuses (trainer=gpu without a GPU, eval.precision=tf32 where evaluation runs
        # on the CPU, a store that does not answer, ...) fails now, not after prepare or training
        check_before_data(cfg, root)
    # Lightning's launcher leaves its variables in this process's environment (LOCAL_RANK=0, ...); a next
    # job of a --multirun in this process would take them for an external launch and start no processes.
    # MLflow exports the uri it is given (mlflow.set_tracking_uri, Lightning's MLFlowLogger) as
    # MLFLOW_TRACKING_URI, which tracking.tracking_uri reads as the user's setting before tracking.uri: the
    # next job of `tracking.uri=A,B` logged to A. Both are put back as the user had them after each job.
    saved = {k: os.environ.get(k) for k in (*LAUNCHER_ENV, "MLFLOW_TRACKING_URI")}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_whole(out_dir / "params.yaml", config_mod.dump(cfg.to_dict()))
        stage_fetch(cfg, root)
        stage_prepare(cfg, out_dir, root)
        # The MLflow run stays RUNNING after training (train ends it FAILED or KILLED itself): it is
        # FINISHED when the report, the last stage, is written, and FAILED or KILLED if a stage after
        # training does not finish.
        stage_train(cfg, out_dir, root, progress, finish_run=False)
        evaluated = False
        try:
            metrics = stage_evaluate(cfg, out_dir, root, progress)
            evaluated = True
            stage_report(cfg, out_dir, root)
        except BaseException as exc:
            _end_run_after(cfg, out_dir, exc, evaluated=evaluated)
            raise
        return metrics
    finally:
        _leave_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _end_run_after(cfg: Config, out_dir: Path, exc: BaseException, *, evaluated: bool) -> None:
    """Mark FAILED or KILLED (the reason as a tag) the run a stage after training did not finish in: the
    evaluation's once it has logged (`evaluated`: the report failed), else the training's."""
    if cfg.tracking.enabled:
        from vaerepro import tracking

        tracking.end_recorded_run(out_dir, tracking.status_of(exc), exc, evaluated=evaluated)


STAGES = {
    "check": stage_check,
    "prepare": stage_prepare,
    "train": stage_train,
    "evaluate": stage_evaluate,
    "report": stage_report,
}


def _ddp_relaunch_argv(command: list[str], out_dir: Path) -> None:
    """Point Lightning's DDP re-launch at this job.

    Lightning starts ranks 1..N-1 by running sys.argv again (after `python`, or `python -m` the __main__
    module) plus hydra.run.dir=<HydraConfig run.dir>. Make that `command` (the program and what came before
    the Hydra arguments, e.g. `vaerepro run`) with this job's own overrides (a sweep's choice included, no
    --multirun), and the directory this job's, which in a sweep is not run.dir. Children log to stdout only.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    hc = HydraConfig.get()
    sys.argv = [*command, *hc.overrides.task, "hydra/job_logging=stdout"]
    with read_write(hc.run):
        hc.run.dir = str(out_dir)


def _hydra_run(argv: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    root = config_mod.find_project_root()
    launcher = _external_launcher()
    if launcher is not None:
        raise ConfigError(
            f"`vaerepro run` starts its own DDP processes (trainer=ddp trainer.devices=N); under {launcher}, "
            "run the stages instead: vaerepro params ...; vaerepro prepare; "
            f"{launcher} ... vaerepro train; {launcher} ... vaerepro evaluate; vaerepro report "
            "(docs/scaling.md)"
        )
    # the command line before the Hydra arguments: `vaerepro run` (or `python -m vaerepro.cli run`, ...)
    given = sys.argv
    command = given[: len(given) - len(argv)] if argv and given[-len(argv) :] == argv else [given[0], "run"]

    argv = run_dirs.at_project_root(argv, root)
    run_overrides.check_overrides(argv, root)
    claimed = None if run_dirs.ddp_child() else run_dirs.claim_named(argv, root, HYDRA_JOB)
    if claimed is not None:  # Hydra writes .hydra/ into the directory this process made and marked
        argv = [*argv, f"hydra.run.dir={claimed}"]
    # Hydra reports an exception from the task with a traceback and exit status 1: the task keeps the
    # first mistake or stop it meets, and it is raised again once Hydra has returned.
    caught: list[BaseException] = []

    @hydra.main(config_path=str(root / "conf"), config_name="config", version_base="1.3")
    def app(dcfg) -> float | None:
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        ours = claimed is not None and out_dir == Path(os.path.abspath(claimed))  # as Hydra makes it
        # what Hydra itself put there (.hydra/, the job's log) and this job's mark: a directory it created
        fresh = all(
            p.name == ".hydra" or p.suffix == ".log" or (ours and p.name == run_dirs.RUN_MARK)
            for p in out_dir.iterdir()
        )
        try:
            cfg = config_mod.validate(OmegaConf.to_container(dcfg, resolve=True))
            if not run_dirs.ddp_child():
                # before the run's mark, params.yaml and prepared/ are written: what the check stage refuses
                # (trainer=gpu without a GPU, eval.precision=tf32 where evaluation runs on the CPU, a store
                # that does not answer, ...), then a resume the train stage would refuse
                check_before_data(cfg, root)
            if cfg.train.resume and not run_dirs.ddp_child():
                from vaerepro.train import hold
                from vaerepro.train_resume import check_resume_of_run

                if out_dir.is_dir():  # a training or an evaluation there now: refused before anything else
                    os.close(hold(out_dir, out_dir / "models"))
                check_resume_of_run(cfg, out_dir, prepared_meta=_npz_prepared_now(cfg, out_dir, root))
            if not run_dirs.ddp_child() and not ours:  # the other ranks run in the directory rank 0 claimed
                run_dirs.claim(out_dir, HydraConfig.get().overrides.task, resume=cfg.train.resume)
            _ddp_relaunch_argv(command, out_dir)
            metrics = run_pipeline(cfg, out_dir, root, progress=_on_terminal(), checked=True)
        except Stopped as stop:
            stop.hint = "resume with: vaerepro run " + " ".join(
                [*HydraConfig.get().overrides.task, "train.resume=true", f"hydra.run.dir={out_dir}"]
            )
            caught.append(stop)
            return None
        except Exception as err:
            if _user_error(err) is None:
                raise
            # models/ as training made it before a refusal (a tracking store MLflow will not open) is empty
            models = out_dir / "models"
            if (
                fresh
                and not isinstance(err, run_dirs.RunDirTaken)
                and not (models.is_dir() and any(models.iterdir()))
            ):
                shutil.rmtree(out_dir, ignore_errors=True)  # nothing of this job's is worth keeping
            caught.append(err)
            return None
        if metrics is None:  # another DDP rank: rank 0 reports
            return None
        log.info("%s; results in %s", result_line(cfg, metrics), out_dir)
        return metrics["log_px"]

    sys.argv = ["vaerepro run", *argv]
    try:
        app()
    finally:
        sys.argv = given
    if caught:
        raise caught[0]


def _npz_prepared_now(cfg: Config, out_dir: Path, root: Path) -> dict | None:
    """For a resume of a run on the user's .npz (data.source=npz, a file without a checksum that may have
    changed since the run prepared it) the meta.json of the data prepare would write from it now, prepared
    into a temporary directory outside the run's, which is then removed; None otherwise. The checkpoint knows
    its training data by digest only, which the train stage compares after prepare has rewritten the run's
    prepared/."""
    if cfg.data.source != "npz" or not (out_dir / "models" / "last.ckpt").is_file():
        return None
    with tempfile.TemporaryDirectory(prefix="vaerepro-resume-") as tmp:
        return stage_prepare(cfg, Path(tmp), root)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        # as the environment variable, which `vaerepro reproduce` and the processes it starts read too
        os.environ["VAEREPRO_DEBUG"] = "1"
    debug = os.environ.get("VAEREPRO_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    signals.install()
    command = argv[0] if argv else ""
    try:
        try:
            return _main(argv)
        finally:
            signals.finish()  # a SIGTERM from here on, while the outcome is reported, raises nothing
    except Stopped as stop:
        return _report_stop(command, stop)
    except KeyboardInterrupt as stop:
        # Ctrl-C outside training (training defers it to its epoch end: signals.deferred): one line and
        # 128 + SIGINT, as a shell reports it; the run it stopped is KILLED on the way up
        if debug:
            raise
        hint = getattr(stop, "hint", None)  # a sweep's: how it resumes
        hint = hint or _unless_deleted("" if command in ("train", "run") else _RESUME_HINT.get(command, ""))
        print(f"vaerepro {command}: stopped (Ctrl-C)" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as err:
        if (stop := signals.raised()) is not None and not debug:
            return _report_stop(command, stop)  # a library's clean-up failed on the way up (signals.raised)
        message = _user_error(err)
        if message is None or debug:
            raise
        print(f"{f'vaerepro {command}'.strip()}: {message}", file=sys.stderr)
        return 2


def _report_stop(command: str, stop: Stopped) -> int:
    """A stopped command's one line, with how to go on where there is a way, and its exit status."""
    hint = getattr(stop, "hint", None) or _RESUME_HINT.get(command, "")
    if command == "train" and os.environ.get("DVC_STAGE"):
        hint += _DVC_RESUME_HINT
    hint = _unless_deleted(hint)
    print(f"vaerepro {command}: {stop}" + (f"; {hint}" if hint else ""), file=sys.stderr)
    return stop.exit_status


def _unless_deleted(hint: str) -> str:
    """A stop's hint, or _DVC_TEMP_HINT in a stage that runs in the temporary workspace of a queued (or
    --temp) DVC experiment, .dvc/tmp/exps/<dir>/, which DVC deletes when the experiment ends."""
    parts = Path.cwd().resolve().parts
    temporary = any(parts[i : i + 3] == (".dvc", "tmp", "exps") for i in range(len(parts) - 3))
    return _DVC_TEMP_HINT if temporary and os.environ.get("DVC_STAGE") else hint


STAGE_HELP = {
    "fetch": "put the configured data source's raw files under data/",
    "check": "refuse, before DVC deletes any stage's outputs, what needs no data: the config, the devices",
    "prepare": "split and check the data: prepared/",
    "train": "train the VAE: models/{best,last}.ckpt, metrics/train.json, plots/elbo.csv",
    "evaluate": "importance-sampled log p(x) and the other test numbers: metrics/eval.json, artifacts/",
    "report": "the report (reports/report.{md,html}) and its comparison with the other runs",
}

_RESUME_HINT = {
    # not `dvc exp run -S train.resume=true`: DVC deletes models/ (last.ckpt too) before the stage runs
    "train": "resume with vaerepro params ... train.resume=true, then vaerepro train",
    "evaluate": "run vaerepro evaluate again",
    "report": "run vaerepro report again",
}
# A queued experiment stopped (`dvc queue kill` sends SIGINT to the process group): DVC then deletes its
# temporary workspace, last.ckpt and every other file of it, so no command there resumes anything.
_DVC_TEMP_HINT = (
    "this is a queued DVC experiment's temporary workspace, which DVC deletes when the experiment ends, "
    "with every file in it: nothing of it can be resumed; queue the experiment again to run it from the "
    "start (a training stopped under `dvc exp run` in the workspace keeps its models/last.ckpt)"
)
# A training stopped under `dvc repro` or `dvc exp run` and resumed outside DVC is no output of DVC's train
# stage until committed: the next `dvc repro` would delete its models/ and train from the start.
_DVC_RESUME_HINT = (
    "; DVC has not recorded this training: once the resumed one has finished, vaerepro params ... without "
    "train.resume=true, then dvc commit -f train before dvc repro (which would otherwise delete models/ "
    "and train from the start)"
)


class _Parser(argparse.ArgumentParser):
    """argparse, whose refusal (an unknown option, --port abc) is one line and exit status 2 (main), as every
    other input mistake and `vaerepro reproduce`'s, not usage and error on two lines; subcommands too."""

    def error(self, message: str):
        raise UserError(message)


def version_text() -> str:
    """`vaerepro --version`: the harness's version, the commit of its source where it is a git checkout (the
    code, which the version number alone does not name) and the versions of Python and the libraries it
    runs on (`versions`), as each result file records them."""
    from vaerepro.versions import git_commit, versions, versions_text

    package = Path(__file__).resolve().parent
    checkout = package.parents[1]  # <checkout>/src/vaerepro in an editable install from a git checkout
    commit = git_commit(checkout) if (checkout / ".git").exists() else None
    where = f"{package}" + (f", git {commit}" if commit else "")
    libraries = versions()
    harness = libraries.pop("vaerepro")
    return f"vaerepro {harness} ({where})\n{versions_text(libraries)}"


class _Version(argparse.Action):
    """--version, computed only when asked (it runs git)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(
            option_strings, dest, nargs=0, help="print the versions of vaerepro and its libraries"
        )

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def _port(text: str) -> int:
    """`vaerepro ui --port`: 1..65535 (else mlflow's server ended in a traceback, with exit status 0)."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: a port is a whole number from 1 to 65535")
    return port


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "run":
        _hydra_run(argv[1:])
        return 0
    if argv and argv[0] == "reproduce":
        from vaerepro.reproductions import presets

        return presets.main(argv[1:])

    parser = _Parser(
        prog="vaerepro", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # `run` is Hydra's command line (handled above); listed here so that --help names every command
    sub.add_parser(
        "run", help="one configuration through every stage, outside DVC (Hydra: vaerepro run --help)"
    )
    # `reproduce` has its own command line (presets.main); listed here so that --help names it
    sub.add_parser("reproduce", help="the papers' presets: vaerepro reproduce --list | NAME [--smoke]")
    p = sub.add_parser("params", help="compose conf/ with Hydra overrides into params.yaml")
    p.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. likelihood=gaussian model.latent_dim=5"
    )
    p.add_argument("--output", default="params.yaml", help="file to write (default: params.yaml)")
    p = sub.add_parser("ui", help="serve the MLflow store (127.0.0.1) and print the link to compare runs")
    p.add_argument(
        "--params",
        help="resolved config, for its tracking section (default: params.yaml here, else the project root's)",
    )
    p.add_argument("--port", type=_port, default=5000, help="port on 127.0.0.1 to serve on (default: 5000)")
    p.add_argument("--print-url", action="store_true", help="print the link only; serve nothing")
    for name in ("fetch", *STAGES):
        p = sub.add_parser(name, help=STAGE_HELP[name])
        p.add_argument(
            "--params",
            help="resolved config (default: OUT/params.yaml when --out is a run's directory holding one, "
            "else params.yaml)",
        )
        p.add_argument("--out", default=".", help="directory the stage reads and writes (default: .)")
        p.add_argument(
            "--no-progress", action="store_true", help="no progress bars (the default off a terminal)"
        )
    args = parser.parse_args(argv)

    if args.command == "params":
        raw = config_mod.compose(args.overrides, config_dir=config_mod.find_project_root() / "conf")
        config_mod.validate(raw)
        if missing := [k for k in Config.model_fields if k not in raw]:  # ~model: a file load refuses
            raise ConfigError(
                f"overrides {' '.join(args.overrides)}: no {', '.join(missing)} in the resolved config, "
                f"which every stage needs; {args.output} is left as it was"
            )
        # the earlier params.yaml stays if this one fails
        write_whole(args.output, params_file.params_text(raw, args.overrides))
        print(f"wrote {args.output}")
        return 0
    if args.command == "ui" and args.params is None:
        # the store is the project's wherever the command runs (a run's directory, runs/)
        here = Path("params.yaml")
        args.params = str(here if here.is_file() else config_mod.find_project_root() / "params.yaml")
    if args.params is None:
        # a `vaerepro run`'s directory holds the config it ran with: `vaerepro evaluate --out runs/X` means
        # that run's, not the project's params.yaml (which its checkpoint refuses, or which evaluates it under
        # the project's other settings where the two agree on the model)
        own = Path(args.out) / "params.yaml"
        args.params = str(own) if args.out != "." and own.is_file() else "params.yaml"
        if args.params != "params.yaml":
            log.info("reading %s, the config of the run in %s (--params to read another)", own, args.out)
    cfg = config_mod.load(args.params)
    root = config_mod.find_project_root(Path(args.params).resolve().parent)
    if args.command == "ui":
        return _ui(cfg, root, args.port, serve=not args.print_url)
    out_dir = Path(args.out).resolve()
    try:
        if args.command == "fetch":
            print(stage_fetch(cfg, root))
            if cfg.data.source == "npz":
                # Your file is outside data/, which data.dvc tracks as the pipeline's first input (the
                # embedded digits): without it `dvc repro` stops at data.dvc ("missing data 'source'")
                # before any stage. DVC cannot make a dependency depend on a param, so data/ is made here.
                from vaerepro import data

                made = data.fetch("mnist5k", _raw_dir(cfg, root))
                log.info("%s: the embedded digits data.dvc tracks, for `dvc repro` (not your data)", made)
        elif args.command == "evaluate":
            with _torchrun_process_group():
                metrics = stage_evaluate(cfg, out_dir, root, not args.no_progress and _on_terminal())
            if metrics is not None:  # rank 0 (`vaerepro run` ends with this line after its report)
                log.info("%s; in %s", result_line(cfg, metrics), out_dir / "metrics" / "eval.json")
        elif args.command == "train":
            stage_train(
                cfg, out_dir, root, not args.no_progress and _on_terminal()
            )  # ends its MLflow run itself
        else:
            STAGES[args.command](cfg, out_dir, root)
            if args.command == "check":
                params_file.warn_if_not_meant(Path(args.params), root)
    except BaseException as exc:
        # A stage after training that did not finish marks the run; a refused input leaves it as it was.
        if args.command in ("evaluate", "report") and _user_error(exc) is None:
            _end_run_after(cfg, out_dir, exc, evaluated=args.command == "report")
        raise
    finally:
        _leave_process_group()
    return 0


def _ui(cfg: Config, root: Path, port: int, *, serve: bool) -> int:
    """Print the links to the experiment's runs table, its ELBO charts and the parallel coordinates of each
    measurement (K and test set) its runs hold; serve a local store with `mlflow ui` on 127.0.0.1 (it has no
    authentication: never on 0.0.0.0, see docs/scaling.md)."""
    from vaerepro import tracking
    from vaerepro.compare import measurement_text

    uri, exp_id = tracking.ensure_experiment(cfg.tracking, root)
    local = f"http://127.0.0.1:{port}"
    lines = [
        f"runs table:  {tracking.ui_url(uri, exp_id, 'TABLE', local)}",
        f"ELBO curves: {tracking.ui_url(uri, exp_id, 'CHART', local)}",
    ]
    parallel = tracking.parallel_links(uri, exp_id, local)
    lines += [f"latent size × likelihood, {measurement_text(m)}: {url}" for m, url in parallel]
    if not parallel:
        lines.append("latent size × likelihood: no evaluated run yet (one view per K and test set)")
    print("\n".join(lines), flush=True)
    if tracking.is_server(uri) or not serve:
        return 0
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if (location := tracking.artifact_location(uri)) is not None:
        cmd += ["--default-artifact-root", location]
    os.execv(cmd[0], cmd)
    return 0  # not reached


@contextlib.contextmanager
def _torchrun_process_group():
    """Under `torchrun --nproc_per_node N`, join its processes in a gloo process group for the stage, so
    evaluation is shared out (evaluate.py); otherwise nothing."""
    import torch.distributed as dist

    if _external_launcher() != "torchrun" or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo")  # env://: torchrun sets MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
    try:
        yield
    finally:
        dist.destroy_process_group()


def _leave_process_group() -> None:
    """A process that trained under DDP still holds Lightning's process group: leave it before exiting."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # `python -m vaerepro.cli` (the `vaerepro` command is vaerepro.__main__)
    signals.stop_with_parent()  # a reproduction's seed: it stops when `vaerepro reproduce` ends
    quick_exit.exit_after(main)  # once main has returned, no teardown of the modules (vaerepro.quick_exit)
