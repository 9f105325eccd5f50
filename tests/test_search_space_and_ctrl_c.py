"""A sweep's search space as it is sampled, a sweep refused before it writes anything, and Ctrl-C on the
command line: one line and exit status 130, never a traceback, training stopped at an epoch end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest

from conftest import BIN, ROOT, TINY, compose, ctrl_c_at_a_terminal
from vaerepro import sweep
from vaerepro.config import ConfigError

# --- the search space: each syntax sampled as it reads ------------------------------------------------


def _dist(text: str):
    return sweep.parse_search_space({"k": text}, []).distributions["k"]


def test_a_descending_range_holds_the_values_of_the_ascending_one():
    from optuna.distributions import FloatDistribution, IntDistribution

    assert _dist("range(10, 1, -2)") == IntDistribution(2, 10, step=2)  # 10, 8, 6, 4, 2
    assert _dist("range(1.0, 0.0, -0.25)") == FloatDistribution(0.25, 1.0, step=0.25)


def test_a_log_tag_on_a_range_samples_on_a_log_scale_or_is_refused():
    from optuna.distributions import IntDistribution

    assert _dist("tag(log, range(1, 1025))") == IntDistribution(1, 1024, log=True)
    with pytest.raises(ConfigError, match=r"range\(1, 100, 5\)\): a log scale needs integers with step 1"):
        _dist("tag(log, range(1, 100, 5))")


def test_an_integer_interval_samples_only_integers_inside_it():
    from optuna.distributions import IntDistribution

    assert _dist("tag(int, interval(1.5, 10.7))") == IntDistribution(2, 10)
    with pytest.raises(ConfigError, match="holds no integer"):
        _dist("tag(int, interval(1.2, 1.8))")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("interval(1, 0)", r"k=interval\(1, 0\): .*low <= high"),  # Optuna's ValueError, as one line
        ("tag(log, interval(0, 1))", r"k=tag\(log, interval\(0, 1\)\): .*low"),
        ("choice(2, 3", r"hydra.sweeper.params: k=choice\(2, 3: "),  # Hydra's parse error, naming the key
    ],
)
def test_a_search_space_optuna_or_hydra_refuses_is_a_config_error_naming_it(text, expected):
    with pytest.raises(ConfigError, match=expected):
        _dist(text)


def test_a_sweep_no_trial_of_which_can_run_is_refused_naming_the_key():
    """A fixed value every trial fails on, or every combination invalid, refused before the study starts."""

    def composer(overrides):
        return compose(*overrides)

    fixed_bad = sweep.parse_search_space({"model.latent_dim": "choice(2, 5)"}, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"no trial .* can run; the fixed config: train.lr: .*than 0"):
        sweep.data_spaces(fixed_bad, composer)
    improper = sweep.parse_search_space({"likelihood": "choice(bernoulli)"}, ["data.space=continuous"])
    with pytest.raises(ConfigError, match="likelihood=bernoulli: .*allow_improper"):
        sweep.data_spaces(improper, composer)
    # one invalid combination among valid ones is skipped (its trials fail with the message)
    some = sweep.parse_search_space(
        {"likelihood": "choice(bernoulli, continuous_bernoulli)"}, ["data.space=continuous"]
    )
    assert sweep.data_spaces(some, composer) == {("continuous", False): ["likelihood=continuous_bernoulli"]}


def test_an_unknown_option_in_the_search_space_is_refused_in_one_line(tmp_path):
    """The sweeper's own composer raises Hydra's exceptions (not ConfigError): one line naming the option."""
    from hydra.errors import ConfigCompositionException

    def composer(overrides):
        if "likelihood=poisson" in overrides:
            raise ConfigCompositionException(
                "In 'config': Could not find 'likelihood/poisson'\nAvailable options in 'likelihood':\n"
                "\tbernoulli\nConfig search path:\n\tprovider=hydra"
            )
        return compose(*overrides)

    space = sweep.parse_search_space({"likelihood": "choice(bernoulli, poisson)"}, [])
    with pytest.raises(ConfigError, match=r"likelihood=poisson: In 'config': Could not find") as err:
        sweep.data_spaces(space, composer)
    assert "\n" not in str(err.value) and "search path" not in str(err.value)


# --- Ctrl-C ------------------------------------------------------------------------------------------


def test_ctrl_c_outside_training_is_one_line_and_exit_130(monkeypatch, capsys):
    from vaerepro import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_main", interrupted)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        status = cli.main(["evaluate"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left vaerepro as a KeyboardInterrupt traceback")
    finally:
        signal.signal(signal.SIGTERM, previous)  # cli.main installs vaerepro's
    assert status == 130
    assert capsys.readouterr().err == "vaerepro evaluate: stopped (Ctrl-C); run vaerepro evaluate again\n"

    def sweep_interrupted(argv):  # a sweep names how it resumes (sweep.runner.RESUME_HINT)
        stop = KeyboardInterrupt()
        stop.hint = "run the same command again to resume study s: ..."
        raise stop

    monkeypatch.setattr(cli, "_main", sweep_interrupted)
    try:
        assert cli.main(["run", "-m"]) == 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err == (
        "vaerepro run: stopped (Ctrl-C); run the same command again to resume study s: ...\n"
    )


@pytest.mark.slow
def test_ctrl_c_stops_training_at_its_epoch_end_with_last_ckpt_and_exit_130(tmp_path, raw_dir, prepared_tiny):
    """Ctrl-C at a terminal during `vaerepro train`: as SIGTERM, the epoch ends, last.ckpt is written and the
    line says how to resume (Lightning turned the KeyboardInterrupt into exit status 1, no last.ckpt)."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    shutil.copytree(prepared_tiny / "prepared", tmp_path / "prepared")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    overrides = [*TINY, f"data.raw_dir={raw_dir}", "tracking.enabled=false", "train.max_epochs=10000"]
    subprocess.run(["vaerepro", "params", *overrides], cwd=tmp_path, env=env, check=True, capture_output=True)
    code, err = ctrl_c_at_a_terminal(
        ["vaerepro", "train", "--no-progress"], tmp_path / "models" / "best.ckpt", cwd=tmp_path, env=env
    )  # once the first epoch has ended
    assert code == 130, err
    assert "Traceback" not in err and "SIGINT received: training stops at the end of this epoch" in err, err
    assert err.splitlines()[-1].startswith("vaerepro train: stopped by SIGINT: training stopped after "), err
    assert "train.resume=true" in err.splitlines()[-1]
    assert (tmp_path / "models" / "last.ckpt").is_file()
    assert not (tmp_path / "metrics" / "train.json").exists()


# --- --multirun: the overrides every job shares --------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--multirun", "model.foo=1", "model.latent_dim=2,3"],
            r"overrides model.foo=1: model.foo: no such key \(model has",
        ),
        (
            ["-m", "hydra/sweeper=vaerepro_optuna", "model.latent_dim=choice(2,"],
            r"model.latent_dim=choice\(2,",
        ),
        (["--multirun", "likelihood=poisson", "seed=0,1"], r"Could not find 'likelihood/poisson'"),
    ],
)
def test_a_multirun_with_an_unknown_shared_key_is_refused_in_one_line(argv, expected):
    """Hydra refused them after several lines with exit status 1 (and the basic sweeper left its dir)."""
    from vaerepro import run_overrides

    with pytest.raises(ConfigError, match=expected) as err:
        run_overrides.check_overrides(argv, ROOT)
    assert "\n" not in str(err.value)


def test_a_multirun_check_composes_the_shared_overrides_only():
    from vaerepro import run_overrides

    # the swept values are the sweeper's (each job validates its own); Hydra's other flags are Hydra's
    run_overrides.check_overrides(
        ["--multirun", "+sweep=aevb", "model.latent_dim=0,2", "hydra.sweeper.n_trials=3"], ROOT
    )
    run_overrides.check_overrides(["--cfg", "job", "model.foo=1"], ROOT)


# --- a trial's outcome ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["[1, 2]", "null", '"log_px"'])
def test_a_trial_whose_eval_json_is_not_an_object_is_a_fail_not_an_error_of_the_sweep(tmp_path, text):
    from vaerepro.sweep.outcome import trial_outcome

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text(text)
    state, value, reason, _ = trial_outcome(tmp_path, 0, "log_px")
    assert (state, value) == ("FAIL", None) and "eval.json is not a JSON object" in reason


def test_a_trial_whose_eval_json_holds_an_impossible_number_is_a_fail(tmp_path):
    """No hand-edited or damaged number (a negative standard error, log p(x) far above 0 on binary pixels)
    reaches Optuna, the best trial or the sweep report: the trial is a FAIL naming the file and the key."""
    from vaerepro.sweep.outcome import trial_outcome

    (tmp_path / "metrics").mkdir()
    ev = {"log_px": -90.0, "log_px_se": 0.5, "data_space": "binary", "improper": False, "num_examples": 100}
    for bad, key in (({"log_px_se": -0.5}, "log_px_se = -0.5"), ({"log_px": 3.0}, "log_px = 3.0")):
        (tmp_path / "metrics" / "eval.json").write_text(json.dumps({**ev, **bad}))
        state, value, reason, _ = trial_outcome(tmp_path, 0, "log_px")
        assert (state, value) == ("FAIL", None) and f"eval.json: {key}" in reason, reason
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(ev))
    assert trial_outcome(tmp_path, 0, "log_px")[:2] == ("COMPLETE", -90.0)
