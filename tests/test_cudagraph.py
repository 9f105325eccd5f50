"""trainer.cuda_graph on the CPU: what the config refuses, and the optimiser that replays the graph.

The capture and replay themselves need a CUDA device: tests/test_gpu.py trains with the graph against eager
training, resumes it, and checks that its steps never wait for the device.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import compose
from vaerepro import config as config_mod
from vaerepro import trainer as trainer_mod
from vaerepro.config import ConfigError
from vaerepro.cudagraph import CapturableAdagrad, CapturableAdam
from vaerepro.train import uses_cuda_graph
from vaerepro.trainer import ForeachAdagrad, build_optimizer, fused_adagrad_runs

GPU = ("trainer=gpu", "trainer.cuda_graph=true")


@pytest.mark.slow
def test_the_gpu_preset_graphs_the_step_wherever_it_can():
    """trainer=gpu: auto, the graph unless something conflicts (then eager steps, not a refusal); the
    other presets: off; true asks for it."""
    for trainer in ("cpu", "ddp", "multinode"):
        cfg = config_mod.validate(compose(f"trainer={trainer}"))
        assert cfg.trainer.cuda_graph is False and not uses_cuda_graph(cfg)
    assert uses_cuda_graph(config_mod.validate(compose("trainer=gpu")))
    assert config_mod.validate(compose("trainer=gpu")).trainer.cuda_graph == "auto"
    assert uses_cuda_graph(config_mod.validate(compose(*GPU)))
    assert not uses_cuda_graph(config_mod.validate(compose("trainer=gpu", "trainer.cuda_graph=false")))
    # and hands Lightning's training_step 500 minibatches a call (trainer.steps_per_call), the others 1
    assert config_mod.validate(compose("trainer=gpu")).trainer.steps_per_call == 500
    for trainer in ("cpu", "ddp", "multinode"):
        assert config_mod.validate(compose(f"trainer={trainer}")).trainer.steps_per_call == 1
    for conflict in ("trainer.precision=bf16-mixed", "model.dropout=0.1", "trainer.compile=default"):
        cfg = config_mod.validate(compose("trainer=gpu", conflict))
        assert not uses_cuda_graph(cfg) and [c for c in cfg.cuda_graph_conflicts() if conflict in c]


def test_adagrad_runs_in_the_graph_when_asked_and_eagerly_under_auto(caplog):
    """Adagrad's fused update can be captured (CapturableAdagrad): trainer.cuda_graph=true runs it; auto
    keeps its steps eager, saying why, until tests/test_gpu.py has shown it on a GPU."""
    asked = config_mod.validate(compose(*GPU, "train.optimizer=adagrad", "train.lr=0.02"))
    assert not asked.cuda_graph_conflicts() and uses_cuda_graph(asked)
    auto = config_mod.validate(compose("trainer=gpu", "train.optimizer=adagrad", "train.lr=0.02"))
    with caplog.at_level("INFO", logger="vaerepro.train"):
        assert not uses_cuda_graph(auto)
    assert "eager training steps, for train.optimizer=adagrad (not yet checked on a GPU)" in caplog.text
    assert not config_mod.validate(compose("trainer=gpu")).cuda_graph_unproven()  # Adam: checked


@pytest.mark.parametrize(
    "overrides, named",
    [
        (("trainer=cpu", "trainer.cuda_graph=true"), "trainer.accelerator=cpu (needs gpu)"),
        ((*GPU, "trainer.precision=bf16-mixed"), "trainer.precision=bf16-mixed (needs 32-true)"),
        ((*GPU, "trainer.compile=reduce-overhead"), "trainer.compile=reduce-overhead (needs null"),
        ((*GPU, "model.dropout=0.1"), "model.dropout=0.1 (needs 0)"),
    ],
)
def test_what_the_graph_cannot_capture_is_refused_naming_the_key(overrides, named):
    """trainer.cuda_graph=true with a setting the graph cannot capture: one line naming the key."""
    with pytest.raises(ConfigError, match="trainer.cuda_graph=true: not with") as err:
        config_mod.validate(compose(*overrides))
    assert named in str(err.value) and "\n" not in str(err.value)


def test_the_capturable_optimiser_is_adam_with_the_configured_settings_and_schedule():
    params = [torch.nn.Parameter(torch.zeros(3))]
    train = config_mod.validate(compose("train.lr_schedule=iwae", "train.weight_decay=0.01")).train
    built = build_optimizer(params, train.model_dump(), capturable=True)
    opt = built["optimizer"]
    assert isinstance(opt, CapturableAdam) and isinstance(opt, torch.optim.Adam)
    group = opt.param_groups[0]
    assert group["capturable"] and group["foreach"] and not group["fused"]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (
        train.lr,
        0.01,
        tuple(train.adam_betas),
        train.adam_eps,
    )
    assert built["lr_scheduler"]["scheduler"].optimizer is opt
    assert (
        type(build_optimizer(params, train.model_dump())["optimizer"]) is torch.optim.Adam
    )  # eager: torch's


def test_an_eager_trainings_optimiser_state_loads_as_capturable():
    """A checkpoint of an eager training (torch's Adam, capturable=False) resumed under the graph: the
    moments and step counts come over, the settings a captured step needs stay."""
    params = [torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))]
    eager = torch.optim.Adam(params, lr=0.1)
    for _ in range(2):
        params[0].grad = torch.tensor([0.5, 0.25, -1.0])
        eager.step()
    saved = eager.state_dict()
    assert saved["param_groups"][0]["capturable"] is False
    graph = CapturableAdam([torch.nn.Parameter(params[0].detach().clone())], lr=0.1)
    graph.load_state_dict(saved)
    group, state = graph.param_groups[0], next(iter(graph.state.values()))
    assert group["capturable"] and group["foreach"] and not group["fused"]
    assert float(state["step"]) == 2
    assert torch.equal(state["exp_avg"], eager.state[params[0]]["exp_avg"])
    assert torch.equal(state["exp_avg_sq"], eager.state[params[0]]["exp_avg_sq"])


def test_the_capturable_adagrad_is_torchs_fused_adagrad_with_the_configured_settings():
    """Its update on the CPU against Adagrad's by hand (Duchi et al. 2011; lr_decay 0): after gradients
    g1, g2 the accumulator is g1^2 + g2^2 and p = p0 - lr g1 / (|g1| + eps) - lr g2 / (sqrt(g1^2 + g2^2) +
    eps), with weight decay w added to each gradient first (g + w p)."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    train = config_mod.validate(compose("train.optimizer=adagrad", "train.lr=0.02", "train.weight_decay=0.1"))
    opt = build_optimizer(params, train.train.model_dump(), capturable=True)
    assert isinstance(opt, CapturableAdagrad) and isinstance(opt, torch.optim.Adagrad)
    group = opt.param_groups[0]
    assert group["fused"] and not group["foreach"] and (group["lr"], group["weight_decay"]) == (0.02, 0.1)
    assert type(build_optimizer(params, train.train.model_dump())) is torch.optim.Adagrad  # eager: torch's

    p0 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    g1, g2 = torch.tensor([0.5, 0.25, -1.0], dtype=torch.float64), torch.tensor([-0.3, 2.0, 0.1])
    p = torch.nn.Parameter(p0.float().clone())
    opt = CapturableAdagrad([p], lr=0.1, weight_decay=0.01, eps=1e-10)
    expected, acc = p0.clone(), torch.zeros(3, dtype=torch.float64)
    for g in (g1, g2.double()):
        p.grad = g.float()
        opt.step()
        d = g + 0.01 * expected
        acc += d * d
        expected -= 0.1 * d / (acc.sqrt() + 1e-10)
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-7)
    state = opt.state[p]
    assert float(state["step"]) == 2 and state["step"].device == p.device
    torch.testing.assert_close(state["sum"].double(), acc, rtol=1e-6, atol=0)


def test_an_eager_trainings_adagrad_state_loads_as_fused():
    """A checkpoint of an eager training with train.fused=false (torch's Adagrad, its step counts on the
    host) resumed under the graph: fused, its step counts on the parameters' device (float32), and the next
    step is the one fused Adagrad takes from the same state."""
    params = [torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))]
    eager = torch.optim.Adagrad(params, lr=0.1, fused=False)
    for _ in range(2):
        params[0].grad = torch.tensor([0.5, 0.25, -1.0])
        eager.step()
    saved = eager.state_dict()
    assert saved["param_groups"][0]["fused"] is False
    copies = [torch.nn.Parameter(params[0].detach().clone()) for _ in range(2)]
    graph = CapturableAdagrad([copies[0]], lr=0.1)
    fused = torch.optim.Adagrad([copies[1]], lr=0.1, fused=True)
    # copies: torch's load keeps the saved tensors themselves where their device and dtype already fit
    graph.load_state_dict(copy.deepcopy(saved))
    as_fused = saved | {"param_groups": [saved["param_groups"][0] | {"fused": True}]}
    fused.load_state_dict(copy.deepcopy(as_fused))
    group, state = graph.param_groups[0], graph.state[copies[0]]
    assert group["fused"] and not group["foreach"]
    assert float(state["step"]) == 2 and state["step"].dtype == torch.float32
    assert torch.equal(state["sum"], eager.state[params[0]]["sum"])
    for p, opt in zip(copies, (graph, fused), strict=True):
        p.grad = torch.tensor([-0.3, 2.0, 0.1])
        opt.step()
    assert torch.equal(copies[0], copies[1]) and float(graph.state[copies[0]]["step"]) == 3


def test_whether_torch_has_a_fused_adagrad_kernel_is_asked_of_torch():
    """torch (>= 2.4) has Adagrad's fused kernel for the CPU, none for the meta device; an H200 with torch
    2.11 had none for CUDA (tests/test_gpu.py then checks the foreach fallback there)."""
    assert fused_adagrad_runs("cpu") and not fused_adagrad_runs("meta")


def test_without_a_fused_kernel_adagrad_runs_its_foreach_kernels_and_resumes_a_fused_checkpoint(
    monkeypatch, caplog
):
    """train.fused=true (the default) on a device this torch has no fused Adagrad kernel for: torch's
    foreach Adagrad, saying so, instead of torch's RuntimeError at the first step. A checkpoint of a fused
    training loads on it, stays on foreach kernels, and steps as the fused kernel does from that state."""
    monkeypatch.setattr(trainer_mod, "fused_adagrad_runs", lambda device_type: False)
    train = config_mod.validate(compose("train.optimizer=adagrad", "train.lr=0.1", "train.weight_decay=0.01"))
    p0 = torch.tensor([1.0, -2.0, 3.0])
    fused_p, foreach_p = (torch.nn.Parameter(p0.clone()) for _ in range(2))
    fused = torch.optim.Adagrad([fused_p], lr=0.1, weight_decay=0.01, fused=True)
    with caplog.at_level("WARNING", logger="vaerepro.trainer"):
        fallback = build_optimizer([foreach_p], train.train.model_dump())
    assert type(fallback) is ForeachAdagrad and not fallback.param_groups[0]["fused"]
    assert (fallback.param_groups[0]["lr"], fallback.param_groups[0]["weight_decay"]) == (0.1, 0.01)
    assert f"train.fused: torch {torch.__version__} has no fused Adagrad kernel for cpu" in caplog.text
    for g in ([0.5, 0.25, -1.0], [-0.3, 2.0, 0.1]):
        fused_p.grad = torch.tensor(g)
        fused.step()
    foreach_p.data.copy_(fused_p.detach())
    fallback.load_state_dict(copy.deepcopy(fused.state_dict()))
    assert not fallback.param_groups[0]["fused"] and float(fallback.state[foreach_p]["step"]) == 2
    for p, opt in ((fused_p, fused), (foreach_p, fallback)):
        p.grad = torch.tensor([0.7, -0.4, 0.2])
        opt.step()
    torch.testing.assert_close(foreach_p.detach(), fused_p.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(foreach_p.detach(), p0)


class FakeGraph:
    def __init__(self):
        self.replayed = 0

    def replay(self):
        self.replayed += 1


@pytest.mark.parametrize("optimiser", [CapturableAdam, CapturableAdagrad])
def test_while_replaying_a_step_runs_the_closure_then_the_graph_not_the_update(optimiser):
    """Lightning's optimizer.step(closure) (its hooks in the closure) replays the captured step; outside
    `replaying`, the optimiser is torch's again."""
    params = [torch.nn.Parameter(torch.ones(2))]
    params[0].grad = torch.ones(2)
    opt, graph, hooks = optimiser(params, lr=0.1), FakeGraph(), []
    with opt.replaying(graph):
        opt.step(lambda: hooks.append(torch.is_grad_enabled()))
        opt.step()
    assert graph.replayed == 2 and hooks == [True] and torch.equal(params[0].detach(), torch.ones(2))
    # no update of its own ran (torch's Adagrad makes its state, step 0, when it is built; Adam at a step)
    assert opt.replay is None and all(float(s["step"]) == 0 for s in opt.state.values())
    if optimiser is CapturableAdagrad:  # torch's fused Adagrad, which runs on the CPU too
        opt.step()
        assert float(opt.state[params[0]]["step"]) == 1 and (params[0].detach() < 1).all()
        return
    # torch's Adam again: its update refuses capturable=True off CUDA (an AssertionError in torch 2.13)
    with pytest.raises((AssertionError, RuntimeError), match="capturable=True"):
        opt.step()
