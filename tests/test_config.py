"""The composed config, params.yaml, and the schema's errors."""

from __future__ import annotations

import pytest
import yaml

from conftest import ROOT, compose
from vaerepro import config as config_mod
from vaerepro import params_file
from vaerepro.config import ConfigError


def test_params_yaml_equals_composed_conf():
    text = (ROOT / "params.yaml").read_text()
    assert yaml.safe_load(text) == compose(), (
        "params.yaml is stale: run `vaerepro params` (or `make params`) and commit it"
    )
    assert text == params_file.params_text(compose(), []), "not as `vaerepro params` writes it"


def _project(tmp_path):
    """A copy of conf/ in tmp_path, the place of a params.yaml beside it."""
    import shutil

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    return tmp_path / "conf", tmp_path / "params.yaml"


def test_a_params_yaml_that_conf_no_longer_composes_names_each_key_that_differs(tmp_path):
    """`dvc repro` does not compose conf/: after an edit of conf/ it runs params.yaml under the old values.
    params_drift compares the file with conf/ as it composes now, with the overrides `vaerepro params`
    recorded in the file's first line (a value with spaces or quotes comes back whole)."""
    conf, params = _project(tmp_path)
    overrides = ["likelihood=gaussian", "likelihood.sigma=0.1", "train.lr_candidates=[0.01, 0.001]"]
    raw = config_mod.compose(overrides, conf)
    params.write_text(params_file.params_text(raw, overrides))
    assert params_file.recorded_overrides(params.read_text()) == overrides
    assert params_file.params_drift(params, conf) == (overrides, [])  # the overrides are no drift

    model = conf / "model" / "mlp.yaml"
    mlp = yaml.safe_load(model.read_text())
    model.write_text(yaml.safe_dump({**mlp, "latent_dim": 7, "hidden_dims": [300, 300]}, sort_keys=False))
    assert params_file.params_drift(params, conf) == (
        overrides,
        [
            f"model.latent_dim: params.yaml {mlp['latent_dim']!r}, conf/ 7",
            f"model.hidden_dims: params.yaml {mlp['hidden_dims']!r}, conf/ [300, 300]",
        ],
    )


def test_a_params_yaml_another_writer_wrote_is_compared_with_conf_alone(tmp_path):
    """`dvc exp run` writes params.yaml without the header (and an editor may drop it): no overrides are
    known, so the file is compared with conf/ alone; a key the file lacks or adds is named too."""
    conf, params = _project(tmp_path)
    raw = config_mod.compose(["model.latent_dim=5"], conf)
    del raw["eval"]["seed"]
    raw["eval"]["extra"] = 1
    params.write_text(config_mod.dump(raw))
    assert params_file.recorded_overrides(params.read_text()) is None
    seed = compose()["eval"]["seed"]
    assert params_file.params_drift(params, conf) == (
        None,
        [
            "model.latent_dim: params.yaml 5, conf/ 20",
            "eval.extra: params.yaml 1, conf/ absent",
            f"eval.seed: params.yaml absent, conf/ {seed!r}",
        ],
    )


@pytest.mark.slow
def test_an_experiment_without_the_overrides_its_baseline_recorded_names_each_key_it_lost(tmp_path):
    """`dvc exp run` composes conf/ with its -S overrides alone: the overrides `vaerepro params` wrote into
    the baseline's params.yaml are not in the experiment unless given again. Each key they set that the
    experiment has at conf/'s own value is named with both values, a key conf/'s default group lacks as
    absent; a key the experiment's -S set otherwise is its own change, not a loss."""
    conf, params = _project(tmp_path)
    recorded = ["data=npz", "data.path=/data/mine.npz", "model.latent_dim=7"]
    baseline = params_file.params_text(config_mod.compose(recorded, conf), recorded)
    params.write_text(config_mod.dump(config_mod.compose(["model.latent_dim=9"], conf)))
    plain, npz = compose()["data"], compose("data=npz")["data"]
    assert params_file.overrides_left_out(params, baseline, conf) == (
        recorded,
        [
            f"data.source: experiment {plain['source']!r}, baseline 'npz'",
            "data.path: experiment None, baseline '/data/mine.npz'",
            f"data.max_npz_bytes: experiment absent, baseline {npz['max_npz_bytes']!r}",
        ],
    )
    params.write_text(config_mod.dump(config_mod.compose([*recorded, "train.lr=0.1"], conf)))
    assert params_file.overrides_left_out(params, baseline, conf) == ([], [])  # carried: nothing lost
    unrecorded = config_mod.dump(config_mod.compose(recorded, conf))  # dvc exp run or an editor wrote it
    assert params_file.overrides_left_out(params, unrecorded, conf) == ([], [])


def test_dvc_hydra_composition_writes_the_same_params(tmp_path):
    # What `dvc exp run` does before running the pipeline (DVC's own code, not ours).
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(ROOT / "conf"), None, "config", str(tmp_path), [])
    assert yaml.safe_load(out.read_text()) == yaml.safe_load((ROOT / "params.yaml").read_text())
    compose_and_dump(
        out,
        str(ROOT / "conf"),
        None,
        "config",
        str(tmp_path),
        ["likelihood=continuous_bernoulli", "model.latent_dim=5"],
    )
    cfg = config_mod.validate(yaml.safe_load(out.read_text()))
    assert (cfg.likelihood.name, cfg.model.latent_dim, cfg.data_space) == (
        "continuous_bernoulli",
        5,
        "continuous",
    )


def test_every_registered_likelihood_has_a_schema_section_and_a_conf_option():
    """A likelihood is written in three places that must agree: its class in likelihoods.REGISTRY, its
    section of the schema (config.LikelihoodConfig, pydantic's union by `name`) and its Hydra option
    conf/likelihood/<name>.yaml. Each section holds its constructor's keys with its defaults, and the conf
    file composes to the constructor's defaults."""
    import inspect
    from typing import get_args

    from vaerepro.likelihoods import REGISTRY, get_likelihood

    union = get_args(config_mod.LikelihoodConfig)[0]
    sections = {get_args(s.model_fields["name"].annotation)[0]: s for s in get_args(union)}
    options = {p.stem for p in (ROOT / "conf" / "likelihood").glob("*.yaml")}
    assert set(sections) == set(REGISTRY) == options
    for name, cls in REGISTRY.items():
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        signature = inspect.signature(cls.__init__).parameters.values()
        params = {p.name: p.default for p in signature if p.name != "self" and p.kind in named}
        fields = {k: f.default for k, f in sections[name].model_fields.items() if k != "name"}
        assert fields == params, name
        composed = compose(f"likelihood={name}")["likelihood"]
        assert get_likelihood(**composed).config() == cls().config(), name


def test_defaults_are_the_papers():
    cfg = config_mod.validate(compose())
    assert cfg.model.hidden_dims == [500] and cfg.model.activation == "tanh"  # AEVB's MNIST MLP
    assert cfg.train.batch_size == 100 and cfg.train.estimator == "B"
    assert (cfg.likelihood.name, cfg.data_space, cfg.improper) == ("bernoulli", "binary", False)
    assert cfg.run_name == "bernoulli-z20-s0"


def test_new_keys_default_to_what_every_run_had_before_them():
    """A constant rate, torch's Adam (its own defaults, passed explicitly now) and torch's init: the default
    pipeline's numbers do not move."""
    import torch

    cfg = config_mod.validate(compose())
    assert cfg.train.lr_schedule == "constant" and cfg.model.init == "default"
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]).defaults
    assert tuple(cfg.train.adam_betas) == adam["betas"] == (0.9, 0.999)
    assert cfg.train.adam_eps == adam["eps"] == 1e-8
    assert cfg.model.init_std == 0.01  # AEVB's "N(0, 0.01)", read as a standard deviation


def test_iwae_settings_validate():
    cfg = config_mod.validate(
        compose(
            "train.lr_schedule=iwae",
            "train.adam_eps=1e-4",
            "model.init=glorot",
            "train.adam_betas=[0.9,0.99]",
        )
    )
    assert (cfg.train.lr_schedule, cfg.train.adam_eps, cfg.model.init) == ("iwae", 1e-4, "glorot")
    assert cfg.train.adam_betas == [0.9, 0.99]
    assert config_mod.validate(compose("model.init=normal", "model.init_std=0.1")).model.init_std == 0.1


# IWAE's two stochastic layers (5.1): x -> 200-200 -> z1 (100) -> 100-100 -> z2 (50)
TWO = ["model.stochastic_layers=2", "model.latent_dim_2=50", "model.hidden_dims_2=[100,100]"]


def test_two_stochastic_layers_validate():
    """The one-layer default is unchanged (no _2 keys); IWAE's two-layer model validates with estimator A,
    and with the IWAE objective, whose estimator key is not used."""
    one = config_mod.validate(compose()).model
    assert (one.stochastic_layers, one.latent_dim_2, one.hidden_dims_2) == (1, None, None)
    iwae = ["model.hidden_dims=[200,200]", "model.latent_dim=100", *TWO]
    cfg = config_mod.validate(compose(*iwae, "train.estimator=A"))
    assert (cfg.model.stochastic_layers, cfg.model.latent_dim, cfg.model.hidden_dims) == (2, 100, [200, 200])
    assert (cfg.model.latent_dim_2, cfg.model.hidden_dims_2) == (50, [100, 100])
    cfg = config_mod.validate(compose(*iwae, "train.objective=iwae", "train.num_samples=5"))
    assert cfg.train.estimator == "B" and cfg.model.stochastic_layers == 2


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        (["likelihood.name=poisson"], "likelihood", "bernoulli"),
        (["model.latent_dim=0"], "model.latent_dim", "greater than or equal to 1"),
        (["eval.num_samples=0"], "eval.num_samples", "greater than or equal to 1"),
        (["train.optimizer=sgd"], "train.optimizer", "adagrad"),
        (["data.val_fraction=0.5", "data.test_fraction=0.5"], "data", "no training data"),
        (["data=npz"], "data", "data.path"),
        (["data.path=/x.npz"], "data", "data.path is for your own .npz (data=npz), not data.source=mnist5k"),
        (["data=npz", "data.path=/x.npz", "data.url=http://h/x"], "data", "data.url is for downloaded"),
        (["data.source=cifar"], "data.source", "'fashion_mnist', 'frey_faces' or 'npz'"),
        (["data.space=grey"], "data.space", "'auto', 'binary' or 'continuous'"),
        (["likelihood=gaussian", "data.space=binary"], "data.space", "binary"),
        (["data.space=continuous"], "data.space", "allow_improper"),
        (["model.hidden_dims=[]"], "model.hidden_dims", "at least 1"),
        (["+model.layers=3"], "model.layers", "no such key (model has latent_dim, hidden_dims, activation"),
        (["train.lr_schedule=cosine"], "train.lr_schedule", "'constant' or 'iwae'"),
        (["train.adam_betas=[0.9]"], "train.adam_betas", "at least 2 items"),
        (["train.adam_betas=[0.9,0.99,0.999]"], "train.adam_betas", "at most 2 items"),
        (["train.adam_betas=[0.9,1.0]"], "train.adam_betas.1", "less than 1"),
        (["train.adam_eps=0"], "train.adam_eps", "greater than 0"),
        (["train.optimizer=adagrad", "train.adam_eps=1e-4"], "train.adam_eps=0.0001", "optimizer=adam only"),
        (["model.init=xavier"], "model.init", "'default', 'glorot' or 'normal'"),
        (["model.init_std=0"], "model.init_std", "greater than 0"),
        (["model.init_std=inf"], "model.init_std", "finite number"),
        (["model.stochastic_layers=3"], "model.stochastic_layers", "1 or 2"),
        (["model.stochastic_layers=2", "train.estimator=A"], "model.latent_dim_2", "needs"),
        ([*TWO[:2], "train.estimator=A"], "model.hidden_dims_2", "needs"),
        (["model.latent_dim_2=50"], "model.latent_dim_2", "stochastic_layers=2 only"),
        (["model.hidden_dims_2=[100]"], "model.hidden_dims_2", "stochastic_layers=2 only"),
        ([*TWO[:2], "model.hidden_dims_2=[]", "train.estimator=A"], "model.hidden_dims_2", "at least 1"),
        ([*TWO, "model.latent_dim_2=0", "train.estimator=A"], "model.latent_dim_2", "greater than or equal"),
        (TWO, "train.estimator=B", "use train.estimator=A"),
        # accepted before, then a traceback in the train stage (NaN weights from the first step)
        (["train.lr=inf"], "train.lr", "finite number"),
        (["train.weight_decay=inf"], "train.weight_decay", "finite number"),
    ],
)
def test_bad_config_names_the_key(overrides, key, hint):
    with pytest.raises(ConfigError) as err:
        config_mod.validate(compose(*overrides))
    msg = str(err.value)
    assert key in msg and hint in msg, msg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "eval.batch_size=abc",
            "eval.batch_size: Input should be a valid integer, unable to parse string as an integer, "
            "or 'auto' (given: 'abc')",
        ),
        (
            "eval.batch_size=0",
            "eval.batch_size: Input should be greater than or equal to 1, or 'auto' (given: 0)",
        ),
        (
            "trainer.cuda_graph=maybe",
            "trainer.cuda_graph: Input should be a valid boolean, unable to interpret input, or 'auto' "
            "(given: 'maybe')",
        ),
    ],
)
def test_a_union_key_reads_as_one_key(override, expected):
    """`int | 'auto'` fails in each branch; the user sees the key they typed once, with every allowed
    form, not pydantic's branch names (eval.batch_size.constrained-int, ...literal['auto'])."""
    with pytest.raises(ConfigError) as err:
        config_mod.validate(compose(override))
    assert str(err.value) == expected


def test_errors_of_several_keys_stay_apart():
    with pytest.raises(ConfigError) as err:
        config_mod.validate(compose("model.latent_dim=0", "eval.batch_size=x"))
    assert str(err.value) == (
        "model.latent_dim: Input should be greater than or equal to 1 (given: 0); "
        "eval.batch_size: Input should be a valid integer, unable to parse string as an integer, or 'auto' "
        "(given: 'x')"
    )


def test_improper_bernoulli_needs_opt_in_and_is_marked():
    cfg = config_mod.validate(compose("data.space=continuous", "likelihood.allow_improper=true"))
    assert cfg.data_space == "continuous" and cfg.improper


@pytest.mark.parametrize("name", ["gaussian", "continuous_bernoulli"])
def test_density_likelihoods_live_on_continuous_data(name):
    cfg = config_mod.validate(compose(f"likelihood={name}"))
    assert cfg.data_space == "continuous" and not cfg.improper


def test_load_missing_params_file_says_how_to_make_it(tmp_path):
    with pytest.raises(ConfigError, match="vaerepro params"):
        config_mod.load(tmp_path / "params.yaml")


def test_improper_runs_say_so_in_their_name():
    cfg = config_mod.validate(compose("data.space=continuous", "likelihood.allow_improper=true", "seed=2"))
    assert cfg.run_name == "bernoulli-improper-z20-s2"


def test_gaussian_scale_defaults_to_softplus_and_round_trips():
    """likelihood.scale: softplus (the default, today's floored sigma) or log_variance (AEVB's Frey Face
    decoder); the validated section rebuilds the same likelihood, as a checkpoint's vae_config does."""
    assert config_mod.validate(compose("likelihood=gaussian")).likelihood.scale == "softplus"
    cfg = config_mod.validate(
        compose("data=frey_faces", "likelihood=gaussian", "likelihood.scale=log_variance")
    )
    lik = cfg.likelihood_object()
    assert lik.config() == cfg.likelihood.model_dump() and lik.scale == "log_variance"
    assert cfg.data_space == "continuous" and not cfg.improper
    for bad, hint in (
        ("likelihood.scale=exp", "'softplus' or 'log_variance'"),
        ("likelihood.min_sigma=0.001", "has no floor"),
        ("likelihood.sigma=0.1", "is for a learned sigma"),
    ):
        with pytest.raises(ConfigError, match="likelihood") as err:
            config_mod.validate(compose("likelihood=gaussian", "likelihood.scale=log_variance", bad))
        assert hint in str(err.value)


def test_an_unknown_config_option_is_one_line_with_the_options_not_the_search_path():
    with pytest.raises(ConfigError) as err:
        config_mod.compose(["likelihood=poisson"])
    assert str(err.value) == (
        "overrides likelihood=poisson: In 'config': Could not find 'likelihood/poisson' Available options in "
        "'likelihood': bernoulli continuous_bernoulli gaussian"
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # K is what the papers call it; Hydra's own advice, "+eval.K=10", is refused by the schema next
        (
            ["eval.K=10"],
            "eval.K: no such key (eval has num_samples, batch_size, chunk_size, seed, num_images, ",
        ),
        (["evl.K=3"], "evl: no such key (the top level has data, model, likelihood, train, trainer, eval, "),
        (["likelihod=gaussian"], "likelihod: no such key (the top level has data, model, likelihood, "),
        # the keys of the likelihood the other overrides choose
        (
            ["likelihood=gaussian", "likelihood.p=1"],
            "likelihood.p: no such key (likelihood has name, sigma, ",
        ),
        (["likelihood.sigma=0.1"], "likelihood.sigma: no such key (likelihood has name, allow_improper)"),
        # Hydra's own keys, and the sweeper's: "+hydra.sweeper.n_trial=3" was its constructor's TypeError
        (["hydra.run.dirx=a"], "hydra.run.dirx: no such key (hydra.run has dir)"),
        (
            ["hydra/sweeper=vaerepro_optuna", "hydra.sweeper.n_trial=3"],
            "hydra.sweeper.n_trial: no such key (hydra.sweeper has sampler, pruner, objective, direction, ",
        ),
        # where "+" is the way, Hydra's advice stays: an empty section, a key that is not a section (null)
        (["hydra.job.env_set.FOO=bar"], "Could not override 'hydra.job.env_set.FOO'. To append to your "),
        (["model.hidden_dims_2.x=3"], "Could not override 'model.hidden_dims_2.x'. To append to your "),
    ],
)
def test_an_unknown_key_in_an_override_names_the_keys_there_are(overrides, expected):
    with pytest.raises(ConfigError) as err:
        config_mod.compose(overrides)
    assert str(err.value).startswith(f"overrides {' '.join(overrides)}: {expected}"), err.value


def test_an_unknown_key_in_a_params_file_names_the_keys_there_are(tmp_path):
    raw = compose()
    raw["eval"]["K"], raw["model"]["foo"], raw["bar"] = 10, 1, 2
    raw["likelihood"]["sigma"] = 0.1  # bernoulli's section: its tag is in pydantic's location, not the key
    with pytest.raises(ConfigError) as err:
        config_mod.validate(raw)
    assert sorted(str(err.value).split("; ")) == [
        "bar: no such key (the top level has data, model, likelihood, train, trainer, eval, tracking, seed)",
        "eval.K: no such key (eval has num_samples, batch_size, chunk_size, seed, num_images, device, "
        "precision)",
        "likelihood.sigma: no such key (likelihood has name, allow_improper)",
        "model.foo: no such key (model has latent_dim, hidden_dims, activation, init, init_std, "
        "stochastic_layers, latent_dim_2, hidden_dims_2, dropout)",
    ]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("seed=true", "seed"),
        ("model.latent_dim=true", "model.latent_dim"),
        ("model.hidden_dims=[500,true]", "model.hidden_dims"),
        ("model.stochastic_layers=true", "model.stochastic_layers"),
        ("trainer.devices=true", "trainer.devices"),
        ("train.lr=true", "train.lr"),
        ("eval.batch_size=false", "eval.batch_size"),
    ],
)
def test_a_boolean_where_a_number_is_meant_is_refused(override, key):
    """pydantic read `seed: true` as seed 1 and `model.latent_dim: yes` as 1: refused, naming the key."""
    with pytest.raises(ConfigError) as err:
        config_mod.validate(compose(override))
    assert str(err.value).startswith(f"{key}: Input should be a number, not true or false (given: ")


def test_a_boolean_gaussian_sigma_is_refused_and_strings_of_numbers_still_read():
    with pytest.raises(ConfigError, match="^likelihood.sigma: Input should be a number, not true or false"):
        config_mod.validate(compose("likelihood=gaussian", "likelihood.sigma=true"))
    # PyYAML reads 1e-3 as a string: still a number; and true is still a boolean where one is meant
    raw = compose("train.early_stopping=true", "trainer.cuda_graph=false", "likelihood.allow_improper=true")
    raw["train"]["lr"], raw["model"]["latent_dim"] = "1e-3", "5"
    cfg = config_mod.validate(raw)
    assert (cfg.train.lr, cfg.model.latent_dim, cfg.train.early_stopping) == (0.001, 5, True)
    assert (cfg.trainer.cuda_graph, cfg.likelihood.allow_improper) == (False, True)


@pytest.mark.parametrize(("override", "got"), [("model=null", "NoneType"), ("likelihood=5", "int")])
def test_a_config_group_given_no_option_name_is_one_line(override, got):
    # Hydra raises a plain ValueError for these: a traceback of `vaerepro params` and `vaerepro run` before
    with pytest.raises(ConfigError) as err:
        config_mod.compose([override])
    assert str(err.value) == (
        f"overrides {override}: Config group override must be a string or a list. Got {got}"
    )


def test_load_refuses_a_key_given_twice(tmp_path):
    """PyYAML keeps the last of two equal keys: a `model:` section appended to params.yaml replaced the whole
    section, the keys it lacks falling back to the defaults; DVC refuses such a file as corrupted."""
    params = tmp_path / "params.yaml"
    whole = config_mod.dump(compose("model.hidden_dims=[200,200]"))
    params.write_text(whole + "model:\n  latent_dim: 5\n")
    with pytest.raises(ConfigError) as err:
        config_mod.load(params)
    line = len(whole.splitlines()) + 1
    assert str(err.value) == f"{params}: not valid YAML at line {line}, column 1 (key 'model' given twice)"
    params.write_text(whole.replace("  latent_dim: 20\n", "  latent_dim: 20\n  latent_dim: 5\n"))
    with pytest.raises(ConfigError, match=r"at line \d+, column 3 \(key 'latent_dim' given twice\)"):
        config_mod.load(params)
    params.write_text(whole)
    assert config_mod.load(params).model.hidden_dims == [200, 200]


def test_a_check_of_a_section_or_across_sections_reads_without_pydantics_prefixes():
    """Our validators' errors read "<root>: Value error, ..." and "data: Value error, ..." before."""
    with pytest.raises(ConfigError) as err:
        config_mod.validate(compose(*TWO))
    assert str(err.value) == (
        "train.estimator=B (the analytic KL) is for one stochastic layer; with model.stochastic_layers=2 use "
        "train.estimator=A"
    )
    with pytest.raises(ConfigError) as err:
        config_mod.validate(compose("data=npz"))
    assert str(err.value) == "data: source=npz needs data.path=/path/to/file.npz"


def test_a_likelihood_section_without_its_name_says_which_names_there_are():
    """pydantic's words were "likelihood: Unable to extract tag using discriminator 'name'"."""
    raw = compose()
    raw["likelihood"] = {"allow_improper": True}
    with pytest.raises(ConfigError) as err:
        config_mod.validate(raw)
    assert (
        str(err.value)
        == "likelihood: no name; give likelihood.name: bernoulli, gaussian, continuous_bernoulli"
    )


def test_an_override_of_a_typed_key_says_why_it_cannot_merge():
    """Hydra's own keys are typed: its error's one line was "Error merging override ...", the reason in the
    exception's cause."""
    with pytest.raises(ConfigError) as err:
        config_mod.compose(["hydra/sweeper=vaerepro_optuna", "hydra.sweeper.n_trials=abc"])
    assert str(err.value) == (
        "overrides hydra/sweeper=vaerepro_optuna hydra.sweeper.n_trials=abc: Error merging override "
        "hydra.sweeper.n_trials=abc (Value 'abc' of type 'str' could not be converted to Integer)"
    )


def test_a_conf_file_that_is_not_yaml_is_one_line_naming_it(tmp_path):
    """PyYAML's ParserError came through Hydra as a traceback of `vaerepro params` and `vaerepro run`."""
    import shutil

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    bad = tmp_path / "conf" / "model" / "mlp.yaml"
    bad.write_text("latent_dim: [1,\n")
    with pytest.raises(ConfigError) as err:
        config_mod.compose([], config_dir=tmp_path / "conf")
    assert str(err.value) == (
        f"{bad}: not valid YAML at line 2, column 1 (expected the node content, but found '<stream end>')"
    )


def test_a_conf_mistake_with_no_overrides_names_conf():
    with pytest.raises(ConfigError) as err:
        config_mod.compose([], config_dir=ROOT / "tests")  # no config.yaml there
    assert str(err.value).startswith(f"{ROOT / 'tests'}: "), err.value
