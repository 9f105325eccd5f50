"""Optuna sweeps through the `vaerepro_optuna` Hydra sweeper: search space, comparability, persistence and
resume, failures, pruning, and two sweep processes on one study. What a sweep records (its MLflow parent and
child runs, the sweep report) is tested in test_sweep_tracking.py, with the helpers below.

The slow tests run the real command (`vaerepro run --multirun ...`) in a temporary project (a copy of conf/)
on the tiny config; each trial is a real `vaerepro run` process (~10 s).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, compose
from vaerepro import sweep
from vaerepro.config import ConfigError
from vaerepro.sweep import runner
from vaerepro.tracking.sweep import Tracking

TRIAL = [*TINY, "trainer.deterministic=true"]


# ------------------------------------------------------------------------------------------ helpers
# (and `project`, a copy of conf/ with a temporary MLflow store: a fixture in conftest.py)


def _sweep_cmd(p, study: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vaerepro.cli",
        "run",
        "--multirun",
        *TRIAL,
        f"data.raw_dir={p['raw']}",
        "hydra/sweeper=vaerepro_optuna",
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweep.dir={p['root'] / 'runs' / study}",
        *overrides,
    ]


def _sweep(p, study: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _sweep_cmd(p, study, *overrides),
        cwd=p["root"],
        env=p["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"sweep failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def _study(p, study: str):
    import optuna

    return optuna.load_study(
        study_name=study, storage=sweep.open_storage(str(p["root"] / "optuna" / f"{study}.log"))
    )


def _client(p):
    from mlflow import MlflowClient

    return MlflowClient(p["env"]["MLFLOW_TRACKING_URI"])


def _runs(p, study: str):
    """(parent run, {trial number: child run}) of a study, from MLflow."""
    client = _client(p)
    exp = client.get_experiment_by_name("vaerepro")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`vaerepro.study` = '{study}'")
    parents = [r for r in runs if r.data.tags.get("vaerepro.role") == "study"]
    assert len(parents) == 1, [r.data.tags for r in parents]
    children = {}
    for r in runs:
        if "vaerepro.trial" in r.data.tags:
            n = int(r.data.tags["vaerepro.trial"])
            assert n not in children, f"two MLflow runs for trial {n}"
            children[n] = r
    return parents[0], children


def _states(study) -> list[str]:
    return [t.state.name for t in study.get_trials()]


# ------------------------------------------------------------------------------------ fast: the parts


def test_plugin_is_discovered_and_its_configs_registered():
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    names = [f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Sweeper)]
    assert "hydra_plugins.vaerepro_optuna_sweeper.optuna_sweeper.VaereproOptunaSweeper" in names
    cs = ConfigStore.instance()
    assert "vaerepro_optuna.yaml" in cs.list("hydra/sweeper")
    assert {"tpe.yaml", "random.yaml", "grid.yaml", "cmaes.yaml"} <= set(cs.list("hydra/sweeper/sampler"))
    assert {"none.yaml", "median.yaml", "hyperband.yaml"} <= set(cs.list("hydra/sweeper/pruner"))


@pytest.mark.slow
def test_the_sweep_process_imports_neither_lightning_nor_mlflow():
    """The sweeper and its scheduler stay light (Lightning is seconds of start-up, in trial processes only);
    MLflow is imported by vaerepro.tracking.sweep when a sweep first writes to it."""
    code = (
        "import sys, hydra_plugins.vaerepro_optuna_sweeper.optuna_sweeper, vaerepro.sweep.runner; "
        "print(*sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(out.split())
    assert {"vaerepro.sweep.runner", "vaerepro.tracking.sweep"} <= loaded
    assert not {m for m in loaded if m.split(".")[0] in ("lightning", "mlflow")}
    assert not {"vaerepro.sweep.pruning", "vaerepro.sweep.trial", "vaerepro.cli"} & loaded


def test_shipped_aevb_sweep_config():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    # an opt-in group (+sweep=aevb): the default job config (params.yaml) is what it was
    assert "sweep" not in compose() and compose("+sweep=aevb") == compose()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["+sweep=aevb"], return_hydra_config=True)
    s = cfg.hydra.sweeper
    assert s._target_.endswith("VaereproOptunaSweeper")
    assert (s.objective, s.direction, s.study_name, s.sampler.name, s.pruner.name) == (
        "knn_accuracy",
        "maximize",
        "aevb",
        "grid",
        "none",
    )
    assert dict(s.params) == {
        "model.latent_dim": "choice(2, 3, 5, 10, 20, 50, 200)",
        "likelihood": "choice(bernoulli, gaussian, continuous_bernoulli)",
    }
    # the grid sampler visits each point once: n_trials is the grid's size, every point and none repeated
    grid = sweep.grid_values(sweep.parse_search_space(dict(s.params), []))
    assert s.n_trials == math.prod(len(values) for values in grid.values()) == 21


def test_search_space_from_hydra_sweep_syntax():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space = sweep.parse_search_space(
        {
            "model.latent_dim": "choice(2, 3, 5)",
            "train.lr": "tag(log, interval(1e-4, 1e-2))",
            "train.weight_decay": "tag(log, interval(1e-6, 1e-3))",
            "train.batch_size": "range(50, 201, 50)",
            "model.hidden_dims": "choice([64], [128,128])",
            "seed": "choice(0, 1)",
        },
        [
            "seed=7",
            "likelihood=gaussian,continuous_bernoulli",
            "+sweep=aevb",
            "eval.seed=tag(int, interval(0, 9))",
            "train.lr=interval(0, 1)",
        ],
    )
    d = space.distributions
    assert d["model.latent_dim"] == CategoricalDistribution([2, 3, 5])
    assert d["train.weight_decay"] == FloatDistribution(1e-6, 1e-3, log=True)
    assert d["train.batch_size"] == IntDistribution(50, 200, step=50)  # Hydra's range: stop excluded
    assert d["model.hidden_dims"] == CategoricalDistribution(["[64]", "[128,128]"])
    assert d["likelihood"] == CategoricalDistribution(["gaussian", "continuous_bernoulli"])
    assert d["eval.seed"] == IntDistribution(0, 9)
    assert d["train.lr"] == FloatDistribution(0.0, 1.0)  # the command line wins over params
    assert "seed" not in d and space.fixed == ["seed=7", "+sweep=aevb"]  # the command line wins
    params = {"model.hidden_dims": "[128,128]", "train.lr": 0.001, "likelihood": "gaussian", "x": True}
    assert sweep.trial_overrides(space, params) == [
        "seed=7",
        "+sweep=aevb",
        "model.hidden_dims=[128,128]",
        "train.lr=0.001",
        "likelihood=gaussian",
        "x=true",
    ]
    assert sweep.override_value("a b") == "'a b'"
    with pytest.raises(ConfigError, match="grid sampler"):
        sweep.grid_values(space)


def test_samplers_pruners_and_storage(tmp_path):
    import optuna

    space = sweep.parse_search_space(
        {"model.latent_dim": "choice(2, 3)", "train.batch_size": "range(50, 101, 50)"}, []
    )
    assert sweep.grid_values(space) == {"model.latent_dim": [2, 3], "train.batch_size": [50, 100]}
    kinds = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "grid": optuna.samplers.GridSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
    }
    for name, cls in kinds.items():
        assert isinstance(sweep.make_sampler({"name": name, "seed": 1}, space, constant_liar=True), cls)
    with pytest.raises(ConfigError, match="tpe, random, grid or cmaes"):
        sweep.make_sampler({"name": "nope"}, space)
    assert isinstance(
        sweep.make_pruner({"name": "median", "n_startup_trials": 1}), optuna.pruners.MedianPruner
    )
    assert isinstance(sweep.make_pruner({"name": "hyperband"}), optuna.pruners.HyperbandPruner)
    assert isinstance(sweep.make_pruner(None), optuna.pruners.NopPruner)

    root = tmp_path
    assert sweep.resolve_storage(None, "aevb", root) == str(root / "optuna" / "aevb.log")
    assert sweep.resolve_storage("studies/x.log", "aevb", root) == str(root / "studies" / "x.log")
    assert sweep.resolve_storage("sqlite:///o.db", "aevb", root) == f"sqlite:///{root / 'o.db'}"
    assert sweep.resolve_storage("sqlite:////abs/o.db", "a", root) == "sqlite:////abs/o.db"
    assert sweep.resolve_storage("postgresql://u@h/db", "a", root) == "postgresql://u@h/db"
    assert sweep.resolve_direction("bits_per_dim", None) == "minimize"
    assert sweep.resolve_direction("knn_accuracy", None) == "maximize"
    with pytest.raises(ConfigError, match="not a number in metrics/eval.json"):
        sweep.resolve_direction("loss", None)


def test_density_objective_refused_across_data_spaces():
    space = sweep.parse_search_space(
        {
            "model.latent_dim": "choice(2, 5)",
            "likelihood": "choice(bernoulli, gaussian, continuous_bernoulli)",
        },
        [],
    )
    spaces = sweep.data_spaces(space, lambda overrides: compose(*overrides))
    assert spaces == {
        ("binary", False): ["likelihood=bernoulli"],
        ("continuous", False): ["likelihood=gaussian", "likelihood=continuous_bernoulli"],
    }
    for objective in ("log_px", "elbo", "bits_per_dim"):
        with pytest.raises(ConfigError, match=r"(?s)binary pixels.*bernoulli.*continuous pixels.*gaussian"):
            sweep.refuse_mixed_spaces(objective, "none", spaces)
    sweep.refuse_mixed_spaces("knn_accuracy", "none", spaces)  # comparable across spaces
    with pytest.raises(ConfigError, match="pruner=median compares trials' validation ELBOs"):
        sweep.refuse_mixed_spaces("knn_accuracy", "median", spaces)
    one = sweep.data_spaces(
        sweep.parse_search_space({"likelihood": "choice(gaussian, continuous_bernoulli)"}, []),
        lambda overrides: compose(*overrides),
    )
    sweep.refuse_mixed_spaces("log_px", "median", one)  # one data space: fine


@pytest.mark.parametrize(
    "key",
    ["eval.num_samples", "data", "data.source", "data.path", "data.max_examples", "data.split_seed"],
)
def test_a_search_space_over_what_trials_measure_is_refused(key):
    """Trials with another K, or on another data set or split, are not one measurement (compare.measurement):
    no objective or pruner ranks them in one study."""
    space = sweep.parse_search_space({key: "choice(1, 2)", "model.latent_dim": "choice(2, 5)"}, [])
    with pytest.raises(ConfigError, match=rf"sweeps {key}, which changes what each trial measures"):
        sweep.refuse_swept_measurement(space)
    for same in ("data.space", "data.raw_dir", "eval.seed", "seed", "eval.chunk_size"):
        sweep.refuse_swept_measurement(sweep.parse_search_space({same: "choice(1, 2)"}, []))


def test_trial_outcomes(tmp_path):
    """Exit codes and eval.json values -> Optuna states: pruned, failed, NaN objective, complete."""
    from vaerepro.sweep.outcome import trial_outcome

    def outcome(rc, **kw):
        return trial_outcome(tmp_path, rc, "knn_accuracy", **kw)

    (tmp_path / "trial.log").write_text("Traceback ...\nValueError: boom\n")
    assert outcome(sweep.PRUNED_EXIT_CODE)[0] == "PRUNED"
    state, _, reason, facts = outcome(1)
    assert state == "FAIL" and "exit code 1" in reason and "boom" in reason
    assert facts == {}  # no params.yaml
    assert outcome(0)[0] == "FAIL"  # no eval.json
    state, _, reason, _ = outcome(-15, timeout=3.0)  # stopped by the sweep past trial_timeout
    assert state == "FAIL" and "still running after trial_timeout=3 s, stopped" in reason and "boom" in reason
    (tmp_path / "metrics").mkdir()
    for bad in (math.nan, None):
        (tmp_path / "metrics" / "eval.json").write_text(json.dumps({"knn_accuracy": bad}))
        state, value, reason, _ = outcome(0)
        assert (state, value) == ("FAIL", None) and "knn_accuracy" in reason
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps({"knn_accuracy": 0.75}))
    assert outcome(0)[:2] == ("COMPLETE", 0.75)
    # the log p(x) estimate's verdict is kept with the trial (study.best_trial skips an unconverged one)
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps({"knn_accuracy": 0.75, "converged": False}))
    assert outcome(0)[3] == {"converged": False}


def test_the_study_names_its_objective(tmp_path):
    """Optuna's dashboard and trials_dataframe show the objective's name, not "Objective 0"."""
    import optuna

    settings = runner.SweepSettings(study_name="named", storage=str(tmp_path / "n.log"), objective="elbo")
    s = runner.Sweep(
        settings, sweep.SearchSpace({}), sweep_dir=tmp_path, root=tmp_path, tracking=Tracking(None)
    )
    study, _ = s._open_study()
    assert study.metric_names == ["elbo"]
    again = optuna.load_study(study_name="named", storage=sweep.open_storage(str(tmp_path / "n.log")))
    assert again.metric_names == ["elbo"]  # stored with the study, for the dashboard


def test_cmaes_sampler_and_hyperband_pruner_work_on_known_problems():
    """The non-default sampler and pruner, built from their configs, on problems with known answers (fast:
    no training). CMA-ES needs the `cmaes` package and two numeric parameters, ints and log-floats."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = sweep.parse_search_space(
        {"model.latent_dim": "range(2, 51)", "train.lr": "tag(log, interval(1e-5, 1e-1))"}, []
    )
    study = optuna.create_study(
        sampler=sweep.make_sampler({"name": "cmaes", "seed": 0}, space), direction="minimize"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to independent sampling would warn
        for _ in range(60):
            t = study.ask(space.distributions)
            z, lr = t.params["model.latent_dim"], t.params["train.lr"]
            study.tell(t, (z - 20) ** 2 / 100 + (math.log10(lr) + 3) ** 2)  # minimum at z = 20, lr = 1e-3
    assert "cma:generation" in study.trials[-1].system_attrs  # sampled by CMA-ES itself
    assert study.best_value < 0.05
    assert abs(study.best_params["model.latent_dim"] - 20) <= 2
    assert abs(math.log10(study.best_params["train.lr"]) + 3) < 0.2

    # Hyperband with the shipped defaults but max_resource = 9 epochs: curves of bad trials are cut early
    pruner = sweep.make_pruner(
        {"name": "hyperband", "min_resource": 1, "max_resource": 9, "reduction_factor": 3}
    )
    # named: Hyperband puts a trial in a bracket by the crc32 of the study's name and the trial's number, and
    # an unnamed study gets a random name, so which trials were pruned changed from run to run
    study = optuna.create_study(
        study_name="hyperband",
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=pruner,
        direction="maximize",
    )

    def objective(trial):
        quality = trial.suggest_float("quality", 0.0, 1.0)
        for epoch in range(9):
            value = quality * (epoch + 1)  # a better trial is better at every epoch
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    study.optimize(objective, n_trials=40)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(pruned) >= 10 and done
    # what was pruned was worse than what completed, on average
    assert sum(t.params["quality"] for t in pruned) / len(pruned) < sum(
        t.params["quality"] for t in done
    ) / len(done)


def test_trial_timeout_must_be_positive(tmp_path):
    for bad in (0, -5.0):
        with pytest.raises(ConfigError, match="trial_timeout"):
            runner.SweepSettings(study_name="x", storage=str(tmp_path / "x.log"), trial_timeout=bad)


# A stand-in for a trial process (fast: no training): writes metrics/eval.json in its trial dir (argv[1]),
# with a log_px from the trial's number, after argv[2] seconds, and exits 0.
FAKE_TRIAL = """
import json, pathlib, sys, time
d = pathlib.Path(sys.argv[1]); time.sleep(float(sys.argv[2]))
(d / "metrics").mkdir(exist_ok=True)
(d / "metrics" / "eval.json").write_text(json.dumps({"log_px": -100.0 - int(d.name[-4:]), "converged": True}))
"""


class FakeSweep(runner.Sweep):
    """A Sweep whose trial processes are FAKE_TRIAL; `launched` keeps every trial process it started."""

    trial_seconds = 0.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.launched: list[runner._Running] = []

    def _trial_command(self, overrides, trial_dir):
        return [sys.executable, "-c", FAKE_TRIAL, str(trial_dir), str(self.trial_seconds)]

    def _launch(self, trial):
        r = super()._launch(trial)
        self.launched.append(r)
        return r


def _fake_sweep(root, study_name, sweep_dir, cls=FakeSweep, tracking=None, space=None, **settings):
    from optuna.distributions import CategoricalDistribution

    settings = {
        "storage": str(root / "optuna" / f"{study_name}.log"),
        "sampler": {"name": "random", "seed": 0},
        **settings,
    }
    settings = runner.SweepSettings(study_name=study_name, report=False, **settings)
    space = space or sweep.SearchSpace({"model.latent_dim": CategoricalDistribution([2, 3, 4, 5])})
    return cls(settings, space, sweep_dir=sweep_dir, root=root, tracking=tracking or Tracking(None))


def _load(root, study_name):
    import optuna

    storage = sweep.open_storage(str(root / "optuna" / f"{study_name}.log"))
    return optuna.load_study(study_name=study_name, storage=storage)


def test_another_study_never_overwrites_a_trial_dir(tmp_path):
    sweep_dir = tmp_path / "runs" / "mix"
    _fake_sweep(tmp_path, "mix", sweep_dir, n_trials=1).run()
    trial_dir = sweep_dir / "trial-0000"
    before = {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()}
    assert trial_dir / runner.TRIAL_MARK in before and sweep_dir / "optimization_results.json" in before

    other = _fake_sweep(tmp_path, "other", sweep_dir, n_trials=1)
    owner = rf"{trial_dir} holds trial 0 of study 'mix' \({tmp_path / 'optuna' / 'mix.log'}\); study 'other'"
    with pytest.raises(ConfigError, match=owner):
        other.preflight()
    with pytest.raises(ConfigError, match=owner):
        other.run()
    assert {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "optuna" / "other.log").exists()  # no study, no trial
    # the same refusal where two sweeps race for a trial directory (the mark is claimed exclusively)
    other.study_uid = "another"
    with pytest.raises(ConfigError, match=owner):
        other._claim_trial_dir(0)
    (sweep_dir / "trial-0007" / "models").mkdir(parents=True)  # files no trial marked
    with pytest.raises(ConfigError, match="trial-0007 holds files that no trial of this study wrote"):
        other._claim_trial_dir(7)
    assert not (sweep_dir / "trial-0007" / runner.TRIAL_MARK).exists()
    (sweep_dir / "trial-0007" / "models").rmdir()

    # the study itself resumes in its directory: its trials are its own, a new trial gets a new directory
    _fake_sweep(tmp_path, "mix", sweep_dir, n_trials=2).run()
    trials = _load(tmp_path, "mix").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert (trial_dir / "metrics" / "eval.json").read_bytes() == before[trial_dir / "metrics" / "eval.json"]
    assert json.loads((sweep_dir / "trial-0001" / runner.TRIAL_MARK).read_text())["trial"] == 1
    # an interrupted trial is queued again under a new number (retry_of), in a directory of its own
    assert trials[1].user_attrs["trial_dir"] == str(sweep_dir / "trial-0001")

    # a study of the same name created again (its storage deleted) does not own the old one's trials
    (tmp_path / "optuna" / "mix.log").unlink()
    with pytest.raises(ConfigError, match=r"trial-0000 holds trial 0 of an earlier study named 'mix'"):
        _fake_sweep(tmp_path, "mix", sweep_dir, n_trials=1).preflight()

    # another study's optimization_results.json alone is refused too
    lone = tmp_path / "runs" / "lone"
    lone.mkdir()
    results = json.loads((sweep_dir / "optimization_results.json").read_text())
    (lone / "optimization_results.json").write_text(json.dumps(results))
    with pytest.raises(ConfigError, match=r"optimization_results.json holds the results of study 'mix'"):
        _fake_sweep(tmp_path, "other", lone, n_trials=1).preflight()


def test_a_study_never_takes_trials_of_another_data_space(tmp_path):
    import optuna

    from vaerepro.sweep.study import open_study

    storage = str(tmp_path / "s.log")
    kw = {"direction": "maximize", "space": sweep.SearchSpace({}), "sampler": {"name": "random"}}
    binary, continuous = [("binary", False)], [("continuous", False)]
    study, _ = open_study("mix", storage, objective="log_px", pruner=None, data_spaces=binary, **kw)
    assert study.user_attrs["data_spaces"] == [["binary", False]]
    with pytest.raises(
        ConfigError,
        match=r"study 'mix' in .*s.log holds trials of binary pixels — Bernoulli pmf .*; this sweep's trials "
        r"would be in continuous pixels in \[0,1\] — density .* its objective log_px has different units",
    ):
        open_study("mix", storage, objective="log_px", pruner=None, data_spaces=continuous, **kw)
    open_study("mix", storage, objective="log_px", pruner=None, data_spaces=binary, **kw)  # resumes

    # a study made before data spaces were recorded: its trials' data_space attributes tell
    old = optuna.create_study(study_name="old", storage=sweep.open_storage(storage), direction="maximize")
    old.add_trial(
        optuna.trial.create_trial(value=-90.0, user_attrs={"data_space": "continuous", "improper": False})
    )
    with pytest.raises(ConfigError, match="study 'old' .* holds trials of continuous pixels"):
        open_study("old", storage, objective="elbo", pruner=None, data_spaces=binary, **kw)

    # an objective comparable across data spaces may span them, but not with a pruner comparing ELBOs
    open_study("knn", storage, objective="knn_accuracy", pruner=None, data_spaces=binary, **kw)
    open_study("knn", storage, objective="knn_accuracy", pruner=None, data_spaces=continuous, **kw)
    with pytest.raises(ConfigError, match="pruner=median compares validation ELBOs"):
        open_study("knn", storage, objective="knn_accuracy", pruner={"name": "median"}, data_spaces=[], **kw)

    # the sweep refuses before it writes anything (the sweeper calls preflight before multirun.yaml)
    s = _fake_sweep(tmp_path, "mix", tmp_path / "runs", n_trials=1, data_spaces=continuous)
    s.s.storage = storage
    size = (tmp_path / "s.log").stat().st_size
    with pytest.raises(ConfigError, match="holds trials of binary pixels"):
        s.preflight()
    assert (tmp_path / "s.log").stat().st_size == size and not (tmp_path / "runs").exists()


def test_a_resume_with_another_direction_or_objective_is_refused_before_any_write(tmp_path):
    sweep_dir = tmp_path / "runs" / "d"
    _fake_sweep(tmp_path, "d", sweep_dir, n_trials=1).run()
    journal = tmp_path / "optuna" / "d.log"
    files = {p: p.read_bytes() for p in (journal, *sweep_dir.rglob("*")) if p.is_file()}
    refusals = {
        "is a maximize study; direction=minimize needs another hydra.sweeper.study_name": {
            "direction": "minimize"
        },
        "optimises log_px, not elbo: use another hydra.sweeper.study_name": {"objective": "elbo"},
    }
    for message, settings in refusals.items():
        s = _fake_sweep(tmp_path, "d", sweep_dir, n_trials=2, **settings)
        with pytest.raises(ConfigError, match=rf"study 'd' in {journal} {message}"):
            s.preflight()  # what the sweeper calls before it saves multirun.yaml
        with pytest.raises(ConfigError, match=message):
            s.run()  # open_study refuses under the lock, before Optuna writes to the journal
        assert {p: p.read_bytes() for p in files} == files
        assert not s.launched
    _fake_sweep(tmp_path, "d", sweep_dir, n_trials=2).run()  # the same settings resume
    assert _states(_load(tmp_path, "d")) == ["COMPLETE", "COMPLETE"]


@pytest.mark.slow
def test_a_trial_the_sweep_refuses_to_launch_gets_no_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    class Raced(FakeSweep):
        """Another sweep fills trial-0001's directory between check_sweep_dir and this sweep's claim."""

        def _claim_trial_dir(self, number):
            if number == 1:
                (self.sweep_dir / "trial-0001" / "models").mkdir(parents=True)
            return super()._claim_trial_dir(number)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s = _fake_sweep(tmp_path, "raced", tmp_path / "runs", cls=Raced, tracking=Tracking(uri), n_trials=2)
    with pytest.raises(ConfigError, match="trial-0001 holds files that no trial of this study wrote"):
        s.run()
    assert len(s.launched) == 1
    trials = _load(tmp_path, "raced").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "WAITING"]  # queued again for a resume
    client = MlflowClient(uri)
    parent = client.get_run(s.parent_run_id)
    assert parent.info.status == "FAILED" and "trial-0001 holds files" in parent.data.tags["vaerepro.failure"]
    exp = parent.info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{s.parent_run_id}'")
    # trial 0 ran and made no run of its own here (FAKE_TRIAL does not train); trial 1 never started
    assert [r.data.tags.get("vaerepro.trial") for r in children] == []


@pytest.mark.slow
def test_an_error_of_the_sweep_stops_its_trials_and_fails_its_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    class Broken(FakeSweep):
        trial_seconds = 60.0

        def _overdue(self, r):
            raise RuntimeError("boom")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s = _fake_sweep(tmp_path, "broken", tmp_path / "runs", cls=Broken, tracking=Tracking(uri), n_trials=1)
    with pytest.raises(RuntimeError, match="boom"):
        s.run()
    assert [r.proc.returncode for r in s.launched] == [-signal.SIGTERM]  # stopped, not left running
    trials = _load(tmp_path, "broken").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]  # queued again, as after Ctrl-C
    assert trials[0].system_attrs[sweep.INTERRUPTED] is True and trials[1].user_attrs["retry_of"] == 0
    client = MlflowClient(uri)
    parent = client.get_run(s.parent_run_id)
    assert parent.info.status == "FAILED"
    assert "the sweep stopped on an error: RuntimeError: boom" in parent.data.tags["vaerepro.failure"]
    child = client.get_run(trials[0].user_attrs.get("mlflow_run_id") or _child_id(client, s.parent_run_id))
    assert child.info.status == "FAILED" and "boom" in child.data.tags["vaerepro.failure"]


@pytest.mark.slow
def test_a_sigterm_stops_the_sweep_with_143_its_trials_killed_and_a_resume_finishes_it(tmp_path):
    """SIGTERM to a sweep (kill, a scheduler): exit 143 and "stopped by SIGTERM", not the Ctrl-C line and
    130 (the sweep raised KeyboardInterrupt for it); the running trial stopped, FAIL in Optuna and queued
    again, its MLflow run KILLED as any stopped run is, and the study's run KILLED saying why. A resume
    finishes the study: its run FINISHED, without the reason the stop gave."""
    from mlflow import MlflowClient

    from vaerepro.errors import Stopped

    class Terminated(FakeSweep):
        trial_seconds = 60.0

        def _overdue(self, r):
            os.kill(os.getpid(), signal.SIGTERM)  # what `kill <sweep pid>` sends
            return False

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s = _fake_sweep(tmp_path, "term", tmp_path / "runs", cls=Terminated, tracking=Tracking(uri), n_trials=1)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as stop:
        s.run()
    assert signal.getsignal(signal.SIGTERM) is previous  # put back
    assert stop.value.exit_status == 143
    # the command's last line says how it goes on (it said "stopped by SIGTERM" alone)
    assert stop.value.hint == (
        "run the same command again to resume study term: its completed trials are kept, the interrupted "
        "ones are queued again"
    )
    assert [r.proc.returncode for r in s.launched] == [-signal.SIGTERM]
    trials = _load(tmp_path, "term").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]
    client = MlflowClient(uri)
    parent = client.get_run(s.parent_run_id)
    child = client.get_run(_child_id(client, s.parent_run_id))
    for run in (parent, child):
        assert run.info.status == "KILLED"
        assert run.data.tags["vaerepro.failure"] == "interrupted: the sweep was stopped (SIGTERM)"

    again = _fake_sweep(tmp_path, "term", tmp_path / "runs", tracking=Tracking(uri), n_trials=1)
    again.run()
    assert [t.state.name for t in _load(tmp_path, "term").get_trials()] == ["FAIL", "COMPLETE"]
    parent = client.get_run(s.parent_run_id)
    assert again.parent_run_id == s.parent_run_id and parent.info.status == "FINISHED"
    assert "vaerepro.failure" not in parent.data.tags


def test_a_sigterm_python_drops_in_a_finalizer_still_stops_the_sweep(tmp_path):
    """The sweep's handler raised its Stopped inside a finalizer, where Python drops it: the sweep's loop
    raises it at its next turn (vaerepro.signals.check) rather than running the study on."""
    from conftest import drop_in_a_finalizer
    from vaerepro import signals
    from vaerepro.errors import Stopped

    class Dropped(FakeSweep):
        trial_seconds = 60.0

        def _overdue(self, r):
            drop_in_a_finalizer(signal.SIGTERM)  # the sweep's own handler runs, in the finalizer
            return False

    s = _fake_sweep(tmp_path, "dropped", tmp_path / "runs", cls=Dropped, n_trials=1)
    previous, hook = signal.getsignal(signal.SIGTERM), sys.unraisablehook
    signals.install()  # as `vaerepro run` does before the sweeper starts
    try:
        start = time.monotonic()
        with pytest.raises(Stopped):
            s.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = hook
    assert time.monotonic() - start < 30  # not after the 60 s trial
    assert [r.proc.returncode for r in s.launched] == [-signal.SIGTERM]
    assert [t.state.name for t in _load(tmp_path, "dropped").get_trials()] == ["FAIL", "WAITING"]


def _child_id(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(runs) == 1
    return runs[0].info.run_id


def test_a_trial_that_ended_before_ctrl_c_is_recorded_as_it_ended(tmp_path):
    class Interrupted(FakeSweep):
        trial_seconds = 0.5

        def _overdue(self, r):
            r.proc.wait()  # the trial has exited 0, and the sweep has not seen it yet: Ctrl-C now
            raise KeyboardInterrupt

    s = _fake_sweep(tmp_path, "ctrlc", tmp_path / "runs", cls=Interrupted, n_trials=1)
    with pytest.raises(KeyboardInterrupt) as stop:
        s.run()
    assert stop.value.hint.startswith("run the same command again to resume study ctrlc: ")
    trials = _load(tmp_path, "ctrlc").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"]  # not failed, not queued again
    assert trials[0].value == -100.0 and not trials[0].system_attrs.get(sweep.INTERRUPTED)


@pytest.mark.slow
def test_a_trial_past_its_timeout_is_stopped_and_failed_and_the_sweep_goes_on(project):
    # two trials of ~10 s each with a 3 s limit: both stopped, both FAIL with the reason in Optuna and MLflow
    study_name = "timeout"
    start = time.perf_counter()
    proc = _sweep(
        project,
        study_name,
        "model.latent_dim=choice(2,3)",
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.trial_timeout=3",
        "hydra.sweeper.max_failure_rate=1.0",
    )
    assert time.perf_counter() - start < 60, proc.stderr[-2000:]
    trials = _study(project, study_name).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    # stopped by the SIGTERM (at an epoch end: 143; or before training began), never the SIGKILL after it
    shown = f"{[t.user_attrs for t in trials]}\n{proc.stderr[-3000:]}"
    assert all(t.user_attrs["returncode"] in (143, -signal.SIGTERM) for t in trials), shown
    assert all(t.user_attrs["wall_s"] < 35 for t in trials), shown
    _, children = _runs(project, study_name)
    for run in children.values():
        assert run.info.status == "FAILED"
        assert "trial_timeout=3 s" in run.data.tags["vaerepro.failure"]
    assert "still running after trial_timeout=3 s, stopping it" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_mixed_data_space_sweep_refused_before_any_trial(project):
    proc = _sweep(project, "mixed", "+sweep=aevb", "hydra.sweeper.objective=log_px", check=False)
    assert proc.returncode == 2  # a mistake in the input: one line, exit status 2 (docs/errors.md)
    assert "objective 'log_px' cannot rank this search space" in proc.stderr
    assert "binary pixels" in proc.stderr and "continuous pixels" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (project["root"] / "optuna").exists()  # no study, no trial


# --------------------------------------------------------------------------------- slow: real sweeps


@pytest.mark.slow
def test_a_resume_in_another_data_space_or_into_another_studys_dir_is_refused(project):
    # the reproduction: study mix on binary pixels (a pmf), resumed with a Gaussian (a density); then study
    # other with mix's sweep dir. Each is one line, exit status 2, and changes nothing of mix's.
    args = ("hydra.sweeper.objective=log_px", "model.latent_dim=choice(2,3)", "hydra/sweeper/sampler=grid")
    _sweep(project, "mix", "likelihood=bernoulli", *args, "hydra.sweeper.n_trials=1")
    mix_dir = project["root"] / "runs" / "mix"
    before = {p: p.read_bytes() for p in mix_dir.rglob("*") if p.is_file()}

    def refused(cmd):
        proc = subprocess.run(cmd, cwd=project["root"], env=project["env"], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        lines = [line for line in proc.stderr.splitlines() if "vaerepro_optuna:" in line]
        assert len(lines) == 1, proc.stderr[-3000:]
        return lines[0]

    line = refused(_sweep_cmd(project, "mix", "likelihood=gaussian", *args, "hydra.sweeper.n_trials=2"))
    assert "study 'mix'" in line and "holds trials of binary pixels" in line
    assert "continuous pixels in [0,1] — density" in line and "log_px has different units" in line
    cmd = _sweep_cmd(project, "other", "likelihood=bernoulli", *args, "hydra.sweeper.n_trials=1")
    cmd = [f"hydra.sweep.dir={mix_dir}" if a.startswith("hydra.sweep.dir=") else a for a in cmd]
    line = refused(cmd)
    assert f"{mix_dir / 'trial-0000'} holds trial 0 of study 'mix'" in line and "study 'other'" in line

    assert {p: p.read_bytes() for p in mix_dir.rglob("*") if p.is_file()} == before
    assert _states(_study(project, "mix")) == ["COMPLETE"]
    assert not (project["root"] / "optuna" / "other.log").exists()


@pytest.mark.slow
def test_killed_sweep_resumes_without_duplicates(project):
    import optuna

    study_name = "killed"
    args = ("hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0", "model.latent_dim=choice(2,3)")
    proc = subprocess.Popen(
        _sweep_cmd(project, study_name, *args, "hydra.sweeper.n_trials=1"),
        cwd=project["root"],
        env=project["env"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the sweep and its trial process
    )
    log_path = project["root"] / "optuna" / f"{study_name}.log"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if log_path.exists() and any(
                t.state.name == "RUNNING" for t in _study(project, study_name).trials
            ):
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.3)
        time.sleep(4)  # the trial process is training now
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _states(_study(project, study_name)) == ["RUNNING"]

    _sweep(project, study_name, *args, "hydra.sweeper.n_trials=1")
    trials = _study(project, study_name).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[0].system_attrs["vaerepro:interrupted"] is True  # failed at resume, not counted
    assert trials[1].params == trials[0].params and trials[1].user_attrs["retry_of"] == 0
    _, children = _runs(project, study_name)
    assert children[0].info.status == "FAILED" and children[1].info.status == "FINISHED"
    assert children[0].data.tags["vaerepro.trial_state"] == "FAIL"
    assert not [t for t in _study(project, study_name).trials if t.state == optuna.trial.TrialState.RUNNING]


def _session_runs(sid: int) -> bool:
    """Whether a process of session `sid` still runs (a zombie, ended and not yet reaped, does not)."""
    from pathlib import Path

    for proc in Path("/proc").iterdir():
        try:
            state, _, _, session = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue
        if state != "Z" and int(session) == sid:
            return True
    return False


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="pidfds: Linux only")
def test_a_kill_9_of_the_sweep_alone_stops_its_trial(project):
    """`kill -9` of the sweep process alone (the out-of-memory killer, a hard kill of one pid) passes
    nothing on. Its trial watches the sweep that started it (signals.stop_with_parent) and stops as a
    SIGTERM stops it, at its epoch end with its MLflow run KILLED, instead of training on with nobody to
    count its result while a resumed sweep runs the trial again beside it."""
    study_name = "killed-alone"
    args = ("hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0", "model.latent_dim=choice(2,3)")
    cmd = _sweep_cmd(project, study_name, *args, "hydra.sweeper.n_trials=1")
    cmd = ["train.max_epochs=100000" if a == "train.max_epochs=3" else a for a in cmd]  # until stopped
    trial_dir = project["root"] / "runs" / study_name / "trial-0000"
    proc = subprocess.Popen(
        cmd,
        cwd=project["root"],
        env=project["env"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own session: the sweep and its trial process
    )
    try:
        deadline = time.monotonic() + 180
        while not (trial_dir / "models" / "best.ckpt").is_file():  # the trial has trained an epoch
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before the kill"
            time.sleep(0.2)
        proc.kill()  # the sweep alone
        proc.wait()
        deadline = time.monotonic() + 60
        while _session_runs(proc.pid):
            assert time.monotonic() < deadline, "the trial trains on after its sweep was killed"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    log = (trial_dir / "trial.log").read_text()
    assert "SIGTERM received: training stops at the end of this epoch" in log, log[-3000:]
    assert (trial_dir / "models" / "last.ckpt").is_file()
    _, children = _runs(project, study_name)
    assert children[0].info.status == "KILLED"


@pytest.mark.slow
def test_failed_trial_is_marked_and_the_sweep_goes_on(project):
    # a grid: one trial fails its config validation (batch_size must be >= 1), the other trains
    study_name = "failing"
    _sweep(
        project,
        study_name,
        "hydra/sweeper/sampler=grid",
        "train.batch_size=choice(0,50)",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.max_failure_rate=0.5",
    )
    trials = {t.params["train.batch_size"]: t for t in _study(project, study_name).get_trials()}
    assert (trials[0].state.name, trials[50].state.name) == ("FAIL", "COMPLETE")
    assert trials[0].user_attrs["returncode"] == 2
    _, children = _runs(project, study_name)
    failed = children[trials[0].number]
    assert failed.info.status == "FAILED" and failed.data.tags["vaerepro.trial_state"] == "FAIL"
    assert "batch_size" in failed.data.tags["vaerepro.failure"]
    assert failed.data.params["sweep.train.batch_size"] == "0"
    assert children[trials[50].number].info.status == "FINISHED"

    # with max_failure_rate=0 the first failure stops the sweep, with a message and a non-zero exit
    proc = _sweep(
        project,
        "stops",
        "hydra/sweeper/sampler=grid",
        "train.batch_size=choice(0,-1)",
        "hydra.sweeper.n_trials=2",
        check=False,
    )
    assert proc.returncode != 0 and "sweep stopped: 1 of n_trials=2 trials failed" in proc.stderr
    assert _states(_study(project, "stops")) == ["FAIL"]


@pytest.mark.slow
def test_a_sweep_stopped_by_failures_says_why_in_its_run(project):
    # max_failure_rate=0: the first failed trial (a config its process refuses) stops the sweep; the study's
    # run ends FAILED, and like every FAILED run it says why in vaerepro.failure
    proc = _sweep(project, "why", "train.batch_size=choice(0)", "hydra.sweeper.n_trials=2", check=False)
    # the sweep failed (exit status 1, not 2: its input was fine), and says why in a line of its own
    assert proc.returncode == 1, proc.stderr[-3000:]
    said = "vaerepro run: vaerepro_optuna: sweep stopped: 1 of n_trials=2 trials failed"
    line = next((x for x in proc.stderr.splitlines() if x.startswith(said)), proc.stderr[-3000:])
    assert line.endswith("trial-0000/trial.log (its last lines are logged above)"), line
    assert line == proc.stderr.strip().splitlines()[-1]  # the last thing the sweep says
    assert "HYDRA_FULL_ERROR" not in proc.stderr and "Traceback" not in proc.stderr
    parent, _ = _runs(project, "why")
    assert parent.info.status == "FAILED"
    reason = parent.data.tags.get("vaerepro.failure", "")
    assert "sweep stopped: 1 of n_trials=2 trials failed" in reason and "batch_size" in reason


@pytest.mark.slow
def test_pruned_trial(project):
    import optuna

    # a finished trial with a validation ELBO of 0 nats at every epoch: the median pruner stops any real
    # trial (about -200 nats) at its first epoch
    study_name = "pruned"
    storage = sweep.open_storage(str(project["root"] / "optuna" / f"{study_name}.log"))
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, value=0.0, intermediate_values={0: 0.0, 1: 0.0, 2: 0.0}
        )
    )
    _sweep(
        project,
        study_name,
        "model.latent_dim=choice(4)",
        "hydra.sweeper.n_trials=2",
        "hydra/sweeper/pruner=median",
        "hydra.sweeper.pruner.n_startup_trials=1",
        "hydra.sweeper.pruner.n_warmup_steps=0",
    )
    t = _study(project, study_name).get_trials()[1]
    assert t.state.name == "PRUNED" and t.user_attrs["returncode"] == sweep.PRUNED_EXIT_CODE
    assert list(t.intermediate_values) == [0] and t.intermediate_values[0] < -50  # val/elbo, nats
    _, children = _runs(project, study_name)
    assert children[1].info.status == "KILLED" and children[1].data.tags["vaerepro.trial_state"] == "PRUNED"


@pytest.mark.slow
def test_two_sweep_processes_share_one_study(project):
    study_name = "shared"
    args = ("hydra/sweeper/sampler=grid", "model.latent_dim=choice(2,3,4)", "hydra.sweeper.n_trials=3")
    procs = [
        subprocess.Popen(
            _sweep_cmd(project, study_name, *args),
            cwd=project["root"],
            env=project["env"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
        assert "database is locked" not in out + err
    trials = _study(project, study_name).get_trials()
    assert [t.number for t in trials] == [0, 1, 2] and _states(_study(project, study_name)) == [
        "COMPLETE"
    ] * 3
    assert sorted(t.params["model.latent_dim"] for t in trials) == [2, 3, 4]  # no point twice
    assert len({t.system_attrs["vaerepro:pid"] for t in trials}) == 2  # both processes ran trials
    parent, children = _runs(project, study_name)
    assert sorted(children) == [0, 1, 2]
    assert {r.data.tags["mlflow.parentRunId"] for r in children.values()} == {parent.info.run_id}


def _study_of(values: list[tuple[int, float]]):
    import optuna

    study = optuna.create_study(direction="maximize")
    dists = {
        "x": optuna.distributions.IntDistribution(1, 30),
        "y": optuna.distributions.IntDistribution(1, 30),
    }
    for i, (x, value) in enumerate(values):
        trial = optuna.trial.create_trial(
            params={"x": x, "y": 1 + (7 * i) % 30}, distributions=dists, value=value
        )
        study.add_trial(trial)
    return study


def test_importances_optuna_cannot_measure_are_not_charted():
    """One completed trial: Optuna 5's PED-ANOVA returns importance 0 for every parameter, with a warning; the
    report says why there are none instead of charting the placeholders. Where the value follows x alone,
    x gets the larger importance and the chart is drawn."""
    from vaerepro.document import Fig, Para
    from vaerepro.sweep.report import _importance_blocks

    blocks = _importance_blocks(_study_of([(3, -100.0)]))
    assert not any(isinstance(b, Fig) for b in blocks)
    (para,) = [b for b in blocks if isinstance(b, Para)]
    assert para.text.startswith("Not available: Optuna: The number of trials is too small"), para.text

    import optuna

    study = _study_of([(x, -100.0 - (x - 15) ** 2) for x in range(1, 31)])
    imp = optuna.importance.get_param_importances(study)
    assert imp["x"] > imp["y"], imp
    blocks = _importance_blocks(study)
    assert [b.name for b in blocks if isinstance(b, Fig)] == ["importances"]
    assert not any(isinstance(b, Para) for b in blocks)


def test_importances_other_warnings_still_reach_the_user(monkeypatch):
    import warnings

    import optuna

    from vaerepro.document import Fig
    from vaerepro.sweep.report import _importance_blocks

    def importances(study):
        warnings.warn("some other Optuna warning", UserWarning, stacklevel=2)
        return {"x": 0.8, "y": 0.2}

    monkeypatch.setattr(optuna.importance, "get_param_importances", importances)
    with pytest.warns(UserWarning, match="some other Optuna warning"):
        blocks = _importance_blocks(_study_of([(3, -100.0)]))
    assert [b.name for b in blocks if isinstance(b, Fig)] == ["importances"]
