"""The command line as a user reads it: every command in --help, and a run's output without noise."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, ROOT, TINY
from vaerepro import cli, run_dirs, run_overrides
from vaerepro.config import ConfigError

COMMANDS = ("run", "reproduce", "params", "ui", "fetch", "check", "prepare", "train", "evaluate", "report")


def _vaerepro(args: list[str], cwd: Path, forked=None) -> subprocess.CompletedProcess:
    """`vaerepro ARGS` in `cwd`: the console script, or with `forked` (conftest's fork server) a process
    forked from one that has imported it, ~8 s sooner; the tests of what the console script prints and
    imports, and of commands run side by side, start the script."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if forked is not None:
        return forked.run(args, cwd, env)
    return subprocess.run(["vaerepro", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _help(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        cli._main([*args, "--help"])  # the parser alone: no signal handlers or logging set up here
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_command_with_a_line_and_every_option_with_help(capsys):
    out = _help([], capsys)
    listed = re.findall(r"^    (\w+)\s+\S", out, flags=re.MULTILINE)
    assert listed == list(COMMANDS), out
    for command in COMMANDS[1:]:  # `run` is Hydra's command line: vaerepro run --help is Hydra's help
        text = _help([command], capsys)
        options = re.findall(r"^  (--[\w-]+)(.*)$", text, flags=re.MULTILINE)
        assert options, text
        for name, rest in options:
            # the help text follows on the option's line or the next one
            assert rest.strip() or re.search(rf"^  {name}.*\n {{10,}}\S", text, flags=re.MULTILINE), (
                command,
                name,
            )


def test_version_names_the_harness_its_commit_and_its_libraries(capsys):
    """`vaerepro --version`: the installed version, the commit of this checkout (a version number that never
    changes names no code), and the library versions a bug report and a result's numbers depend on."""
    import importlib.metadata

    import torch

    import vaerepro
    from vaerepro import versions

    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    first, second = capsys.readouterr().out.splitlines()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    version = importlib.metadata.version("vaerepro")
    assert vaerepro.__version__ == version  # the package's own attribute says what pyproject.toml says
    assert re.fullmatch(
        rf"vaerepro {re.escape(version)} \({ROOT / 'src' / 'vaerepro'}, git {head}(-dirty)?\)", first
    )
    assert second.startswith("python 3.") and f"torch {torch.__version__}," in second
    for package in ("torch", "numpy", "lightning", "hydra-core", "mlflow", "optuna", "dvc"):
        assert f", {package} {importlib.metadata.version(package)}" in second
    assert versions.package_version("no-such-distribution") == "not installed"


@pytest.mark.slow
def test_a_run_prints_each_line_once_without_adverts_warnings_or_progress_bars(tmp_path, raw_dir):
    """Off a terminal (here: pipes), `vaerepro run` prints log lines only: each once, no third-party tips or
    deprecation warnings, no progress bars (carriage returns)."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    proc = _vaerepro(["run", *TINY, f"data.raw_dir={raw_dir}", "hydra.run.dir=runs/one"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "\r" not in text
    assert not re.search(r"litlogger|Tip:|[Dd]eprecat|Warning", text), text
    # each message once (the timestamp and logger prefix aside)
    messages = [re.sub(r"^\[[^]]*\]\[[^]]*\]\[\w+\] - ", "", ln) for ln in text.splitlines() if ln.strip()]
    assert len(messages) == len(set(messages)), text
    assert any(m.startswith("log p(x) = ") for m in messages) and any(
        "compare runs in MLflow: http" in m for m in messages
    )


def _claim(args) -> str:
    """One process's claim of a directory: 'ok', or the refusal's first words (for the race below)."""
    out_dir, resume = args
    try:
        run_dirs.claim(Path(out_dir), ["seed=1"], resume=resume)
    except run_dirs.RunDirTaken:
        return "taken"
    return "ok"


@pytest.mark.slow
def test_a_run_directory_is_claimed_by_one_run_and_refused_to_another(tmp_path):
    """Two `vaerepro run`s started in one second share the directory Hydra names (the second, likelihood,
    latent size and seed): each wrote into it, leaving one run's params.yaml beside the other's results.
    The mark is created exclusively: of eight processes claiming one directory at once, exactly one gets
    it; another claim is refused in one line naming the directory and what to do; a resume takes it."""
    import multiprocessing

    out = tmp_path / "runs" / "one"
    out.mkdir(parents=True)
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        got = pool.map(_claim, [(str(out), False)] * 8)
    assert sorted(got) == ["ok"] + ["taken"] * 7
    mark = json.loads((out / run_dirs.RUN_MARK).read_text())
    assert mark["overrides"] == ["seed=1"] and re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", mark["started"]
    )
    with pytest.raises(run_dirs.RunDirTaken) as err:
        run_dirs.claim(out, ["seed=2"], resume=False)
    assert str(err.value) == (
        f"{out}: holds the files of another `vaerepro run` (started {mark['started']}), which this run would "
        "overwrite; give this run its own directory (hydra.run.dir=..., or hydra.sweep.dir=... under "
        "--multirun; their defaults name a new one), or continue that run with train.resume=true"
    )
    run_dirs.claim(out, ["seed=1", "train.resume=true"], resume=True)  # continues it
    assert json.loads((out / run_dirs.RUN_MARK).read_text())["overrides"] == ["seed=1", "train.resume=true"]


def _named(argv: list[str]) -> str | None:
    """The directory `vaerepro run` ARGV claims before Hydra starts its job (run_dirs.claim_named)."""
    return run_dirs.claim_named(argv, ROOT, cli.HYDRA_JOB)


def _claim_named(args) -> str:
    """One process's claim of the directory a hydra.run.dir pattern names (for the race below)."""
    pattern, lr = args
    return _named([f"train.lr={lr}", f"hydra.run.dir={pattern}"])


@pytest.mark.slow
def test_runs_started_together_each_get_a_directory_of_their_own(tmp_path):
    """Runs whose directory pattern names one directory (the default's second, likelihood, latent size and
    seed: a shell loop over learning rates) each make their own before Hydra writes there: the first the
    pattern's, the others <dir>_run2, _run3, ..., each marked with its own overrides. Eight processes at
    once: eight directories. A literal hydra.run.dir, a resume and --multirun are left to Hydra's naming."""
    import multiprocessing

    pattern = str(tmp_path / "runs" / "same_s${seed}")
    lrs = [f"0.00{i}" for i in range(1, 9)]
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        got = pool.map(_claim_named, [(pattern, lr) for lr in lrs])
    base = tmp_path / "runs" / "same_s0"
    assert sorted(got) == sorted([str(base)] + [f"{base}_run{n}" for n in range(2, 9)])
    for out_dir, lr in zip(got, lrs, strict=True):
        assert [p.name for p in Path(out_dir).iterdir()] == [run_dirs.RUN_MARK]
        assert json.loads((Path(out_dir) / run_dirs.RUN_MARK).read_text())["overrides"] == [f"train.lr={lr}"]
    for argv in (
        [f"hydra.run.dir={tmp_path / 'literal'}"],
        ["train.resume=true", f"hydra.run.dir={pattern}"],
        ["-m", "seed=0,1", f"hydra.run.dir={pattern}"],
    ):
        assert _named(argv) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and len(list(base.parent.iterdir())) == 8
    (tmp_path / "afile").write_text("")  # a file where the pattern's parent directory would be
    with pytest.raises(ConfigError) as err:
        _named([f"hydra.run.dir={tmp_path / 'afile' / 'r'}" + "${seed}"])
    assert str(err.value) == (
        f"hydra.run.dir={tmp_path / 'afile' / 'r0'}: cannot make the run's directory ({tmp_path / 'afile'}: "
        "File exists)"
    )


def test_a_multirun_set_by_hydra_mode_makes_no_run_directory(tmp_path):
    """`vaerepro run hydra.mode=MULTIRUN ...` is Hydra's --multirun (its jobs go under hydra.sweep.dir): the
    run directory its pattern names was made and marked all the same, and left holding only the mark."""
    pattern = str(tmp_path / "runs" / "m_s${seed}")
    assert _named(["hydra.mode=MULTIRUN", f"hydra.run.dir={pattern}"]) is None
    assert list(tmp_path.iterdir()) == []


def test_a_run_directory_given_with_plus_plus_is_refused_as_the_plain_form_is(tmp_path):
    """`++hydra.run.dir=DIR` is Hydra's hydra.run.dir=DIR, a literal directory: of another run, it is
    refused before Hydra writes there, as hydra.run.dir=DIR is, not swapped for a DIR_run2 the user never
    named."""
    out = tmp_path / "one"
    out.mkdir()
    run_dirs.claim(out, ["seed=0"], resume=False)
    assert _named([f"++hydra.run.dir={out}"]) is None
    with pytest.raises(run_dirs.RunDirTaken):
        run_overrides.check_overrides([f"++hydra.run.dir={out}"], ROOT)
    assert [p.name for p in tmp_path.iterdir()] == ["one"]


def test_a_pattern_of_hydra_s_own_values_is_claimed_as_the_job_names_it(tmp_path):
    """A hydra.run.dir pattern with ${hydra:job.name} (or another value of Hydra's own node) was left to the
    job, which finds the directory another run has only after Hydra has written its .hydra/ files there:
    a second run replaced the first's config.yaml and overrides.yaml, then was refused. It is made and
    marked before, as the job names it (`cli`, as its log cli.log), the second run's as <dir>_run2."""
    from hydra.core.hydra_config import HydraConfig

    pattern = str(tmp_path / "runs" / "${hydra:job.name}_s${seed}")
    base = tmp_path / "runs" / "cli_s0"
    assert _named(["train.lr=0.01", f"hydra.run.dir={pattern}"]) == str(base)
    assert _named(["train.lr=0.02", f"hydra.run.dir={pattern}"]) == f"{base}_run2"
    assert json.loads((base / run_dirs.RUN_MARK).read_text())["overrides"] == ["train.lr=0.01"]
    assert not HydraConfig.initialized()  # Hydra's job sets its own


@pytest.mark.slow
def test_a_second_run_of_one_directory_name_leaves_the_first_runs_files_as_they_were(
    tmp_path, raw_dir, forked
):
    """The second of two runs named alike (here a pattern without the time) runs in <dir>_run2: the first
    run's .hydra/ files (the overrides it ran with), params.yaml and results are as it left them; each
    directory's overrides are its own run's."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    where = [*TINY, f"data.raw_dir={raw_dir}", "hydra.run.dir=runs/lr_s${seed}"]
    first = _vaerepro(["run", *where, "train.lr=0.01"], tmp_path, forked)
    assert first.returncode == 0, first.stderr[-3000:]
    one = tmp_path / "runs" / "lr_s0"
    before = {p: p.read_bytes() for p in one.rglob("*") if p.is_file()}
    assert "- train.lr=0.01" in (one / ".hydra" / "overrides.yaml").read_text()
    second = _vaerepro(["run", *where, "train.lr=0.02"], tmp_path, forked)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p: p.read_bytes() for p in one.rglob("*") if p.is_file()} == before
    two = tmp_path / "runs" / "lr_s0_run2"
    assert "- train.lr=0.02" in (two / ".hydra" / "overrides.yaml").read_text()
    assert "lr: 0.02" in (two / "params.yaml").read_text() and (two / "metrics" / "eval.json").is_file()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["lr_s0", "lr_s0_run2"]


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "multirun"])
@pytest.mark.slow
def test_a_run_into_another_runs_directory_is_refused_touching_nothing(tmp_path, multirun, forked):
    """A second `vaerepro run` given the hydra.run.dir of a finished run (or a --multirun given the
    hydra.sweep.dir of an earlier one, whose job directories have the same names) overwrote that run's
    files without a word. Refused: one line, exit 2, the directory's files as they were; a given
    hydra.run.dir before Hydra writes its .hydra/ files there, a --multirun job before its pipeline."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    job = tmp_path / "runs" / ("grid/0_bernoulli_z4_s0" if multirun else "one")
    (job / "metrics").mkdir(parents=True)
    (job / "metrics" / "eval.json").write_text('{"log_px": -90.0}')
    (job / run_dirs.RUN_MARK).write_text('{"started": "2026-12-01T10:55:05+0000", "overrides": []}')
    before = {p: p.read_bytes() for p in job.rglob("*") if p.is_file()}
    where = ["-m", *TINY, "hydra.sweep.dir=runs/grid"] if multirun else [*TINY, "hydra.run.dir=runs/one"]
    proc = _vaerepro(["run", *where], tmp_path, forked)
    assert proc.returncode == 2, proc.stderr[-3000:]
    if multirun:
        expected = (
            "runs/grid: holds the runs of an earlier --multirun (0_bernoulli_z4_s0), which this one's jobs "
            "would overwrite; give it its own directory (hydra.sweep.dir=...), or leave hydra.sweep.dir to "
            "its default (a new second names a new directory)"
        )
    else:
        expected = (
            "runs/one: holds the files of another `vaerepro run` (started 2026-12-01T10:55:05+0000), which "
            "this run would overwrite; give this run its own directory (hydra.run.dir=..., or "
            "hydra.sweep.dir=... under --multirun; their defaults name a new one), or continue that run with "
            "train.resume=true"
        )
    lines = [ln for ln in proc.stderr.splitlines() if "would overwrite" in ln]
    assert len(lines) == 1 and lines[0].endswith(expected), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # refused before Hydra wrote anything there (its .hydra/ files, a job's log)
    assert {p: p.read_bytes() for p in job.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in job.parent.iterdir()) == [job.name]


@pytest.mark.parametrize("where", ["outside DVC", "dvc repro", "queued experiment"])
def test_a_training_stopped_under_dvc_says_how_dvc_keeps_its_resumed_training(
    where, monkeypatch, capsys, tmp_path
):
    """The stop's line says how to resume outside DVC (DVC would delete models/ first); under `dvc repro` it
    also says to commit the resumed training to the train stage: a plain `dvc repro` after the resume found
    the stage changed, deleted the resumed models/ and trained from the start. In a queued experiment's
    workspace (.dvc/tmp/exps/<dir>/; `dvc queue kill` sends SIGINT) it said the same, but DVC deletes that
    workspace, last.ckpt with it, as the experiment ends: it says so, and how to run it again."""
    import signal

    from vaerepro.errors import Stopped

    def stopped(argv):
        raise Stopped(signal.SIGINT, "training stopped after 2 of 300 epochs")

    monkeypatch.setattr(cli, "_main", stopped)
    monkeypatch.setattr(cli.signals, "install", lambda: None)
    if where == "outside DVC":
        monkeypatch.delenv("DVC_STAGE", raising=False)
    else:
        monkeypatch.setenv("DVC_STAGE", "train")
    workspace = (
        tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpk2x8" if where == "queued experiment" else tmp_path
    )
    workspace.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(workspace)
    assert cli.main(["train"]) == 130
    (line,) = capsys.readouterr().err.splitlines()
    resumable = "resume with vaerepro params ... train.resume=true, then vaerepro train" in line
    assert resumable == (where != "queued experiment"), line
    assert ("dvc commit -f train" in line) == (where == "dvc repro"), line
    assert ("DVC deletes when the experiment ends" in line) == (where == "queued experiment"), line


def test_the_closing_line_of_a_run_says_improper_k_and_verdict_beside_log_px():
    """`vaerepro run` ends with its log p(x): an improper run's line said "(bernoulli, continuous space)",
    as a density on [0,1] would read, and no line said the K or that the estimate had not converged."""
    from conftest import tiny_config

    numbers = {"log_px": -181.2954, "log_px_se": 1.2412, "num_samples": 20, "converged": False}
    improper = tiny_config("data.space=continuous", "likelihood.allow_improper=true", "eval.num_samples=20")
    assert cli.result_line(improper, numbers) == (
        "log p(x) = -181.295 ± 1.241 nats/example (bernoulli, continuous space, IMPROPER: not a normalised "
        "density; K = 20, NOT CONVERGED)"
    )
    proper = tiny_config("eval.num_samples=5000")
    assert cli.result_line(proper, {**numbers, "num_samples": 5000, "converged": True}) == (
        "log p(x) = -181.295 ± 1.241 nats/example (bernoulli, binary space; K = 5000, converged)"
    )
    fixed = tiny_config("likelihood=gaussian", "likelihood.sigma=0.1", "eval.num_samples=20")
    assert cli.result_line(fixed, numbers).startswith(
        "log p(x) = -181.295 ± 1.241 nats/example (gaussian (sigma=0.1), continuous space; K = 20"
    )


def test_params_refuses_overrides_that_delete_a_section_and_keeps_the_file(tmp_path, capsys, monkeypatch):
    """`vaerepro params ~model` wrote a params.yaml without model, over the old one, which every stage then
    refused ("no model section")."""
    monkeypatch.chdir(ROOT)  # the project whose conf/ it composes
    out = tmp_path / "params.yaml"
    out.write_text("the old file\n")
    assert cli.main(["params", "~model", "~seed", "--output", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"vaerepro params: overrides ~model ~seed: no seed, model in the resolved config, which every stage "
        f"needs; {out} is left as it was\n"
    )
    assert out.read_text() == "the old file\n"


@pytest.mark.parametrize("port", ["99999", "-1", "0", "http"])
def test_ui_refuses_a_port_out_of_range(port, tmp_path, capsys, monkeypatch):
    """mlflow's server ended in a traceback (bind(): port must be 0-65535) and exit status 0."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["ui", f"--port={port}"]) == 2
    err = capsys.readouterr().err
    assert err == f"vaerepro ui: argument --port: '{port}': a port is a whole number from 1 to 65535\n"


@pytest.mark.slow
def test_ui_in_a_subdirectory_opens_the_projects_store(tmp_path, capsys, monkeypatch):
    """`vaerepro ui` read params.yaml in the working directory only: in runs/ it was "params.yaml: no
    resolved config here"; with a relative MLFLOW_TRACKING_URI it opened a new, empty store there."""
    from conftest import tiny_config

    (tmp_path / "conf").symlink_to(ROOT / "conf")
    (tmp_path / "params.yaml").write_text(json.dumps(tiny_config(tracking=True).to_dict()))  # YAML's subset
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path / "runs")
    for env in (None, "sqlite:///mlflow.db"):
        if env is None:
            monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        else:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
        assert cli.main(["ui", "--print-url"]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out.startswith("runs table:  http://127.0.0.1:5000/#/experiments/")
        assert [p.name for p in tmp_path.rglob("*.db")] == ["mlflow.db"]  # the project's, at its root
        assert (tmp_path / "mlflow.db").is_file()


@pytest.mark.slow
def test_runs_started_in_a_subdirectory_go_to_the_projects_runs(tmp_path, raw_dir, forked):
    """`vaerepro run` in a subdirectory of the project (docs/) made its runs/ there, among the project's
    files, while its data, MLflow store and Optuna studies are the project's: a run and a --multirun started
    there now write into the project's runs/ and runs/multirun/. A directory given on the command line
    stays relative to where the user is."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "docs").mkdir()
    base = [*TINY, "train.max_epochs=1", f"data.raw_dir={raw_dir}", "tracking.enabled=false"]
    # the patterns conf/ gives, under the root; Hydra resolves them (${now:...}, ...) as before
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path / "docs")
        (run,) = set(run_dirs.at_project_root(base, tmp_path)) - set(base)
        swept = [*base, "model.latent_dim=2,3"]
        (sweep,) = set(run_dirs.at_project_root(["-m", *swept], tmp_path)) - {"-m", *swept}
        # given on the command line: where the user is (Hydra's own, relative to the working directory)
        for given in ([*base, "hydra.run.dir=here"], ["-m", *swept, "hydra.sweep.dir=there"]):
            assert run_dirs.at_project_root(given, tmp_path) == given
    now = "${now:%Y-%m-%d_%H-%M-%S}"
    assert run.startswith(f"hydra.run.dir='{tmp_path}/runs/{now}_${{likelihood.name}}_z"), run
    assert sweep == f"hydra.sweep.dir='{tmp_path}/runs/multirun/{now}'"
    proc = _vaerepro(["run", *base], tmp_path / "docs", forked)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _vaerepro(
        ["run", "-m", *base, "model.latent_dim=2,3", "eval.num_samples=5"], tmp_path / "docs", forked
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == []
    runs = sorted(p.parent.relative_to(tmp_path) for p in tmp_path.rglob("eval.json"))
    assert len(runs) == 3 and all(r.parts[0] == "runs" for r in runs), runs
    assert sorted(r.parts[-2].split("_", 1)[1] for r in runs if r.parts[1] == "multirun") == [
        "bernoulli_z2_s0", "bernoulli_z3_s0",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        ([], "vaerepro: the following arguments are required: COMMAND"),
        (["train", "--bogus"], "vaerepro train: unrecognized arguments: --bogus"),
        (["params", "--multirun"], "vaerepro params: unrecognized arguments: --multirun"),
        (["evaluate", "--out"], "vaerepro evaluate: argument --out: expected one argument"),
    ],
)
def test_a_command_line_argparse_refuses_is_one_line(argv, line, tmp_path, capsys, monkeypatch):
    """argparse printed its usage and the error on two lines, unlike every other input mistake and `vaerepro
    reproduce`'s own parser."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == line + "\n"


def test_a_file_where_a_directory_is_needed_is_said_so(tmp_path):
    """mkdir on a file raises FileExistsError, whose words ("File exists") read as if the path were fine."""
    taken = tmp_path / "out"
    taken.write_text("")
    try:
        (taken / "prepared").parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        assert cli._user_error(err) == f"{taken}: a file, where a directory is needed"
    else:
        pytest.fail("mkdir of a file succeeded")
    assert cli._user_error(FileNotFoundError(2, "No such file or directory", "x.npz")) == (
        "x.npz: No such file or directory"
    )


@pytest.mark.slow
def test_a_run_refused_by_the_tracking_store_leaves_no_directory(tmp_path, raw_dir, forked):
    """Training makes models/ before it opens the store: a refused tracking.uri left the run's directory, with
    its prepared data and an empty models/, marked as a run (the next one went to <dir>_run2)."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    store = tmp_path / "mlruns"  # a plain directory: MLflow 3's file store, which it refuses
    args = ["run", *TINY, f"data.raw_dir={raw_dir}", f"tracking.uri={store}"]
    for run_dir in ("runs/one", "runs/${seed}"):  # a literal directory, and one this process names and marks
        proc = _vaerepro([*args, f"hydra.run.dir={run_dir}"], tmp_path, forked)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.startswith(f"vaerepro run: tracking.uri={store}: MLflow will not open this store")
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert list((tmp_path / "runs").iterdir()) == []


@pytest.mark.slow
def test_the_check_stage_imports_no_lightning(tmp_path):
    """`vaerepro check`, the DVC pipeline's first stage, runs on every `dvc repro` and `dvc exp run` after
    a change of params.yaml: it refuses what needs no data, so it imports no Lightning (about 5 s on 2 cores,
    the most of its start before it was left out). In a fresh interpreter: this one has Lightning loaded."""
    import yaml

    from conftest import compose

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # marks the project root
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(compose(f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")))
    code = (
        "import sys; from vaerepro import cli; "
        f"status = cli.main(['check', '--params', {str(params)!r}, '--out', {str(tmp_path)!r}]); "
        "print(status, sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'mlflow', 'optuna'}))"
    )
    proc = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "0 []", (proc.stdout, proc.stderr)
    assert (tmp_path / cli.CHECK_FILE).is_file()


def _digests(run: Path) -> dict[str, str]:
    """sha256 of every file of a run's directory that a refused resume must leave as it was."""
    import hashlib

    files = [run / "params.yaml", run / run_dirs.RUN_MARK, *sorted((run / "prepared").iterdir())]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.slow
def test_a_resume_of_a_run_with_another_config_is_refused_before_its_files_are_written(
    tmp_path, raw_dir, forked
):
    """`vaerepro run ... train.resume=true hydra.run.dir=RUN` with another data split or model: train refused
    it ("Nothing was changed"), but prepared/ had been made again from the new split and params.yaml and the
    run's mark rewritten, so the run's directory named a config its checkpoints and numbers are not of."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    base = [*TINY, f"data.raw_dir={raw_dir}", "tracking.enabled=false", "hydra.run.dir=runs/one"]
    proc = _vaerepro(["run", *base], tmp_path, forked)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "one"
    before = _digests(run)
    for change, key in (("data.split_seed=1", "data.split_seed"), ("model.latent_dim=5", "model.latent_dim")):
        proc = _vaerepro(["run", *base, "train.resume=true", change], tmp_path, forked)
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("vaerepro run: ")]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert key in lines[0] and "last.ckpt" in lines[0], lines[0]
        assert _digests(run) == before, change


def _kept(run: Path) -> dict[str, str]:
    """sha256 of every file of a run's directory but Hydra's own record (.hydra/) and the job's log."""
    import hashlib

    files = [p for p in run.rglob("*") if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"]
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


@pytest.mark.slow
def test_every_refusal_of_a_resume_comes_before_the_runs_files_are_written(tmp_path, raw_dir, forked):
    """A resume refused by the train stage (other arithmetic, another global batch, fewer epochs than done,
    a checkpoint of weights only, a rate its pilots did not record) or by the check stage (a device this
    machine lacks) was refused after the run's params.yaml and mark were written with the refused config:
    the run then named a config its checkpoints and numbers are not of. Each is refused in one line, exit
    status 2, with every file of the run as it was."""
    import torch

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    base = [*TINY, f"data.raw_dir={raw_dir}", "tracking.enabled=false", "hydra.run.dir=runs/one"]
    base += ["train.lr_candidates=[0.001,0.003]", "train.lr_pilot_steps=5", "train.lr=0.0005"]
    proc = _vaerepro(["run", *base], tmp_path, forked)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "one"
    last = run / "models" / "last.ckpt"
    nothing = "Nothing was changed"
    refused = {
        "trainer.precision=bf16-mixed": f"{last}: train.resume=true, but it was trained in other arithmetic "
        f"(trainer.precision: 32-true in the checkpoint, bf16-mixed now). {nothing}; set those keys as the "
        "training had them",
        "train.batch_size=25": f"{last}: train.resume=true, but its 3 epochs took 27 optimiser steps (9 an "
        "epoch) and this configuration takes 17 an epoch (a global batch of train.batch_size x devices x "
        f"nodes = 25 x 1): it would go on with another global batch. {nothing}; keep train.batch_size x "
        "devices x nodes = 50 (the checkpoint's 50 x 1)",
        "train.max_epochs=2": f"{last}: holds 3 trained epochs, more than train.max_epochs=2; nothing was "
        "changed; set train.max_epochs=3 or more to continue it",
    }
    if not torch.cuda.is_available():
        refused["trainer=gpu"] = "trainer.accelerator=gpu: this machine has no CUDA device; use trainer=cpu"

    def resume(change: str | None) -> str:
        proc = _vaerepro(["run", *base, "train.resume=true", *([change] if change else [])], tmp_path, forked)
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("vaerepro run: ")]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        return lines[0].removeprefix("vaerepro run: ")

    before = _kept(run)
    for change, message in refused.items():
        assert resume(change) == message, change
        assert _kept(run) == before, change
    # a checkpoint of weights only where the training state should be
    whole = last.read_bytes()
    shutil.copyfile(run / "models" / "best.ckpt", last)
    before = _kept(run)
    assert resume(None) == f"{last}: holds weights only, not a training state to resume"
    assert _kept(run) == before
    # a checkpoint that records no choice of its pilots: train would train at train.lr, not the chosen rate
    last.write_bytes(whole)
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    chosen = ckpt["callbacks"].pop("SelectionRecord")["chosen"]
    torch.save(ckpt, last)
    before = _kept(run)
    assert resume(None) == (
        f"{last}: train.resume=true, but the config differs from the run it would continue: train.lr: "
        f"checkpoint {chosen}, config 0.0005. {nothing}; restore those keys, or give this configuration its "
        "own run directory"
    )
    assert _kept(run) == before


@pytest.mark.slow
def test_a_resume_of_a_run_that_trains_now_is_refused_before_its_files_are_written(tmp_path, raw_dir, forked):
    """`vaerepro run ... train.resume=true` into a run whose training (or evaluation) is running: train's lock
    refused it, but only after the run's params.yaml and mark had been written with its config, beside the
    running training's checkpoints."""
    import signal
    import time

    from vaerepro.files import try_lock

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    base = [*TINY, f"data.raw_dir={raw_dir}", "tracking.enabled=false", "hydra.run.dir=runs/one"]
    proc = _vaerepro(["run", *base], tmp_path, forked)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "one"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    running = subprocess.Popen(
        ["vaerepro", "run", *base, "train.resume=true", "train.max_epochs=1000"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while (fd := try_lock(run)) is not None:  # until the running training holds its directory
            os.close(fd)
            assert running.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        before = _digests(run)
        proc = _vaerepro(["run", *base, "train.resume=true", "train.max_epochs=500"], tmp_path, forked)
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("vaerepro run: ")]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert _digests(run) == before
        assert lines[0] == (
            f"vaerepro run: {run / 'models'}: another training or an evaluation is running in this directory "
            "now (a `vaerepro train`, `vaerepro evaluate`, `vaerepro run` or `dvc repro`); nothing was "
            "changed: wait for it to end, or train elsewhere"
        )
        assert "max_epochs: 1000" in (run / "params.yaml").read_text()
    finally:
        running.send_signal(signal.SIGTERM)
        running.wait(timeout=300)


@pytest.mark.slow
def test_a_training_refused_once_its_trainer_exists_prints_that_line_alone(
    tmp_path, prepared_tiny, raw_dir, forked
):
    """`vaerepro train` into a directory another process holds: refused by rank 0's lock, taken once the
    Lightning Trainer is built (it knows the rank). Lightning's lines about the devices, logged as it is
    built, came before the refusal; they are held back until the checks pass, and printed then."""
    import yaml

    from conftest import copy_prepared, tiny_config
    from vaerepro.files import try_lock

    (tmp_path / "conf").symlink_to(ROOT / "conf")  # a project
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_config("train.max_epochs=1", raw_dir=raw_dir).to_dict()))
    train = ["train", "--no-progress", "--params", str(params), "--out", str(out)]
    held = try_lock(out)
    try:
        proc = _vaerepro(train, tmp_path, forked)
    finally:
        os.close(held)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"vaerepro train: {out / 'models'}: another training or an evaluation is running in this directory "
        "now (a `vaerepro train`, `vaerepro evaluate`, `vaerepro run` or `dvc repro`); nothing was changed: "
        "wait for it to end, or train elsewhere"
    ], proc.stderr
    proc = _vaerepro(train, tmp_path, forked)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("GPU available: ") == 1, proc.stderr  # printed once the checks passed


@pytest.mark.slow
def test_a_resume_on_an_npz_changed_since_is_refused_before_its_prepared_data_are_written(
    tmp_path, raw_dir, forked
):
    """data=npz: the user's file has no checksum. Resumed after it changed, the run's prepared/ was made again
    from the new file (and params.yaml and the mark written) before train refused the checkpoint's data
    digest, with "Nothing was changed": the run's directory then held data its model was not trained on.
    The file as it was resumes."""
    import numpy as np

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    npz = tmp_path / "mine.npz"
    digits = np.load(raw_dir / "mnist5k" / "images.npy")[:600]  # (600, 28, 28) uint8
    np.savez(npz, x=digits)
    base = [*TINY, "data=npz", f"data.path={npz}", "tracking.enabled=false", "hydra.run.dir=runs/one"]
    proc = _vaerepro(["run", *base], tmp_path, forked)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "one"
    last = run / "models" / "last.ckpt"
    changed = digits.copy()
    changed[:, 0, 0] = 255 - changed[:, 0, 0]
    np.savez(npz, x=changed)
    before = _kept(run)
    proc = _vaerepro(["run", *base, "train.resume=true", "train.max_epochs=4"], tmp_path, forked)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("vaerepro run: ")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert _kept(run) == before
    assert lines[0].startswith(
        f"vaerepro run: {last}: train.resume=true, but the config differs from the run it would continue: "
        "training data (sha256 of prepared/x_train.npy): checkpoint '"
    ), lines[0]
    np.savez(npz, x=digits)
    proc = _vaerepro(["run", *base, "train.resume=true", "train.max_epochs=4"], tmp_path, forked)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "metrics" / "train.json").read_text())["epochs"] == 4


@pytest.mark.slow
def test_a_stage_given_a_runs_directory_reads_that_runs_config(tmp_path, forked):
    """`vaerepro evaluate --out runs/X` read the project's params.yaml, not the config runs/X ran with: the
    checkpoint refused it, or, where the two agreed on the model, the evaluation ran under the project's
    other settings. A stage's --params now defaults to OUT/params.yaml when OUT holds one; a directory
    without one, or --params, reads what it names. The check stage's warnings that params.yaml is not what
    conf/ composes are for the project's params.yaml only: a run's is conf/ with the run's overrides."""
    from vaerepro import config as config_mod
    from vaerepro import params_file

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    project = config_mod.compose(["tracking.enabled=false"], tmp_path / "conf")
    (tmp_path / "params.yaml").write_text(params_file.params_text(project, ["tracking.enabled=false"]))
    run, other = tmp_path / "runs" / "x", tmp_path / "other"
    run.mkdir(parents=True)
    other.mkdir()
    ran = config_mod.compose(["tracking.enabled=false", "model.latent_dim=0"], tmp_path / "conf")
    (run / "params.yaml").write_text(config_mod.dump(ran))  # as `vaerepro run` writes it, no header

    def check(*args: str) -> subprocess.CompletedProcess:
        return _vaerepro(["check", *args], tmp_path, forked)

    refused = check("--out", "runs/x")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.splitlines()[-1] == (
        "vaerepro check: runs/x/params.yaml: model.latent_dim: Input should be greater than or equal to 1 "
        "(given: 0)"
    )
    assert check("--out", "runs/x", "--params", "params.yaml").returncode == 0
    assert check("--out", "other").returncode == 0  # no params.yaml there: the project's
    ran["model"]["latent_dim"] = 7
    (run / "params.yaml").write_text(config_mod.dump(ran))
    for args in (["--out", "runs/x"], ["--params", "runs/x/params.yaml", "--out", "runs/x"]):
        proc = check(*args)
        assert proc.returncode == 0 and "WARNING" not in proc.stderr, (args, proc.stderr)
    assert "reading runs/x/params.yaml, the config of the run in runs/x" in check("--out", "runs/x").stderr
