"""trainer.compile: the training objective under torch.compile gives the eager training's numbers.

On a GPU, trainer.compile=reduce-overhead captures the objective's forward and backward as CUDA graphs; a
graph break would split them and put Python back between the pieces. Here, on the CPU: every objective the
config can build traces as ONE graph (fullgraph=True, dynamo's own check) with the eager values and
gradients, and a compiled training (inductor's CPU kernels) ends where the eager one does, alone and under
DDP. tests/test_gpu.py runs the CUDA-graph mode against eager on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ROOT, copy_prepared, curve, tiny_config
from vaerepro.cli import run_pipeline
from vaerepro.config import TrainerConfig
from vaerepro.evaluate import load_vae
from vaerepro.model import build_vae
from vaerepro.train import WITHOUT_CUDA_GRAPHS, VAEModule, compile_mode, train

BATCH, DATA_DIM = 8, 12


@pytest.fixture(autouse=True)
def distribution_checks():
    """torch.compile, the first time in a process, turns torch.distributions' argument checks off for the
    whole process; put torch's default back after each test here, as train.VAEModule does after compiling."""
    yield
    torch.distributions.Distribution.set_default_validate_args(__debug__)


def _checks_on() -> bool:
    """Whether torch.distributions checks arguments by default: a Bernoulli refuses a grey level."""
    try:
        torch.distributions.Bernoulli(probs=torch.tensor([0.5])).log_prob(torch.tensor([0.5]))
    except ValueError:
        return True
    return False


# (objective, estimator, num_samples, likelihood, model extras): every objective and likelihood family, one
# and two stochastic layers, dropout
CASES = {
    "elbo-B-bernoulli": ("elbo", "B", 1, {"name": "bernoulli"}, {}),
    "elbo-A-bernoulli-L3": ("elbo", "A", 3, {"name": "bernoulli"}, {}),
    "elbo-B-continuous-bernoulli": ("elbo", "B", 1, {"name": "continuous_bernoulli"}, {}),
    "elbo-B-gaussian-learned": ("elbo", "B", 1, {"name": "gaussian"}, {}),
    "elbo-A-gaussian-log-variance": ("elbo", "A", 1, {"name": "gaussian", "scale": "log_variance"}, {}),
    "elbo-B-gaussian-fixed": ("elbo", "B", 1, {"name": "gaussian", "sigma": 0.3}, {}),
    "iwae-5-bernoulli": ("iwae", "B", 5, {"name": "bernoulli"}, {}),
    "iwae-5-two-layers": (
        "iwae",
        "B",
        5,
        {"name": "bernoulli"},
        {"stochastic_layers": 2, "latent_dim_2": 2, "hidden_dims_2": [6]},
    ),
    "elbo-A-two-layers": (
        "elbo",
        "A",
        1,
        {"name": "bernoulli"},
        {"stochastic_layers": 2, "latent_dim_2": 2, "hidden_dims_2": [6]},
    ),
    "elbo-B-dropout": ("elbo", "B", 1, {"name": "continuous_bernoulli"}, {"dropout": 0.2}),
}


def _module(objective, estimator, num_samples, likelihood, extras) -> VAEModule:
    torch.manual_seed(0)
    vae_config = {
        "data_dim": DATA_DIM,
        "latent_dim": 3,
        "hidden_dims": [10],
        "activation": "tanh",
        "likelihood": likelihood,
        **extras,
    }
    vae_config = build_vae(vae_config).config  # normalised, as a checkpoint holds it
    train_cfg = {"objective": objective, "estimator": estimator, "num_samples": num_samples}
    return VAEModule(vae_config, train_cfg, data_space="binary", quantized=False)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.slow
def test_every_objective_traces_as_one_graph_with_the_eager_values_and_gradients(case):
    objective, estimator, k, likelihood, extras = CASES[case]
    module = _module(objective, estimator, k, likelihood, extras)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(BATCH, DATA_DIM, generator=g)
    if likelihood["name"] == "bernoulli":
        x = (x < 0.5).float()
    eps = torch.randn(k, BATCH, module.vae.z_dim, generator=g)
    torch.compiler.reset()  # each case is a new module: stay below dynamo's limit of recompilations
    # backend="eager": dynamo's trace, run by eager kernels, so any difference is the trace's, not rounding;
    # fullgraph=True: a graph break is an error instead of a silent split
    traced = torch.compile(module.bound, backend="eager", fullgraph=True)

    results = []
    for fn in (module.bound, traced):
        module.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # dropout's masks, drawn from the global generator
        bound = fn(x, eps)  # (B,)
        (-bound.mean()).backward()
        results.append((bound.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert eager.shape == (BATCH,) and bool(torch.isfinite(eager).all())
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=0, atol=0, msg=name)
    assert any(float(g.abs().max()) > 0 for g in eager_grads.values())  # gradients that flow


# After 3 epochs of the tiny config (27 Adam steps), inductor's fused CPU kernels against eager, measured: the
# AEVB model's weights differ by 6e-8 and its ELBOs not at all at float32 precision; the two-layer IWAE
# model's ELBOs by up to 3e-3 nats (at -330) and its weights by up to 1.9e-3, in the decoder's output layer:
# Adam's step m / (sqrt(v) + eps) is about +-lr whatever a gradient's size, so on the pixels that are 0 in
# every image a rounding-sized gradient still moves a weight by up to lr (1e-3) a step, in either direction.
# A real difference (another data order, noise or gradient) moves the ELBOs by 0.1-10 nats.
WEIGHT_TOL = 1e-2
ELBO_TOL_NATS = 1e-2


def test_under_ddp_a_mode_with_cuda_graphs_compiles_without_them():
    """trainer.compile's CUDA-graph modes fall back, under DDP only, to the same mode without graphs, a mode
    the config accepts too; modes without graphs and eager training are left as they are."""
    assert compile_mode("reduce-overhead", 1) == "reduce-overhead"
    assert compile_mode("max-autotune", 1) == "max-autotune"
    assert compile_mode("reduce-overhead", 2) == "default"
    assert compile_mode("max-autotune", 8) == "max-autotune-no-cudagraphs"
    for mode in ("default", "max-autotune-no-cudagraphs", None):
        assert compile_mode(mode, 2) == mode
    (modes, _) = TrainerConfig.model_fields["compile"].annotation.__args__  # Literal[...] | None
    assert set(WITHOUT_CUDA_GRAPHS) | set(WITHOUT_CUDA_GRAPHS.values()) == set(modes.__args__)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param((), id="aevb-bernoulli"),
        pytest.param(
            (
                "train.objective=iwae",
                "train.num_samples=3",
                "model.stochastic_layers=2",
                "model.latent_dim_2=2",
                "model.hidden_dims_2=[8]",
            ),
            id="iwae-two-layers",
        ),
    ],
)
def test_compiled_training_ends_where_eager_training_does(prepared_tiny, tmp_path, overrides):
    runs = {}
    for mode in ("null", "default"):
        out = copy_prepared(prepared_tiny, tmp_path / mode)
        metrics = train(tiny_config(*overrides, f"trainer.compile={mode}"), out, enable_progress_bar=False)
        assert _checks_on()  # as before the training: compiling did not leave torch's checks off
        ckpt = torch.load(out / "models" / "last.ckpt", map_location="cpu", weights_only=True)
        runs[mode] = (metrics, ckpt, curve(out), out)
    (m_eager, eager, curve_eager, _), (m_comp, comp, curve_comp, out) = runs["null"], runs["default"]
    assert eager["global_step"] == comp["global_step"] > 0
    # the same parameters under the same names: a compiled training's checkpoints are ordinary ones
    assert eager["state_dict"].keys() == comp["state_dict"].keys()
    diff = max(
        (eager["state_dict"][k] - comp["state_dict"][k]).abs().max().item() for k in eager["state_dict"]
    )
    assert diff < WEIGHT_TOL, diff
    assert [r["epoch"] for r in curve_eager] == [r["epoch"] for r in curve_comp] == [0, 1, 2]
    for a, b in zip(curve_eager, curve_comp, strict=True):
        for key in ("train_elbo", "val_elbo"):
            assert math.isfinite(a[key]) and abs(a[key] - b[key]) < ELBO_TOL_NATS, (key, a, b)
    assert curve_eager[0]["val_elbo"] < curve_eager[-1]["val_elbo"]  # and both trained
    assert abs(m_eager["best_val_elbo"] - m_comp["best_val_elbo"]) < ELBO_TOL_NATS
    load_vae(out / "models" / "best.ckpt")  # the evaluate stage reads it without Lightning


@pytest.mark.slow
def test_compiled_training_with_dropout_resumes_where_it_stopped(prepared_tiny, tmp_path):
    """Compiled, dropout's masks come from inductor's own random kernels, another draw than eager's, but
    from the global generator that train.VAEModule seeds per batch: a training stopped after 2 epochs and
    resumed for a third ends where 3 uninterrupted epochs do."""
    mode = ("trainer.compile=default", "model.dropout=0.2")
    whole = copy_prepared(prepared_tiny, tmp_path / "whole")
    train(tiny_config(*mode), whole, enable_progress_bar=False)
    out = copy_prepared(prepared_tiny, tmp_path / "resumed")
    train(tiny_config(*mode, "train.max_epochs=2"), out, enable_progress_bar=False)
    train(tiny_config(*mode, "train.resume=true"), out, enable_progress_bar=False)
    a, b = (
        torch.load(d / "models" / "last.ckpt", map_location="cpu", weights_only=True) for d in (whole, out)
    )
    assert a["global_step"] == b["global_step"] > 0
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=0, atol=0, msg=k)
    assert curve(whole) == curve(out)


@pytest.mark.slow
def test_vaerepro_run_with_a_compiled_objective_records_it_and_evaluates_with_checks_on(
    raw_dir, tmp_path, monkeypatch, store
):
    """`vaerepro run trainer.compile=default`: every stage, the mode as an MLflow param, and the evaluation
    after the training in the same process with torch.distributions' checks on."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    cfg = tiny_config("trainer.compile=default", "seed=5", tracking=True, raw_dir=raw_dir)
    metrics = run_pipeline(cfg, tmp_path / "run", ROOT, progress=False)
    assert math.isfinite(metrics["log_px"])
    assert metrics["log_px"] >= metrics["elbo"] - 3 * metrics["log_px_se"]  # the bound holds
    assert _checks_on()
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("vaerepro").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.compile"] == "default"
