"""eval.precision: reduced-precision importance sampling (bf16 autocast on the networks, TF32 on CUDA), its
effect on log p(x) measured against float32 with the same noise, and its refusals.

The CUDA case (tf32, bf16 on a GPU) is in test_gpu.py.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch
import yaml

from conftest import BIN, compose, copy_prepared, tiny_config
from vaerepro import cli, estimators
from vaerepro import config as config_mod
from vaerepro import evaluate as evaluate_mod
from vaerepro.config import ConfigError
from vaerepro.data import TEST_SEED_OFFSET, fixed_space, load_prepared
from vaerepro.evaluate import BF16Autocast, bf16_networks, evaluate, load_vae, per_example, precision_effect
from vaerepro.model import VAE, build_vae
from vaerepro.train import train

# The tolerance on bf16's change of the mean log p(x): the project's threshold for a difference that does
# not change a comparison of models (estimators.LADDER_GAIN_TOL_NATS, 0.1 nats/example; IWAE-style tables
# compare models tenths of a nat apart and more). bfloat16 keeps 8 significant bits (unit roundoff 2^-8):
# the networks' outputs move by ~0.4 % of their size, the log-densities do not round further.
BF16_TOL_NATS = estimators.LADDER_GAIN_TOL_NATS


def _random_models():
    """A one-layer VAE (AEVB's shape, narrower) and a two-layer one (IWAE's shape, narrower) on 784
    pixels, randomly initialised, with binary data (N=120, D=784)."""
    torch.manual_seed(0)
    one = VAE(data_dim=784, latent_dim=10, hidden_dims=[100]).eval()
    two = build_vae(
        dict(
            data_dim=784,
            latent_dim=10,
            hidden_dims=[100],
            stochastic_layers=2,
            latent_dim_2=5,
            hidden_dims_2=[20],
        )
    ).eval()
    x = torch.bernoulli(torch.full((120, 784), 0.2))
    return {"one": one, "two": two}, x


SAMPLING = dict(num_samples=100, batch_size=50, chunk_size=30, seed=7)


@pytest.mark.parametrize("layers", ["one", "two"])
def test_bf16_runs_the_networks_in_bfloat16_and_the_densities_in_float32(layers):
    models, x = _random_models()
    vae = models[layers]
    wrapped = bf16_networks(copy.deepcopy(vae), "cpu")
    names = ["encoder", "decoder"] + (["encoder_2", "decoder_2"] if layers == "two" else [])
    seen = {}
    for name in names:
        assert isinstance(getattr(wrapped, name), BF16Autocast), name
        first = getattr(wrapped, name).inner[0]  # the network's first nn.Linear
        first.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.dtype))
    q = wrapped.posterior(x[:5])
    z = q.rsample((3,))  # (3, 5, Z); the two-layer q runs encoder_2 here
    log_w = estimators.log_weights(wrapped, x[:5], 3, eps=torch.randn(3, 5, wrapped.z_dim)).log_w
    assert seen == {name: torch.bfloat16 for name in names}  # every network's matmuls ran in bfloat16
    # what the likelihood and the Gaussians read, and the log weights: float32
    assert wrapped.decoder_params(z).dtype == q.sample().dtype == log_w.dtype == torch.float32
    # the caller's model is not touched: its own networks, float32 outputs
    assert type(vae.decoder) is torch.nn.Sequential and vae.decoder_params(z).dtype == torch.float32


@pytest.mark.parametrize("layers", ["one", "two"])
def test_bf16_log_px_is_within_a_tenth_of_a_nat_of_float32_with_the_same_noise(layers):
    models, x = _random_models()
    vae = models[layers]
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    full = per_example(vae, x, **SAMPLING)
    reduced = per_example(vae, x, precision="bf16", **SAMPLING)
    d = reduced["log_px"] - full["log_px"]  # (N,), nats: paired, the same examples and noise
    assert not torch.equal(reduced["log_px"], full["log_px"])  # bf16 did round something
    assert abs(float(d.mean())) < BF16_TOL_NATS and float(d.abs().max()) < 10 * BF16_TOL_NATS
    # the noise is the same: the one-sample ELBO's per-example spread across examples (tens of nats) is
    # reproduced to within the rounding, which an independent draw would not do
    assert float((reduced["elbo"] - full["elbo"]).abs().max()) < 10 * BF16_TOL_NATS
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in before.items())


def test_32_is_todays_estimate_bit_for_bit_and_float32_even_after_tf32_was_left_on():
    models, x = _random_models()
    vae = models["one"]
    # today's computation, written out: estimate_log_px per batch of 50 with the examples' offsets
    expected = torch.cat(
        [
            estimators.estimate_log_px(
                vae, x[i : i + 50], 100, 30, generator_seed=7, example_offset=i
            ).log_px.double()
            for i in range(0, len(x), 50)
        ]
    )
    seen = []
    hook = vae.decoder.register_forward_hook(lambda *a: seen.append(torch.get_float32_matmul_precision()))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # as trainer.matmul_precision=high leaves it
        got = per_example(vae, x, precision="32", **SAMPLING)
        assert torch.get_float32_matmul_precision() == "high"  # put back
    finally:
        torch.set_float32_matmul_precision(before)
        hook.remove()
    assert set(seen) == {"highest"}  # float32 matmuls while sampling
    assert torch.equal(got["log_px"], expected)
    assert torch.equal(per_example(vae, x, **SAMPLING)["log_px"], expected)  # "32" is the default


def test_precision_effect_known_answers():
    reduced = torch.tensor([-100.0, -99.5, -101.0, -98.0], dtype=torch.float64)
    full = torch.tensor([-100.25, -99.5, -100.5, -98.0], dtype=torch.float64)
    d = np.array([0.25, 0.0, -0.5, 0.0])  # reduced - full, nats: mean -0.0625, largest |d| 0.5
    p = precision_effect("bf16", reduced, full)
    assert p["name"] == "bf16" and p["examples"] == 4
    assert p["log_px_diff"] == pytest.approx(-0.0625, abs=1e-15)
    assert p["log_px_diff_se"] == pytest.approx(d.std(ddof=1) / 2, abs=1e-15)
    assert p["log_px_diff_max_abs"] == 0.5


# --- the evaluate stage ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared_tiny):
    """The tiny config trained for one epoch (a checkpoint to evaluate)."""
    out = copy_prepared(prepared_tiny, tmp_path_factory.mktemp("precision"))
    train(tiny_config("train.max_epochs=1"), out, enable_progress_bar=False)
    return out


def _evaluate(out, *overrides):
    metrics = evaluate(tiny_config("train.max_epochs=1", "eval.device=cpu", *overrides), out, progress=False)
    written = json.loads((out / "metrics" / "eval.json").read_text())
    assert written["precision"] == metrics["precision"]
    return metrics, np.load(out / "artifacts" / "per_example.npz")["log_px"]


def test_the_stage_records_the_measured_difference_from_float32(trained, monkeypatch, caplog):
    m32, log_px_32 = _evaluate(trained)
    assert m32["precision"] == {"name": "32"}  # nothing measured, the precision named
    # today's numbers: the estimate of the loaded checkpoint, batch by batch, straight from estimators
    cfg = tiny_config()
    splits = load_prepared(trained / "prepared")
    x = fixed_space(splits.test, cfg.data_space, quantized=bool(splits.quantized), seed=TEST_SEED_OFFSET)
    vae = load_vae(trained / "models" / "best.ckpt")
    expected = torch.cat(
        [
            estimators.estimate_log_px(
                vae, x[i : i + 50], 50, 20, generator_seed=1234, example_offset=i
            ).log_px.double()
            for i in range(0, len(x), 50)
        ]
    )
    assert np.array_equal(log_px_32, expected.numpy())

    with caplog.at_level("INFO", logger="vaerepro.evaluate"):
        mbf, log_px_bf = _evaluate(trained, "eval.precision=bf16")
    n = len(log_px_32)  # 120 test examples < PRECISION_CHECK_EXAMPLES: all of them compared
    d = log_px_bf - log_px_32  # the two stages' per-example estimates, paired
    p = mbf["precision"]
    assert p["name"] == "bf16" and p["examples"] == n == min(evaluate_mod.PRECISION_CHECK_EXAMPLES, n)
    assert p["log_px_diff"] == pytest.approx(d.mean(), rel=1e-12, abs=1e-12)
    assert p["log_px_diff_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(n), rel=1e-9)
    assert p["log_px_diff_max_abs"] == pytest.approx(np.abs(d).max(), rel=1e-12)
    assert 0 < abs(p["log_px_diff"]) < BF16_TOL_NATS
    assert abs(mbf["log_px"] - m32["log_px"]) < BF16_TOL_NATS
    lines = [r.getMessage() for r in caplog.records if "eval.precision=bf16" in r.getMessage()]
    assert len(lines) == 1 and f"{p['log_px_diff']:+.4f}" in lines[0] and f"first {n} test" in lines[0]

    # fewer examples than the test set (the first 70: a part of the second batch of 50)
    monkeypatch.setattr(evaluate_mod, "PRECISION_CHECK_EXAMPLES", 70)
    p70 = _evaluate(trained, "eval.precision=bf16")[0]["precision"]
    assert p70["examples"] == 70
    # the reference's last batch holds 20 examples, not 50: equal up to float32 rounding of the matmuls
    assert p70["log_px_diff"] == pytest.approx(d[:70].mean(), abs=1e-4)


def test_eval_precision_config_values():
    assert config_mod.validate(compose()).eval.precision == "32"
    # Hydra reads eval.precision=32 as the integer 32: the same setting
    assert config_mod.validate(compose("eval.precision=32")).eval.precision == "32"
    assert config_mod.validate(compose("eval.precision=bf16", "eval.device=cpu")).eval.precision == "bf16"
    assert config_mod.validate(compose("eval.precision=tf32", "eval.device=cuda")).eval.precision == "tf32"
    for bad in ("fp16", "16", "64"):
        with pytest.raises(ConfigError, match="eval.precision"):
            config_mod.validate(compose(f"eval.precision={bad}"))
    with pytest.raises(ConfigError, match=r"eval.precision=tf32: TF32 .*CUDA devices only.*eval.device=cpu"):
        config_mod.validate(compose("eval.precision=tf32", "eval.device=cpu"))


@pytest.mark.slow
def test_tf32_on_the_cpu_is_refused_on_the_command_line_with_one_line(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # marks the project root
    params = tmp_path / "params.yaml"
    raw = compose("tracking.enabled=false", "eval.device=cpu")
    raw["eval"]["precision"] = "tf32"  # as a hand-edited params.yaml has it
    params.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("VAEREPRO_DEBUG", None)
    proc = subprocess.run(
        ["vaerepro", "evaluate", "--params", str(params), "--out", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("vaerepro evaluate: ") and "eval.precision=tf32" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "metrics").exists()


def test_tf32_where_eval_device_auto_finds_no_gpu_is_refused_before_any_work(
    tmp_path, prepared_tiny, capsys, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(compose("tracking.enabled=false", "eval.precision=tf32")))
    # prepared_tiny has no checkpoint: the refusal comes first, naming the key and the device
    assert cli.main(["evaluate", "--params", str(params), "--out", str(prepared_tiny)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.precision=tf32" in err[0] and "eval.device=auto" in err[0], err
    with pytest.raises(ConfigError, match="eval.precision=tf32"):
        per_example(
            VAE(data_dim=4, latent_dim=2, hidden_dims=[3]), torch.zeros(2, 4), precision="tf32", **SAMPLING
        )


def test_vaerepro_run_refuses_tf32_without_a_gpu_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tiny_config("eval.precision=tf32", raw_dir=tmp_path / "raw")
    with pytest.raises(ConfigError, match=r"eval.precision=tf32: .*\(eval.device=auto\)"):
        cli.run_pipeline(cfg, tmp_path / "run", tmp_path, progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "raw").exists()  # nothing prepared or trained


@pytest.mark.slow
def test_the_measured_difference_reaches_mlflow(tmp_path, monkeypatch):
    """tracking.log_evaluation: eval.precision as a param, the measured difference as metrics (nats of the
    run's data space). A stand-in MlflowClient records the calls (no store needed)."""
    import mlflow

    from vaerepro import tracking

    calls = {"params": {}, "metrics": {}}

    class Client:
        def __init__(self, uri=None):
            pass

        def get_run(self, run_id):
            data = {"params": dict(calls["params"]), "tags": {}, "metrics": {}}  # not evaluated before
            return type("Run", (), {"data": type("Data", (), data)()})()

        def log_param(self, run_id, key, value):
            calls["params"][key] = value

        def log_batch(self, run_id, metrics=()):
            calls["metrics"].update({m.key: m.value for m in metrics})

        def set_tag(self, *a):
            pass

        def log_artifact(self, *a):
            pass

    monkeypatch.setattr(mlflow, "MlflowClient", Client)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mlflow_run.json").write_text(json.dumps({"run_id": "r1", "tracking_uri": None}))
    cfg = tiny_config("eval.precision=bf16", "eval.device=cpu", tracking=True)
    ladder = [{"k": 1, "log_px": -110.0}, {"k": 50, "log_px": -100.0}]
    metrics = {
        "log_px": -100.0,
        "log_px_se": 1.0,
        "elbo": -105.0,
        "kl": 10.0,
        "bits_per_dim": 0.2,
        "log_px_ladder": ladder,
        "converged": True,
        "num_samples": 50,
        "precision": precision_effect("bf16", torch.tensor([-100.0, -99.0]), torch.tensor([-100.5, -99.0])),
    }
    (tmp_path / "metrics").mkdir()  # as the evaluate stage leaves it: log_evaluation logs and names the file
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(metrics))
    tracking.log_evaluation(cfg, tmp_path, metrics)
    assert calls["params"]["eval.precision"] == "bf16"
    assert calls["metrics"]["binary/test/precision_log_px_diff"] == pytest.approx(0.25)
    assert calls["metrics"]["binary/test/precision_log_px_diff_max_abs"] == pytest.approx(0.5)
    assert "binary/test/precision_log_px_diff_se" in calls["metrics"]
