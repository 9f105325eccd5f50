"""Evaluation-stage pieces with known answers, and the CLI's early, named errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from conftest import DEVICES, TINY, compose, copy_prepared, drop_in_a_finalizer, tiny_config
from vaerepro import cli
from vaerepro import config as config_mod
from vaerepro import evaluate as evaluate_mod
from vaerepro.config import ConfigError
from vaerepro.estimators import ELBO_STREAM, BlockNoise, elbo_terms, estimate_log_px
from vaerepro.evaluate import (
    active_units,
    auto_batch_size,
    auto_chunk_size,
    eval_device,
    eval_metrics,
    knn_accuracy,
    per_example,
)
from vaerepro.model import VAE, TwoLayerVAE
from vaerepro.train import train


def test_active_units_counts_dimensions_with_posterior_variance():
    g = torch.Generator().manual_seed(0)
    mu = torch.zeros(5000, 4)
    mu[:, 0] = torch.randn(5000, generator=g)  # variance 1: active
    mu[:, 1] = 0.2 * torch.randn(5000, generator=g)  # variance 0.04: active
    mu[:, 2] = 0.05 * torch.randn(5000, generator=g)  # variance 0.0025: inactive
    assert active_units(mu) == 2


@pytest.mark.slow
def test_active_units_of_a_two_layer_model_count_both_layers():
    """z2's mean under q(z2|x) = E_{q(z1|x)}[mu2(z1)] (layer_means) against a 20,000-draw reference. Unit 0
    of z2 follows z1's active unit (Cov across x > 0.05); unit 1 follows z1's inactive unit, whose noise
    moves mu2 by Var ~ 0.3 within each example but leaves its mean the same for every x: inactive, though a
    single draw per example would count it."""
    from torch import nn

    from vaerepro.evaluate import layer_means

    torch.manual_seed(0)
    vae = TwoLayerVAE(data_dim=12, latent_dim=3, latent_dim_2=2, hidden_dims_2=[8], hidden_dims=[8]).eval()
    enc = [m for m in vae.encoder if isinstance(m, nn.Linear)]
    enc2 = [m for m in vae.encoder_2 if isinstance(m, nn.Linear)]
    with torch.no_grad():
        # q(z1|x): unit 0's mean 2 tanh(h_0(x)), units 1, 2 at mean 0; every sigma 1
        enc[-1].weight.zero_(), enc[-1].bias.zero_()
        enc[0].weight.mul_(4.0)
        enc[-1].weight[0, 0] = 2.0
        # q(z2|z1): mu2_0 = tanh(z1_0), mu2_1 = tanh(z1_1); both sigmas 1
        for m in enc2:
            m.weight.zero_(), m.bias.zero_()
        enc2[0].weight[0, 0] = enc2[0].weight[1, 1] = 1.0
        enc2[-1].weight[0, 0] = enc2[-1].weight[1, 1] = 1.0
    x = torch.bernoulli(torch.full((400, 12), 0.5), generator=torch.Generator().manual_seed(1))

    mu1, logvar1 = vae.posterior_params(x)
    eps = torch.randn((20000, *mu1.shape), generator=torch.Generator().manual_seed(2))
    ref = vae.posterior_2(mu1 + (0.5 * logvar1).exp() * eps).mean.mean(dim=0)  # (400, 2)
    assert ref.var(dim=0)[0] > 0.05 and ref.var(dim=0)[1] < 1e-3  # the answer: one active unit in z2

    first, second = layer_means(vae, x, seed=0, batch_size=150)
    assert torch.equal(first, mu1)
    assert (second - ref).abs().max() < 0.2 and (second - ref).pow(2).mean().sqrt() < 0.05
    assert [active_units(first), active_units(second)] == [1, 1]
    single = layer_means(vae, x, seed=0, samples=1)[1]  # one z1 draw per example: noise counted as use
    assert active_units(single) == 2
    assert len(layer_means(VAE(data_dim=12, latent_dim=2, hidden_dims=[8]), x, seed=0)) == 1


def test_z2_means_average_over_q_z1_with_its_standard_deviation_not_its_variance():
    """q(z1|x) = N((1, 0, 0), 2^2 I) for every x and mu2_0(z1) = tanh(z1_0): E_q[z2_0|x] = E[tanh(1 + 2 u)],
    u ~ N(0, 1), by Gauss-Hermite quadrature (numpy), 0.35; with the variance 4 as the scale it would be
    E[tanh(1 + 4 u)], 0.19."""
    from torch import nn

    from vaerepro.evaluate import layer_means

    torch.manual_seed(0)
    vae = TwoLayerVAE(data_dim=12, latent_dim=3, latent_dim_2=2, hidden_dims_2=[8], hidden_dims=[8]).eval()
    enc = [m for m in vae.encoder if isinstance(m, nn.Linear)]
    enc2 = [m for m in vae.encoder_2 if isinstance(m, nn.Linear)]
    with torch.no_grad():
        enc[-1].weight.zero_()
        enc[-1].bias.copy_(torch.tensor([1.0, 0.0, 0.0, *[math.log(4.0)] * 3]))  # [mu1 | log sigma1^2]
        for m in enc2:
            m.weight.zero_(), m.bias.zero_()
        enc2[0].weight[0, 0] = enc2[-1].weight[0, 0] = 1.0
    t, w = np.polynomial.hermite_e.hermegauss(80)  # nodes and weights for the weight exp(-u^2 / 2)
    expected = (w * np.tanh(1.0 + 2.0 * t)).sum() / w.sum()
    assert abs(expected - (w * np.tanh(1.0 + 4.0 * t)).sum() / w.sum()) > 0.1
    x = torch.bernoulli(torch.full((400, 12), 0.5), generator=torch.Generator().manual_seed(1))
    second = layer_means(vae, x, seed=0)[1]  # (400, 2), 200 draws of z1 per example
    # 80,000 draws of tanh(1 + 2 u) (std ~0.7): SE ~0.0025
    assert second[:, 0].mean().item() == pytest.approx(expected, abs=0.0125)
    assert second[:, 1].abs().max() < 1e-6  # mu2_1 = 0 for every z1


def test_knn_accuracy_known_answers():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0]])
    y = torch.arange(3).repeat_interleave(200)
    z = centers[y] + torch.randn(600, 2, generator=g)
    assert knn_accuracy(z[::2], y[::2], z[1::2], y[1::2]) == 1.0  # separated clusters
    shuffled = y[torch.randperm(600, generator=g)]
    acc = knn_accuracy(z[::2], shuffled[::2], z[1::2], shuffled[1::2])
    assert abs(acc - 1 / 3) < 0.1  # labels unrelated to z: chance


PER_EXAMPLE_KEYS = ("log_px", "elbo", "recon", "kl", "ess")


def _tiny_vae_and_data(n: int):
    torch.manual_seed(0)
    vae = VAE(data_dim=12, latent_dim=2, hidden_dims=[8]).eval()
    return vae, torch.bernoulli(torch.full((n, 12), 0.3))


@pytest.mark.parametrize("device", DEVICES)
def test_sharded_evaluation_equals_the_whole(device):
    vae, x = _tiny_vae_and_data(23)
    kw = dict(num_samples=30, batch_size=5, chunk_size=7, seed=11, device=device)
    whole = per_example(vae, x, **kw)
    shards = [per_example(vae, x, batches=range(r, 5, 2), **kw) for r in range(2)]  # 2 "ranks"
    mine = torch.arange(23) // 5 % 2 == 0  # rank 0's examples: batches 0, 2, 4
    for key in PER_EXAMPLE_KEYS:
        merged = torch.where(mine, shards[0][key], shards[1][key])
        assert torch.equal(merged, whole[key]), key
        assert torch.isnan(shards[0][key][~mine]).all() and not torch.isnan(whole[key]).any()
    for k, v in whole["ladder"].items():
        assert torch.equal(torch.where(mine, shards[0]["ladder"][k], shards[1]["ladder"][k]), v)
    assert (whole["log_px"] >= whole["elbo"] - 5).all()
    assert whole["log_px"].device.type == "cpu" and next(vae.parameters()).device.type == "cpu"


def test_a_sigterm_python_dropped_stops_the_evaluation_at_its_next_batch(monkeypatch):
    """A SIGTERM whose Stopped Python dropped (its handler ran in a finalizer) stops the evaluation before
    its next batch rather than never."""
    import signal

    from vaerepro import signals
    from vaerepro.errors import Stopped

    vae, x = _tiny_vae_and_data(15)
    batches = []

    def estimate_then_drop(*args, **kwargs):
        batches.append(kwargs["example_offset"])
        drop_in_a_finalizer(signal.SIGTERM)
        return estimate_log_px(*args, **kwargs)

    monkeypatch.setattr(evaluate_mod.estimators, "estimate_log_px", estimate_then_drop)
    previous = signal.getsignal(signal.SIGTERM)
    signals.install()
    try:
        with pytest.raises(Stopped):
            per_example(vae, x, num_samples=10, batch_size=5, chunk_size=5, seed=0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert batches == [0]  # the first batch of three


def _rank_gathers(rank: int, init: str, out: str) -> None:
    """One rank of test_gathered_shards_equal_the_whole: its batches r, r + 2, ..., then the gather."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.set_num_threads(1)
    vae, x = _tiny_vae_and_data(23)
    mine = range(rank, 5, 2)
    per_ex = per_example(vae, x, num_samples=30, batch_size=5, chunk_size=7, seed=11, batches=mine)
    gathered = evaluate_mod.gather_shards(per_ex, mine, 5)
    torch.save(gathered, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_shards_equal_the_whole(tmp_path):
    """Two gloo processes, each with its example batches (rank 0: 0, 2, 4; rank 1: 1, 3; the last batch 3
    examples): rank 0's gathered per-example numbers equal one process's, to the last bit, and no example is
    left NaN or taken from the rank that did not compute it; the other rank gets None."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "gathered")
    mp.spawn(_rank_gathers, args=(f"file://{tmp_path / 'rendezvous'}", out), nprocs=2)
    gathered, other = (torch.load(f"{out}.{r}", weights_only=False) for r in range(2))
    assert other is None
    vae, x = _tiny_vae_and_data(23)
    whole = per_example(vae, x, num_samples=30, batch_size=5, chunk_size=7, seed=11)
    for key in PER_EXAMPLE_KEYS:
        assert torch.equal(gathered[key], whole[key]), key
    assert list(gathered["ladder"]) == list(whole["ladder"]) == [1, 10, 30]
    for k, v in whole["ladder"].items():
        assert torch.equal(gathered["ladder"][k], v), k


def test_per_example_still_checks_the_pixels_against_the_likelihood():
    """The K-sample estimate runs with torch.distributions' checks off (a copy of the model); the one-sample
    ELBO on the model itself still refuses a grey level under a proper Bernoulli, and the caller's model
    keeps its setting. The estimate equals one with every check on, to the last bit."""
    vae, x = _tiny_vae_and_data(10)
    with pytest.raises(ValueError, match="support"):
        per_example(vae, x * 0.5, num_samples=20, batch_size=5, chunk_size=7, seed=1)
    assert vae.validate_args is None
    fast = per_example(vae, x, num_samples=20, batch_size=5, chunk_size=7, seed=1)
    for i in range(0, 10, 5):
        checked = estimate_log_px(vae, x[i : i + 5], 20, 7, generator_seed=1, example_offset=i)
        assert torch.equal(fast["log_px"][i : i + 5], checked.log_px.double())


@pytest.mark.parametrize("device", DEVICES)
def test_an_examples_numbers_do_not_depend_on_batch_or_chunk_size(device):
    """Example i's noise is keyed by (seed, i): batches of 10, 25 or all 150 examples (cut across the
    64-example noise blocks differently) and chunks of 1, 7, 128 + 5 samples or auto (and both sizes auto:
    all 150 examples in one batch, K in one chunk) give the same
    per-example numbers (the log weights are summed in float64: rtol 1e-6 holds with a wide margin on a CPU).
    On CUDA the same noise meets networks whose float32 outputs for an example differ in their last bits
    between batch shapes (cuBLAS picks its kernel by the shape): 1e-5 there, relative and in nats (this
    untrained model's KL is 0.005-0.2 nats), about 1e-4 nats on log p(x) (8.6 nats), against 6e-4 nats at
    least (median 0.03) between two seeds' noise."""
    vae, x = _tiny_vae_and_data(150)
    tol = dict(rtol=1e-5, atol=1e-5) if device == "cuda" else dict(rtol=1e-6, atol=0)
    ref = per_example(vae, x, num_samples=200, batch_size=10, chunk_size=7, seed=3, device=device)
    for batch_size, chunk_size in ((25, 1), (150, 133), (25, "auto"), ("auto", "auto")):
        other = per_example(
            vae, x, num_samples=200, batch_size=batch_size, chunk_size=chunk_size, seed=3, device=device
        )
        for key in PER_EXAMPLE_KEYS:
            torch.testing.assert_close(other[key], ref[key], **tol, msg=key)
        for k, v in ref["ladder"].items():
            torch.testing.assert_close(other["ladder"][k], v, **tol)
    other = per_example(vae, x, num_samples=200, batch_size=10, chunk_size=7, seed=4, device=device)
    assert (other["log_px"] != ref["log_px"]).all() and (other["elbo"] != ref["elbo"]).all()
    # the one-sample ELBO's noise: examples 40..59's draws of their own stream, ELBO_STREAM
    eps = BlockNoise(3, ELBO_STREAM, 40, 20, 2, device).take(1)  # (1, 20, Z)
    elbo = elbo_terms(vae.to(device), x[40:60].to(device), 1, eps)["elbo"].double().cpu()
    torch.testing.assert_close(elbo, ref["elbo"][40:60], **tol)


def test_auto_chunk_size_fits_the_memory_budget(monkeypatch):
    # AEVB's MNIST model: per (sample, example) 2*20 + 2*500 + 3*784 = 3,392 floats = 13,568 bytes
    vae = VAE(data_dim=784, latent_dim=20, hidden_dims=[500])
    # 256 MiB / (100 examples * 13,568 bytes) = 197 samples, cut to whole 128-sample noise draws
    assert auto_chunk_size(vae, 100, 1000, "cpu") == 128
    assert auto_chunk_size(vae, 100, 50, "cpu") == 50  # never more than K
    assert auto_chunk_size(vae, 1, 100_000, "cpu") == 19_712  # 19,784 cut to 154 draws
    assert auto_chunk_size(vae, 10**6, 1000, "cpu") == 1  # at least one sample
    # IWAE's two-layer model: 2*150 + 2*400 + 3*784 = 3,452 floats, and its second layer's networks
    # 4*200 + 2*150 = 1,100: 4,552 floats = 18,208 bytes; 256 MiB / 100 examples -> 147 samples -> 128
    two = TwoLayerVAE(784, 100, 50, [100, 100], hidden_dims=[200, 200])
    assert auto_chunk_size(two, 100, 1000, "cpu") == 128
    assert auto_chunk_size(two, 1, 100_000, "cpu") == 14_720  # 14,742 cut to 115 draws
    # CUDA: half the free memory, 1 GiB free -> 512 MiB -> 395 samples -> 384
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 2**34))
    assert auto_chunk_size(vae, 100, 1000, "cuda") == 384
    assert config_mod.validate(compose("eval.chunk_size=auto")).eval.chunk_size == "auto"
    with pytest.raises(ConfigError, match="eval.chunk_size"):
        config_mod.validate(compose("eval.chunk_size=0"))


def test_auto_batch_size_holds_all_k_samples_in_one_chunk(monkeypatch):
    # AEVB's MNIST model, 13,568 bytes a (sample, example) pair: at K = 5,000 an example takes 67.84 MB, so
    # 3 fit the CPU's 256 MiB: the floor of 100 (and auto_chunk_size then splits K, 1 block of 128 a chunk)
    vae = VAE(data_dim=784, latent_dim=20, hidden_dims=[500])
    assert evaluate_mod.bytes_per_pair(vae) == 13_568
    assert auto_batch_size(vae, 10_000, 5000, "cpu") == 100
    assert auto_batch_size(vae, 10_000, 1000, "cpu") == 100  # 19 fit
    assert auto_batch_size(vae, 10_000, 10, "cpu") == 1978  # 268,435,456 / 135,680
    assert auto_batch_size(vae, 500, 10, "cpu") == 500  # never more than the examples
    assert auto_batch_size(vae, 40, 5000, "cpu") == 40  # nor the floor
    # CUDA, 128 GiB free: half of it / 67.84 MB = 1,012 examples, whose K = 5,000 then fit one chunk
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**37, 2**38))
    batch = auto_batch_size(vae, 10_000, 5000, "cuda")
    assert batch == 1012 and auto_chunk_size(vae, batch, 5000, "cuda") == 5000
    assert auto_chunk_size(vae, batch + 1, 5000, "cuda") < 5000  # one more would not
    assert config_mod.validate(compose()).eval.batch_size == "auto"  # the default
    assert config_mod.validate(compose("eval.batch_size=7")).eval.batch_size == 7
    with pytest.raises(ConfigError, match="eval.batch_size"):
        config_mod.validate(compose("eval.batch_size=0"))


def _rank_chooses(rank: int, init: str, budgets: list[int], out: str) -> None:
    """One rank of test_the_ranks_agree_on_the_auto_batch_size: its own CPU budget, the shared choice."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=len(budgets))
    evaluate_mod.AUTO_CHUNK_CPU_BYTES = budgets[rank]
    vae = VAE(data_dim=784, latent_dim=20, hidden_dims=[500])
    own = auto_batch_size(vae, 10_000, 10, "cpu")
    agreed = evaluate_mod.resolve_batch_size(vae, "auto", 10_000, 10, "cpu")
    fixed = evaluate_mod.resolve_batch_size(vae, 7, 10_000, 10, "cpu")
    with open(f"{out}.{rank}", "w") as f:
        json.dump([own, agreed, fixed], f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_ranks_agree_on_the_auto_batch_size(tmp_path):
    """Two gloo processes with different memory budgets (as two GPUs with different free memory would
    have) cut the test set the same way: both take the smaller choice, since the batches are shared out
    by index; a number given is kept."""
    import torch.multiprocessing as mp

    budgets = [2**28, 2**27]  # 1,978 and 989 examples at K = 10
    out = str(tmp_path / "choice")
    mp.spawn(_rank_chooses, args=(f"file://{tmp_path / 'rendezvous'}", budgets, out), nprocs=2)
    got = [json.loads((tmp_path / f"choice.{r}").read_text()) for r in range(2)]
    assert got == [[1978, 989, 7], [989, 989, 7]]


def test_eval_device_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert eval_device("cpu") == eval_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="eval.device=cuda.*no CUDA device"):
        eval_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")  # rank 1 of a torchrun on this node evaluates on its own GPU
    assert eval_device("auto") == eval_device("cuda") == torch.device("cuda", 1)
    assert eval_device("cpu") == torch.device("cpu")


def test_eval_device_cuda_without_a_gpu_fails_before_any_work(tmp_path, prepared_tiny, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    params = _params(tmp_path, "tracking.enabled=false", "eval.device=cuda")
    assert cli.main(["evaluate", "--params", str(params), "--out", str(prepared_tiny)]) == 2
    assert "eval.device=cuda" in capsys.readouterr().err
    # `vaerepro run` checks before it prepares or trains anything
    cfg = config_mod.load(params)
    with pytest.raises(ConfigError, match="eval.device"):
        cli.run_pipeline(cfg, tmp_path / "run", tmp_path)
    assert not (tmp_path / "run").exists()
    assert config_mod.validate(compose("eval.device=cpu")).eval.device == "cpu"
    with pytest.raises(ConfigError, match="eval.device"):
        config_mod.validate(compose("eval.device=tpu"))


def test_summary_units():
    n = 4
    per_ex = {
        "log_px": torch.tensor([-100.0, -102.0, -98.0, -100.0], dtype=torch.float64),
        "elbo": torch.full((n,), -105.0, dtype=torch.float64),
        "recon": torch.full((n,), -90.0, dtype=torch.float64),
        "kl": torch.full((n,), 15.0, dtype=torch.float64),
        "ess": torch.full((n,), 10.0, dtype=torch.float64),
        "ladder": {
            1: torch.full((n,), -105.0, dtype=torch.float64),
            10: torch.tensor([-100.0, -102.0, -98.0, -100.0], dtype=torch.float64),
        },
    }
    s = eval_metrics(per_ex, data_dim=784, jacobian=math.log(256))
    assert s["log_px"] == pytest.approx(-100.0)
    assert s["log_px_se"] == pytest.approx(np.std([-100, -102, -98, -100], ddof=1) / 2)
    assert s["bits_per_dim"] == pytest.approx((100 / 784 + math.log(256)) / math.log(2))  # 8.18 bits
    assert s["ess_fraction"] == pytest.approx(1.0)
    assert [r["k"] for r in s["log_px_ladder"]] == [1, 10]
    # the ladder's change is paired: +5, +3, +7, +5 nats per example
    assert (s["log_px_ladder"][0]["gain"], s["log_px_ladder"][0]["gain_se"]) == (None, None)
    assert s["log_px_ladder"][1]["gain"] == pytest.approx(5.0)
    assert s["log_px_ladder"][1]["gain_se"] == pytest.approx(np.std([5, 3, 7, 5], ddof=1) / 2)
    # a rise of 5 ± 0.8 nats from K=1 to K=10 is not converged; the ESS (10 of 10) is not the reason
    assert s["converged"] is False
    conv = s["convergence"]
    assert conv["reasons"] == ["ladder still rising: +5.00 ± 0.82 nats/example from K=1 to K=10 (paired SE)"]
    assert (conv["ladder_from_k"], conv["ladder_to_k"], conv["ess_hmean"]) == (1, 10, pytest.approx(10.0))
    assert (conv["ladder_gain_sigmas"], conv["ladder_gain_tol"], conv["ess_floor"]) == (2.0, 0.1, 5.0)
    per_ex["ladder"][1] = per_ex["ladder"][10] - 0.05  # a last step below the tolerance
    assert eval_metrics(per_ex, data_dim=784, jacobian=0.0)["converged"] is True


def test_every_summary_number_is_the_mean_or_se_of_its_own_per_example_values():
    """eval.json's ELBO, its SE, KL, reconstruction term and ESS, each against numpy on its own per-example
    values (all different, so a number taken from another key or another statistic cannot match)."""
    g = np.random.default_rng(0)
    n = 7
    values = {
        "log_px": -100.0 + g.normal(size=n),
        "elbo": -110.0 + 3.0 * g.normal(size=n),
        "recon": -80.0 + 2.0 * g.normal(size=n),
        "kl": 20.0 + 4.0 * g.random(n),
        "ess": np.array([1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0]),
    }
    per_ex = {k: torch.from_numpy(v) for k, v in values.items()}
    per_ex["ladder"] = {1: per_ex["log_px"] - 1.0, 50: per_ex["log_px"]}
    s = eval_metrics(per_ex, data_dim=784, jacobian=0.0)

    def sem(v):
        return np.std(v, ddof=1) / math.sqrt(n)

    assert s["elbo"] == pytest.approx(values["elbo"].mean(), rel=1e-12)
    assert s["elbo_se"] == pytest.approx(sem(values["elbo"]), rel=1e-12)
    assert s["kl"] == pytest.approx(values["kl"].mean(), rel=1e-12)
    assert s["recon"] == pytest.approx(values["recon"].mean(), rel=1e-12)
    assert s["ess"] == pytest.approx(53.0 / 7, rel=1e-12)  # the arithmetic mean; the verdict's is harmonic
    assert s["ess_fraction"] == pytest.approx(53.0 / 7 / 50, rel=1e-12)
    assert s["convergence"]["ess_hmean"] == pytest.approx(7 / (1 / values["ess"]).sum(), rel=1e-12)
    assert [p["se"] for p in s["log_px_ladder"]] == pytest.approx([sem(values["log_px"])] * 2, rel=1e-12)


@pytest.mark.parametrize(
    ("overrides", "name", "dequantized"),
    [
        (("data.space=continuous", "likelihood.allow_improper=true"), "improper", True),
        ((), "binary", False),
    ],
    ids=["improper-bernoulli-on-grey-levels", "bernoulli-on-binarised-levels"],
)
def test_the_stage_names_its_headline_numbers_by_their_unit(
    prepared_tiny, tmp_path, overrides, name, dequantized
):
    """A Bernoulli on grey levels (allow_improper) sees continuous data, but its numbers are no density's:
    DVC's metrics (eval_summary.json) hold them under `improper`, never under `continuous`, where `dvc
    metrics diff` would set them beside a proper density's. A Bernoulli on binarised 8-bit levels: under
    `binary`, and eval.json's `quantized` is false (a pmf on {0,1}^D, no dequantisation), as it is true for
    the grey levels dequantised into [0,1]. log p(x) and its SE are named by K as well (log_px_k50): DVC
    never sets an estimate from K samples beside one from another K in one column."""
    overrides = (*overrides, "train.max_epochs=1")
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    train(tiny_config(*overrides), out, enable_progress_bar=False)
    metrics = evaluate_mod.evaluate(tiny_config(*overrides, "eval.device=cpu"), out, progress=False)
    assert (metrics["likelihood"], metrics["improper"]) == ("bernoulli", name == "improper")
    assert metrics["quantized"] is dequantized
    summary = json.loads((out / "metrics" / "eval_summary.json").read_text())
    assert summary == {
        "likelihood": "bernoulli",
        "latent_dim": 4,
        name: {
            "log_px_k50": metrics["log_px"],
            "log_px_k50_se": metrics["log_px_se"],
            "elbo": metrics["elbo"],
        },
        "knn_accuracy": metrics["knn_accuracy"],
        "converged": metrics["converged"],
    }


@pytest.mark.parametrize(
    ("space", "quantized", "dequantized", "bits_added"),
    [
        ("binary", True, False, 0.0),
        ("binary", False, False, 0.0),
        ("continuous", True, True, 8.0),
        ("continuous", False, False, 0.0),
    ],
)
def test_quantized_means_dequantized_8_bit_data(space, quantized, dequantized, bits_added):
    """eval.json's `quantized` and the bits/dim offset: only 8-bit data dequantized into [0,1] gets 8 bits;
    binarised 8-bit data is a pmf on {0,1}^D."""
    from vaerepro.data import dim_log_jacobian, is_dequantized

    assert is_dequantized(space, quantized) is dequantized
    assert dim_log_jacobian(space, quantized) / math.log(2) == pytest.approx(bits_added)


@pytest.mark.slow
def test_eval_json_per_example_ladder_and_mlflow_carry_the_verdict(raw_dir, tmp_path):
    from mlflow import MlflowClient

    from conftest import ROOT, tiny_config
    from vaerepro import estimators, tracking

    (tmp_path / "conf").symlink_to(ROOT / "conf")
    cfg = tiny_config("train.max_epochs=1", tracking=True, raw_dir=raw_dir)
    metrics = cli.run_pipeline(cfg, tmp_path / "out", tmp_path, progress=False)
    ev = json.loads((tmp_path / "out" / "metrics" / "eval.json").read_text())
    assert ev == json.loads(json.dumps(metrics))
    assert (ev["data_space"], ev["quantized"]) == ("binary", False)  # 8-bit digits, binarised
    assert ev["bits_per_dim"] == pytest.approx(-ev["log_px"] / (784 * math.log(2)))
    # the verdict recomputed from the per-example ladder saved beside it
    per_ex = np.load(tmp_path / "out" / "artifacts" / "per_example.npz")
    ladder = {k: torch.as_tensor(per_ex[f"log_px_k{k}"]) for k in (1, 10, 50)}
    v = estimators.convergence(ladder, torch.as_tensor(per_ex["ess"]))
    assert ev["converged"] is v.converged and ev["convergence"]["reasons"] == v.reasons
    assert ev["convergence"]["ladder_gain"] == pytest.approx(ev["log_px"] - ev["log_px_ladder"][1]["log_px"])
    assert ev["log_px_ladder"][2]["gain"] == pytest.approx(ev["convergence"]["ladder_gain"])
    # in MLflow: a tag and a number (1 or 0) that the report's rows carry
    client = MlflowClient(tracking.tracking_uri(cfg.tracking, tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("vaerepro").experiment_id])
    assert run.data.tags["vaerepro.converged"] == str(v.converged).lower()
    (row,) = tracking.experiment_runs(cfg.tracking, tmp_path)
    assert row["converged"] == float(v.converged)
    assert row["ladder_gain"] == pytest.approx(ev["convergence"]["ladder_gain"])


def _params(tmp_path, *overrides):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(compose(*overrides)))
    return p


def test_cli_bad_data_file_fails_before_training_and_keeps_old_results(tmp_path, capsys):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # marks the project root
    old = tmp_path / "prepared"
    old.mkdir()
    (old / "meta.json").write_text("{}")
    bad = tmp_path / "mine.npz"
    np.savez(bad, x=np.full((10, 4, 4), 1.5, dtype=np.float32))  # float pixels outside [0, 1]
    params = _params(tmp_path, "data=npz", f"data.path={bad}", "likelihood=gaussian")
    rc = cli.main(["prepare", "--params", str(params), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "mine.npz" in err and "[0, 1]" in err, err
    assert (old / "meta.json").read_text() == "{}"  # nothing already saved is lost


def test_cli_bad_config_names_the_key(tmp_path, capsys):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    raw = compose()
    raw["model"]["latent_dim"] = 0
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert cli.main(["train", "--params", str(p), "--out", str(tmp_path)]) == 2
    assert "model.latent_dim" in capsys.readouterr().err


def test_cli_evaluate_without_checkpoint_says_what_is_missing(tmp_path, prepared_tiny, capsys):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    params = _params(tmp_path, "tracking.enabled=false", "data.max_examples=600")  # as prepared_tiny's splits
    assert cli.main(["evaluate", "--params", str(params), "--out", str(prepared_tiny)]) == 2
    assert "best.ckpt" in capsys.readouterr().err


def test_images_for_the_report_and_the_2d_manifold():
    from vaerepro.evaluate import sample_images

    torch.manual_seed(0)
    x = torch.rand(6, 12)
    for z, keys in ((2, {"manifold", "manifold_grid"}), (3, set())):
        vae = VAE(data_dim=12, latent_dim=z, hidden_dims=[8], likelihood={"name": "continuous_bernoulli"})
        out = sample_images(vae, x, (3, 4), n=4, seed=0)
        assert set(out) == {"inputs", "reconstructions", "prior_samples"} | keys
        assert out["inputs"].shape == out["reconstructions"].shape == out["prior_samples"].shape == (4, 3, 4)
        assert ((out["reconstructions"] >= 0) & (out["reconstructions"] <= 1)).all()
        if z == 2:
            assert out["manifold"].shape == (15, 15, 3, 4)
            grid = out["manifold_grid"]  # Gaussian quantiles of 5 % ... 95 %: symmetric, +-1.645 at the ends
            np.testing.assert_allclose(grid, -grid[::-1], atol=1e-6)
            assert grid[-1] == pytest.approx(1.6449, abs=1e-3)


def _sha256s(out) -> dict[str, str]:
    import hashlib

    files = sorted(p for d in ("metrics", "artifacts") for p in (out / d).glob("*") if p.is_file())
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _busy(out) -> str:
    return (
        f"vaerepro evaluate: {out}: another evaluation or a training is running in this directory now (a "
        "`vaerepro evaluate`, `vaerepro train`, `vaerepro run` or `dvc repro`); nothing was changed: wait "
        "for it to end, then evaluate"
    )


def test_a_second_evaluation_of_a_directory_is_refused_while_one_runs(prepared_tiny, tmp_path, capsys):
    """Two evaluations of one run at once (two K) each wrote eval.json, eval_summary.json and the arrays: the
    files ended as a mix of both. The second, started while the first evaluates, is refused in one line with
    exit status 2, and the first's files are its own."""
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    (out / "dvc.yaml").write_text("stages: {}\n")  # marks the project root
    train(tiny_config("train.max_epochs=1"), out, enable_progress_bar=False)
    first, second = out / "k50.yaml", out / "k10.yaml"
    for path, k in ((first, 50), (second, 10)):
        path.write_text(yaml.safe_dump(compose(*TINY, "tracking.enabled=false", f"eval.num_samples={k}")))
    assert cli.main(["evaluate", "--params", str(second), "--out", str(out)]) == 0
    capsys.readouterr()
    original, started, inner = evaluate_mod.evaluate, [], []

    def evaluate_and_start_another(cfg, out_dir, **kw):  # the second starts while the first evaluates
        if not started:
            started.append(cfg.eval.num_samples)
            inner.append(cli.main(["evaluate", "--params", str(second), "--out", str(out)]))
            inner.append(capsys.readouterr().err)
            inner.append(_sha256s(out))
        return original(cfg, out_dir, **kw)

    before = _sha256s(out)
    try:
        evaluate_mod.evaluate = evaluate_and_start_another
        assert cli.main(["evaluate", "--params", str(first), "--out", str(out)]) == 0
    finally:
        evaluate_mod.evaluate = original
    status, err, during = inner
    assert status == 2 and err.strip().splitlines() == [_busy(out)], err
    assert during == before
    ev = json.loads((out / "metrics" / "eval.json").read_text())
    summary = json.loads((out / "metrics" / "eval_summary.json").read_text())
    assert ev["num_samples"] == 50 and summary["binary"]["log_px_k50"] == ev["log_px"]


def test_an_evaluation_of_a_directory_is_refused_while_it_trains(prepared_tiny, tmp_path, capsys):
    """An evaluation while the run's training runs read a best.ckpt that the training then replaces: its
    numbers named weights that were no longer there. Refused in one line, exit status 2, nothing written."""
    import lightning.pytorch as pl

    out = copy_prepared(prepared_tiny, tmp_path / "run")
    (out / "dvc.yaml").write_text("stages: {}\n")  # marks the project root
    params = out / "params.yaml"
    params.write_text(yaml.safe_dump(compose(*TINY, "tracking.enabled=false")))
    seen = []

    class EvaluateNow(pl.Callback):  # in the second epoch: the first one's best.ckpt is there
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                seen.append(cli.main(["evaluate", "--params", str(params), "--out", str(out)]))
                seen.append(capsys.readouterr().err)

    train(tiny_config(), out, enable_progress_bar=False, callbacks=[EvaluateNow()])
    status, err = seen
    assert status == 2 and err.strip().splitlines() == [_busy(out)], err
    assert not (out / "metrics" / "eval.json").exists() and not (out / "artifacts").exists()
    assert cli.main(["evaluate", "--params", str(params), "--out", str(out)]) == 0  # free once it ended
