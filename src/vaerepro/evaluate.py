"""The `evaluate` stage: test-set log p(x) by importance sampling (q as proposal), bounds, and diagnostics.

Writes metrics/eval.json (nats per example unless the key says otherwise), its headline numbers
metrics/eval_summary.json (DVC's metrics), artifacts/samples.npz (the images the report shows) and
artifacts/per_example.npz (each test example's estimates). Each test example's noise is keyed by (eval.seed,
its index in the test set) (estimators.BlockNoise), so its numbers do not depend on eval.batch_size,
eval.chunk_size or how the batches are shared out between processes (see `evaluate`), up to float rounding
(the networks' matrix products may round differently for other batch shapes).

eval.precision: the arithmetic of importance sampling, 32 (float32), tf32 (CUDA matmuls in TF32) or bf16
(the networks under bfloat16 autocast; log-densities and log-sum-exp in float32). A reduced precision's
effect is measured, never assumed: the stage also runs float32 on the first PRECISION_CHECK_EXAMPLES test
examples with the same noise and records the paired difference in nats (eval.json `precision`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vaerepro import checkpoints, estimators, signals
from vaerepro.config import Config, ConfigError
from vaerepro.data import (
    TEST_SEED_OFFSET,
    check_bounded,
    check_prepared_from,
    config_split_settings,
    dim_log_jacobian,
    file_sha256,
    fixed_space,
    is_dequantized,
    load_prepared,
)
from vaerepro.devices import device_text
from vaerepro.estimators import mean_se
from vaerepro.files import write_json, write_whole
from vaerepro.likelihoods import space_name
from vaerepro.model import VAE, build_vae, bytes_per_pair
from vaerepro.versions import git_commit, versions

log = logging.getLogger(__name__)

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: unit u is active if Cov_x(E_q[z_u]) > 0.01
# z1 draws per test example for E_q[z2|x] of a two-layer model (layer_means): a unit whose E_q[z2|x] is the
# same for every x but whose q(z2|z1) mean varies by Var(mu2) over q(z1|x) gets Var(mu2)/200 of noise,
# half the 0.01 threshold at Var(mu2) = 1. IWAE's two-layer MNIST model, 10,000 test images: ~10 s on 2
# CPU cores, beside hours of K = 5000 importance sampling there
ACTIVE_UNIT_SAMPLES = 200
KNN_K = 15  # Loaiza-Ganem & Cunningham 2019 classify latent means with 15 nearest neighbours
# eval.chunk_size=auto and eval.batch_size=auto: one chunk's decoder activations fit this memory budget
AUTO_CHUNK_CPU_BYTES = 256 * 2**20  # on the CPU: a fixed 256 MiB
AUTO_CHUNK_CUDA_FRACTION = 0.5  # on CUDA: this fraction of the device's free memory (torch.cuda.mem_get_info)
# eval.batch_size=auto: never fewer test examples per batch than this (the fixed default it replaced);
# below it a batch only adds per-batch work, since the chunk already splits K to fit the memory budget
AUTO_BATCH_MIN = 100
# eval.precision: the float32 matmul precision (torch.set_float32_matmul_precision) importance sampling runs
# under, put back afterwards. 32 and bf16 set "highest", so that 32 means float32 even after a training in
# this process left TF32 on (trainer.matmul_precision=high, which trainer=gpu sets); tf32 sets "high".
MATMUL_PRECISION = {"32": "highest", "tf32": "high", "bf16": "highest"}
# A reduced eval.precision's float32 reference runs on the first min(this, n_test) test examples, with the
# same K and noise: the paired difference's SE is std(d) / sqrt(500), std(d) being the spread of the
# rounding effect across examples (not of log p(x) itself), and the reference costs at most 500 examples'
# sampling (5 % more on a 10,000-example test set).
PRECISION_CHECK_EXAMPLES = 500


def load_vae(path: Path, ckpt: dict[str, Any] | None = None) -> VAE:
    """Rebuild the VAE from a checkpoint without Lightning: constructor args + weights, weights_only.
    `ckpt`: the checkpoint already read from `path`."""
    ckpt = ckpt if ckpt is not None else checkpoints.read(path)
    vae = build_vae(ckpt["hyper_parameters"]["vae_config"])
    state = {k.removeprefix("vae."): v for k, v in ckpt["state_dict"].items() if k.startswith("vae.")}
    vae.load_state_dict(state)
    return vae.eval()


def memory_budget(device: torch.device | str) -> float:
    """Bytes that one chunk's decoder activations may take for eval.chunk_size/batch_size=auto:
    AUTO_CHUNK_CPU_BYTES on the CPU; AUTO_CHUNK_CUDA_FRACTION of the device's free memory on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return AUTO_CHUNK_CUDA_FRACTION * torch.cuda.mem_get_info(device)[0]
    return float(AUTO_CHUNK_CPU_BYTES)


def auto_chunk_size(vae: VAE, batch_size: int, num_samples: int, device: torch.device | str) -> int:
    """Importance samples per chunk (1 ... num_samples) for eval.chunk_size=auto: as many as fit the memory
    budget (`memory_budget`) with batch_size examples, a multiple of estimators.SAMPLE_BLOCK when above it
    (whole noise draws). The results do not depend on the chunk size, only the speed and memory do."""
    per_sample = bytes_per_pair(vae) * batch_size  # bytes per sample of a chunk
    chunk = max(1, min(num_samples, int(memory_budget(device) // per_sample)))
    block = estimators.SAMPLE_BLOCK
    return chunk if chunk <= block or chunk == num_samples else chunk - chunk % block


def auto_batch_size(vae: VAE, num_examples: int, num_samples: int, device: torch.device | str) -> int:
    """Test examples per batch (1 ... num_examples) for eval.batch_size=auto: as many as hold all
    num_samples samples in one chunk within the memory budget (`memory_budget`), never fewer than
    AUTO_BATCH_MIN (then auto_chunk_size splits K to fit). Fewer, larger batches mean fewer calls of the
    per-batch work (the one-sample ELBO, the ladder, copies to the host); the numbers do not depend on it.

    AEVB's MNIST model (13,568 bytes a pair) at K = 5,000: 3 examples fit the CPU's 256 MiB, so 100;
    about 1,000 fit half of an H200's free memory.
    """
    fit = int(memory_budget(device) // (bytes_per_pair(vae) * num_samples))
    return max(1, min(num_examples, max(AUTO_BATCH_MIN, fit)))


def resolve_chunk_size(
    vae: VAE, chunk_size: int | str, batch_size: int, num_samples: int, device: torch.device | str
) -> int:
    """eval.chunk_size as a number: `chunk_size` itself, or for "auto" `auto_chunk_size`'s (logged)."""
    if chunk_size != "auto":
        return chunk_size
    chunk_size = auto_chunk_size(vae, batch_size, num_samples, device)
    log.info("eval.chunk_size=auto: %d importance samples per chunk", chunk_size)
    return chunk_size


def resolve_batch_size(
    vae: VAE, batch_size: int | str, num_examples: int, num_samples: int, device: torch.device | str
) -> int:
    """eval.batch_size as a number: `batch_size` itself, or for "auto" `auto_batch_size`'s (logged). In an
    initialised process group every rank takes the smallest rank's choice: the ranks share the batches out
    by index (`evaluate`), so they must cut the test set the same way, and the smallest fits every device."""
    if batch_size != "auto":
        return batch_size
    batch_size = auto_batch_size(vae, num_examples, num_samples, device)
    if _process_group()[1] > 1:
        import torch.distributed as dist

        choices = [None] * dist.get_world_size()
        dist.all_gather_object(choices, batch_size, group=_gloo_group())
        batch_size = min(choices)
    log.info("eval.batch_size=auto: %d test examples per batch", batch_size)
    return batch_size


def check_precision(precision: str, device: torch.device | str, device_key: str | None = None) -> None:
    """Refuse (ConfigError, one line naming eval.precision) a precision the evaluation device lacks: TF32
    is a mode of CUDA's matrix units. `device_key`: the eval.device value that resolved to `device`."""
    if precision not in MATMUL_PRECISION:
        raise ConfigError(f"eval.precision={precision!r}: allowed: {', '.join(MATMUL_PRECISION)}")
    device = torch.device(device)
    if precision == "tf32" and device.type != "cuda":
        given = f" (eval.device={device_key})" if device_key is not None else ""
        raise ConfigError(
            f"eval.precision=tf32: TF32 matmuls exist on CUDA devices only, and evaluation runs on the "
            f"{device.type.upper()} here{given}; use eval.precision=32 or bf16"
        )


class BF16Autocast(nn.Module):
    """`inner` (an MLP: encoder or decoder) run under bfloat16 autocast, its output cast back to the
    parameters' dtype (float32): (..., n_in) -> (..., n_out).

    So only the network's matrix products and activations round to bfloat16; the likelihood's and the
    Gaussians' log-densities, the log weights and their log-sum-exp that read its output stay in float32.
    """

    def __init__(self, inner: nn.Module, device_type: str):
        super().__init__()
        self.inner, self.device_type = inner, device_type
        self.out_dtype = next(inner.parameters()).dtype
        self.train(inner.training)  # the wrapped model's mode (eval: no dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.inner(h)  # bfloat16 from autocast's matmuls
        return out.to(self.out_dtype)


# the networks of a VAE / TwoLayerVAE that eval.precision=bf16 runs under autocast (model.py)
NETWORKS = ("encoder", "decoder", "encoder_2", "decoder_2")


def bf16_networks(vae: VAE, device_type: str) -> VAE:
    """`vae` (a copy: modified in place) with each of its NETWORKS wrapped in BF16Autocast."""
    for name in NETWORKS:
        if isinstance(getattr(vae, name, None), nn.Module):
            setattr(vae, name, BF16Autocast(getattr(vae, name), device_type))
    return vae


@contextlib.contextmanager
def matmul_precision(precision: str):
    """torch's float32 matmul precision for eval.precision (MATMUL_PRECISION) inside, the caller's after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(MATMUL_PRECISION[precision])
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@torch.no_grad()
def per_example(
    vae: VAE,
    x: torch.Tensor,
    *,
    num_samples: int,
    batch_size: int | str,
    chunk_size: int | str,
    seed: int,
    batches: range | None = None,
    progress: bool = False,
    device: torch.device | str = "cpu",
    precision: str = "32",
) -> dict[str, Any]:
    """Per-example estimates over x (N, D): log_px (N,), elbo/recon/kl (N,), ess (N,), ladder {k: (N,)}.

    `batches` selects which example batches to compute (a rank's shard); the others are left NaN.
    `batch_size`: test examples per batch, or "auto" (`auto_batch_size`); `batches` index batches of the
    resolved size. `chunk_size`: importance samples per decoder call, or "auto" (`auto_chunk_size`).
    `device`: where the sampling runs (a copy of vae goes there); the results come back to the CPU.
    `precision`: eval.precision, "32", "tf32" (CUDA only) or "bf16" (a copy of vae whose networks run under
    bfloat16 autocast, `bf16_networks`); the noise is float32 in each, so the draws are the same.
    Example i's noise is keyed by (seed, i) (estimators.BlockNoise: the importance samples from stream
    IS_STREAM, the one-sample ELBO's from ELBO_STREAM), so on one device its numbers are the same whatever
    batch_size, chunk_size and sharding, up to float rounding (the decoder's matrix products may round
    differently for other batch shapes); CPU and CUDA give different (equally valid) draws.
    """
    device = torch.device(device)
    check_precision(precision, device)
    if device.type != "cpu" or precision == "bf16":
        vae = copy.deepcopy(vae).to(device)
    if precision == "bf16":
        vae = bf16_networks(vae, device.type)
    n = len(x)
    batch_size = resolve_batch_size(vae, batch_size, n, num_samples, device)
    batches = batches if batches is not None else range(math.ceil(n / batch_size))
    chunk_size = resolve_chunk_size(vae, chunk_size, batch_size, num_samples, device)
    # The K-sample estimate runs on a copy with torch.distributions' checks off (VAE.validate_args): they
    # re-check every chunk's (k, B, D) decoder outputs, two full passes (~5 % of the evaluation on the CPU).
    # The one-sample ELBO of each batch runs on `vae` itself, so the batch's pixels are still checked
    # against the likelihood's support (a grey level under a proper Bernoulli: ValueError) before sampling.
    sampler = copy.deepcopy(vae)
    sampler.validate_args = False
    with matmul_precision(precision):
        return _per_example(
            vae, sampler, x, num_samples, batch_size, chunk_size, seed, batches, progress, device
        )


def _per_example(
    vae: VAE,
    sampler: VAE,
    x: torch.Tensor,
    num_samples: int,
    batch_size: int,
    chunk_size: int,
    seed: int,
    batches: range,
    progress: bool,
    device: torch.device,
) -> dict[str, Any]:
    n = len(x)
    dtype = next(vae.parameters()).dtype
    keys = ("log_px", "elbo", "recon", "kl", "ess")
    out = {k: torch.full((n,), math.nan, dtype=torch.float64) for k in keys}
    ladder = {
        k: torch.full((n,), math.nan, dtype=torch.float64) for k in estimators.ladder_points(num_samples)
    }
    for b in tqdm(batches, desc=f"log p(x), K={num_samples}", disable=not progress, unit="batch"):
        signals.check()  # a SIGTERM or Ctrl-C that Python dropped in a finalizer stops the evaluation here
        sl = slice(b * batch_size, min(n, (b + 1) * batch_size))
        xb = x[sl].to(device)
        eps = estimators.BlockNoise(
            seed, estimators.ELBO_STREAM, sl.start, len(xb), vae.z_dim, device, dtype
        ).take(1)  # (1, B, Z), the ELBO's noise
        terms = estimators.elbo_terms(vae, xb, 1, eps, estimator="B" if vae.stochastic_layers == 1 else "A")
        est = estimators.estimate_log_px(
            sampler, xb, num_samples, chunk_size, generator_seed=seed, example_offset=sl.start
        )
        out["log_px"][sl], out["ess"][sl] = est.log_px.double().cpu(), est.ess.double().cpu()
        for k in ("elbo", "recon", "kl"):
            out[k][sl] = terms[k].double().cpu()
        for k, v in est.ladder.items():
            ladder[k][sl] = v.double().cpu()
    out["ladder"] = ladder
    return out


@torch.no_grad()
def posterior_means(vae: VAE, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([vae.posterior_params(x[i : i + batch_size])[0] for i in range(0, len(x), batch_size)])


@torch.no_grad()
def layer_means(
    vae: VAE,
    x: torch.Tensor,
    seed: int,
    batch_size: int = 1000,
    samples: int = ACTIVE_UNIT_SAMPLES,
) -> list[torch.Tensor]:
    """E_q[z_l|x] of each stochastic layer l: [(N, Z1)], or [(N, Z1), (N, Z2)]. The first is q(z1|x)'s mean
    (posterior_means: kNN's latent means too).

    q(z2|x) = ∫ q(z2|z1) q(z1|x) dz1 has no closed-form mean, so z2's is E_{q(z1|x)}[mu2(z1)] over `samples`
    draws of z1 (noise from a generator seeded with `seed`): the mean mu2 of q(z2|z1) rather than a draw of
    z2, so the Monte Carlo noise in each example's estimate is Var(mu2)/samples, without q(z2|z1)'s own
    variance (about 1 for a unit the model does not use)."""
    g = torch.Generator().manual_seed(seed)
    first, second = [], []
    for i in range(0, len(x), batch_size):
        mu1, logvar1 = vae.posterior_params(x[i : i + batch_size])  # (B, Z1) each
        first.append(mu1)
        if vae.stochastic_layers == 2:
            eps = torch.randn((samples, *mu1.shape), generator=g, dtype=mu1.dtype)  # (S, B, Z1)
            z1 = mu1 + (0.5 * logvar1).exp() * eps
            second.append(vae.posterior_2(z1).mean.mean(dim=0))  # (B, Z2)
    return [torch.cat(first), *([torch.cat(second)] if second else [])]


def active_units(mu: torch.Tensor) -> int:
    """Number of latent dimensions whose posterior mean varies across examples: Cov_x(E_q[z_u]) > 0.01.
    mu (N, Z): the posterior means of one stochastic layer (layer_means)."""
    return int((mu.var(dim=0) > ACTIVE_UNIT_THRESHOLD).sum())


def knn_accuracy(
    train_z: torch.Tensor, train_y: torch.Tensor, test_z: torch.Tensor, test_y: torch.Tensor, k: int = KNN_K
) -> float:
    """k-nearest-neighbour classification accuracy of latent means: a likelihood-agnostic score."""
    k = min(k, len(train_z))
    votes = []
    for i in range(0, len(test_z), 512):
        d = torch.cdist(test_z[i : i + 512], train_z)  # (b, N_train)
        idx = d.topk(k, largest=False).indices  # (b, k)
        labels = train_y[idx]
        votes.append(torch.mode(labels, dim=1).values)
    return float((torch.cat(votes) == test_y).double().mean())


@torch.no_grad()
def sample_images(
    vae: VAE, x: torch.Tensor, image_shape: tuple[int, int], n: int, seed: int
) -> dict[str, np.ndarray]:
    """Inputs beside reconstructions, prior samples, and the 2-D manifold when the model has one stochastic
    layer of size 2."""
    lik = vae.likelihood
    g = torch.Generator().manual_seed(seed)
    shape = (-1, *image_shape)
    xs = x[:n]
    mu, _ = vae.posterior_params(xs)
    out = {
        "inputs": xs.reshape(shape).numpy(),
        "reconstructions": lik.mean(vae.decoder_params(mu)).reshape(shape).numpy(),
        "prior_samples": lik.mean(vae.decoder_params(vae.sample_prior(n, g))).reshape(shape).numpy(),
    }
    if vae.stochastic_layers == 1 and mu.shape[1] == 2:
        # AEVB Fig. 4: a grid through the inverse Gaussian CDF, so it covers the prior's mass evenly.
        grid = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, 15))
        zz = torch.stack(torch.meshgrid(grid, grid.flip(0), indexing="xy"), dim=-1)  # (15, 15, 2)
        out["manifold"] = lik.mean(vae.decoder_params(zz)).reshape(15, 15, *image_shape).numpy()
        out["manifold_grid"] = grid.numpy()
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def eval_metrics(per_ex: dict[str, Any], *, data_dim: int, jacobian: float) -> dict[str, Any]:
    """The eval.json numbers from per-example estimates: means ± SE across examples (nats/example), bits/dim,
    ESS, the ladder and the convergence verdict (estimators.convergence)."""
    log_px, log_px_se = mean_se(per_ex["log_px"])
    elbo, elbo_se = mean_se(per_ex["elbo"])
    k_max = max(per_ex["ladder"])
    verdict = estimators.convergence(per_ex["ladder"], per_ex["ess"])
    # each ladder point: its mean and SE across examples; from the second on, also the paired gain over the
    # previous point and its paired SE (estimators.ladder_steps), the error bar of the K-to-K change
    gains = {st["k"]: st for st in estimators.ladder_steps(per_ex["ladder"])}
    ladder = []
    for k, values in per_ex["ladder"].items():
        m, se = mean_se(values)
        step = gains.get(k, {})
        ladder.append({"k": k, "log_px": m, "se": se, **{g: step.get(g) for g in ("gain", "gain_se")}})
    return {
        "log_px": log_px,
        "log_px_se": log_px_se,
        "elbo": elbo,
        "elbo_se": elbo_se,
        "kl": mean_se(per_ex["kl"])[0],
        "recon": mean_se(per_ex["recon"])[0],
        # bits/dim of the data: -log p(x)/D in bits, plus 8 bits per dimension of uniform dequantisation
        "bits_per_dim": (-log_px / data_dim + jacobian) / math.log(2),
        "ess": float(per_ex["ess"].mean()),
        "ess_fraction": float(per_ex["ess"].mean()) / k_max,
        "log_px_ladder": ladder,
        "converged": verdict.converged,
        "convergence": {
            "reasons": verdict.reasons,
            "ladder_gain": verdict.ladder_gain,
            "ladder_gain_se": verdict.ladder_gain_se,
            "ladder_from_k": verdict.ladder_from_k,
            "ladder_to_k": k_max,
            "ladder_gain_sigmas": estimators.LADDER_GAIN_SIGMAS,
            "ladder_gain_tol": estimators.LADDER_GAIN_TOL_NATS,
            "ess_hmean": verdict.ess_hmean,
            "ess_floor": estimators.ESS_FLOOR,
        },
    }


def precision_effect(name: str, reduced: torch.Tensor, full: torch.Tensor) -> dict[str, Any]:
    """eval.json's `precision` for a reduced precision: its name, the examples compared, and the paired
    difference d = log p(x)[name] - log p(x)[float32] per example (N,), nats: mean, SE across examples
    (NaN for one example) and the largest |d|. `reduced`, `full`: (N,) estimates of the same examples with
    the same noise."""
    d = (reduced.double() - full.double()).reshape(-1)  # (N,), nats
    mean, se = mean_se(d)
    return {
        "name": name,
        "examples": int(d.numel()),
        "log_px_diff": mean,
        "log_px_diff_se": se,
        "log_px_diff_max_abs": float(d.abs().max()),
    }


def eval_device(name: str) -> torch.device:
    """The device for `eval.device`: under torchrun / srun, this process's GPU (LOCAL_RANK)."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            "eval.device=cuda, but this process sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); use eval.device=cpu or auto"
        )
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return torch.device("cuda", local % torch.cuda.device_count())


def _process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gloo_group():
    """A process group for exchanging CPU tensors and pickled objects: the default group when it is gloo
    (None), else a new gloo group of the same ranks (a collective call: every rank makes it)."""
    import torch.distributed as dist

    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def gather_shards(per_ex: dict[str, Any], batches: range, batch_size: int) -> dict[str, Any] | None:
    """Rank 0 gets every rank's example batches copied into one set of per-example tensors; others None.

    Each rank sends the batches it computed, and rank 0 copies exactly those slices: no arithmetic, so the
    result equals a single-process run's bit for bit. Goes through gloo (CPU tensors, pickled objects), on
    a gloo group of its own when the default group is another backend (NCCL after GPU training).
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    parts = [None] * world if rank == 0 else None
    dist.gather_object((list(batches), per_ex), parts, dst=0, group=_gloo_group())
    if rank != 0:
        return None
    out = {k: v.clone() for k, v in per_ex.items() if k != "ladder"}
    out["ladder"] = {k: v.clone() for k, v in per_ex["ladder"].items()}
    for their_batches, theirs in parts:
        for b in their_batches:
            sl = slice(b * batch_size, (b + 1) * batch_size)
            for k in out:
                if k == "ladder":
                    for j in out["ladder"]:
                        out["ladder"][j][sl] = theirs["ladder"][j][sl]
                else:
                    out[k][sl] = theirs[k][sl]
    return out


ARTIFACTS = ("per_example.npz", "samples.npz")  # evaluate's arrays in out_dir/artifacts, named in eval.json


def dvc_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """DVC's metrics (eval_summary.json), which `dvc metrics diff` and `dvc exp show` compare: what was
    evaluated and the headline numbers, in the order of the table's columns. eval.json keeps the whole
    record (ladder, convergence, bookkeeping), a plain output for DVC.

    The numbers in nats per example go under the data space's name, so that no DVC table sets a pmf's
    number against a density's in one column: binary.elbo. log p(x) and its SE also carry K, the number of
    importance samples, as the ladder's arrays in per_example.npz do (binary.log_px_k1000, _se): a K = 100
    estimate is lower in expectation than a K = 5000 one of the same model (Burda et al. 2016), so the two
    are never differenced by `dvc metrics diff` nor ranked together by `dvc exp show --sort-by`. The ELBO
    does not depend on K."""
    k = metrics["num_samples"]
    return {
        "likelihood": metrics["likelihood"],
        "latent_dim": metrics["latent_dim"],
        space_name(metrics["data_space"], metrics["improper"]): {
            f"log_px_k{k}": metrics["log_px"],
            f"log_px_k{k}_se": metrics["log_px_se"],
            "elbo": metrics["elbo"],
        },
        "knn_accuracy": metrics["knn_accuracy"],  # in [0, 1], of any space
        "converged": metrics["converged"],
    }


def evaluate(
    cfg: Config, out_dir: Path, *, progress: bool = True, root: Path | None = None
) -> dict[str, Any] | None:
    """The `evaluate` stage on out_dir/{prepared,models}: writes metrics/eval{,_summary}.json, artifacts/.

    In an initialised process group (`torchrun ... vaerepro evaluate`, or after DDP training in `vaerepro
    run`) the example batches are shared out, rank r taking batches r, r + world, ...; rank 0 gathers the
    per-example estimates, computes the rest, writes the files and returns the metrics; the other ranks
    return None. Each example's noise is keyed by (eval.seed, its index), so the numbers equal a single
    process's. With eval.precision other than 32, rank 0 then also runs float32 on the first
    PRECISION_CHECK_EXAMPLES test examples and records the paired difference (eval.json `precision`).
    `root`: the project whose git commit eval.json records as `commit` (versions.git_commit; None records
    none).
    """
    device = eval_device(cfg.eval.device)  # before any work: a missing GPU is a configuration error
    check_precision(cfg.eval.precision, device, cfg.eval.device)  # and so is TF32 on the CPU
    commit = git_commit(Path(root)) if root is not None else None  # the code this process started from
    out_dir = Path(out_dir)
    splits = load_prepared(out_dir / "prepared")
    space, quantized = cfg.data_space, bool(splits.quantized)
    check_bounded(cfg.likelihood_object(), space, quantized, out_dir / "prepared")
    check_prepared_from(
        splits.meta, cfg.data.source, cfg.data.path, out_dir / "prepared", config_split_settings(cfg.data)
    )
    best = out_dir / "models" / "best.ckpt"
    ckpt = checkpoints.read(best)
    # The checkpoint is the truth for the model: evaluating it under another likelihood, latent size, data
    # space or data would report its numbers under the config's labels.
    expected = checkpoints.expected_hparams(
        cfg, splits.data_dim, quantized, checkpoints.data_digest(splits.meta)
    )
    differ = checkpoints.mismatches(ckpt["hyper_parameters"], expected, only=checkpoints.MODEL_KEYS)
    if differ:
        raise checkpoints.CheckpointError(
            f"{best}: the config does not describe the model this checkpoint holds: "
            + "; ".join(differ)
            + ". Evaluate it with the config it was trained with, or train again; nothing was changed"
        )
    vae = load_vae(best, ckpt)
    checkpoint_sha256 = file_sha256(best)  # which weights the numbers describe (train.json has the same)
    x_test = fixed_space(splits.test, space, quantized=quantized, seed=cfg.seed + TEST_SEED_OFFSET)
    e = cfg.eval
    rank, world = _process_group()
    batch_size = resolve_batch_size(vae, e.batch_size, len(x_test), e.num_samples, device)  # the same on all
    mine = range(rank, math.ceil(len(x_test) / batch_size), world)
    if world > 1:
        log.info("evaluation shared out: rank %d of %d takes %d example batches", rank, world, len(mine))
    sampling = dict(
        num_samples=e.num_samples,
        batch_size=batch_size,
        chunk_size=resolve_chunk_size(vae, e.chunk_size, batch_size, e.num_samples, device),
        seed=e.seed,
        device=device,
    )
    per_ex = per_example(
        vae, x_test, batches=mine, progress=progress and rank == 0, precision=e.precision, **sampling
    )
    if world > 1:
        per_ex = gather_shards(per_ex, mine, batch_size)
        if per_ex is None:
            return None
    metrics = eval_metrics(per_ex, data_dim=splits.data_dim, jacobian=dim_log_jacobian(space, quantized))
    metrics["precision"] = {"name": e.precision}
    if e.precision != "32":
        # the float32 reference on the first examples, same K, seed and device: the same noise, so the
        # per-example difference is the precision's alone (rank 0 only, after the gather)
        n_ref = min(PRECISION_CHECK_EXAMPLES, len(x_test))
        ref = per_example(vae, x_test[:n_ref], precision="32", **sampling)
        metrics["precision"] = precision_effect(e.precision, per_ex["log_px"][:n_ref], ref["log_px"])
        p = metrics["precision"]
        log.info(
            "eval.precision=%s: log p(x) %+.4f ± %.4f nats/example against float32 (mean ± SE of the paired "
            "difference on the first %d test examples, same noise); largest |difference| %.4f nats",
            e.precision,
            p["log_px_diff"],
            p["log_px_diff_se"],
            p["examples"],
            p["log_px_diff_max_abs"],
        )
    means = layer_means(vae, x_test, seed=e.seed)  # [(N, Z1)] or [(N, Z1), (N, Z2)]
    mu_test = means[0]
    active_by_layer = [active_units(m) for m in means]
    knn = None
    if splits.y_train is not None and splits.y_test is not None:
        x_train = fixed_space(splits.train, space, quantized=quantized, seed=cfg.seed + TEST_SEED_OFFSET)
        knn = knn_accuracy(
            posterior_means(vae, x_train),
            torch.as_tensor(splits.y_train),
            mu_test,
            torch.as_tensor(splits.y_test),
        )
    metrics.update(
        {
            # all stochastic layers' (Burda et al. report two-layer models' as z1's + z2's)
            "active_units": sum(active_by_layer),
            "active_units_by_layer": active_by_layer,
            "knn_accuracy": knn,
            "num_samples": e.num_samples,
            "num_examples": len(x_test),
            "data_dim": int(splits.data_dim),
            "likelihood": cfg.likelihood.name,
            "data_space": space,
            "improper": cfg.improper,
            "latent_dim": cfg.model.latent_dim,
            # true only for uniformly dequantized 8-bit data (bits/dim include its 8 bits), not binarised
            "quantized": is_dequantized(space, quantized),
            "source": cfg.data.source,
            "checkpoint_sha256": checkpoint_sha256,  # of models/best.ckpt, as read
            "config": cfg.to_dict(),  # what it ran under: the report prints it (report.recorded_config)
            "device": device_text(device, world),  # where its noise was drawn (devices.device_text)
            "versions": versions(),  # the software it ran with: Python, vaerepro, torch, ... (versions.py)
            "commit": commit,  # the project's, as the process started (versions.git_commit)
        }
    )
    images = sample_images(vae, x_test, tuple(splits.image_shape), e.num_images, e.seed)
    # Everything is computed before the first file is written: an evaluation that fails or is stopped
    # leaves the previous one's files together, never its images beside these numbers. The numbers last.
    # Each file is written whole (files.write_whole): a kill while one is written leaves the earlier one.
    # per-example estimates (N,), nats: for paired comparisons of models on the same test examples; the
    # ladder as log_px_k<k> (the estimate from the first k samples), for paired k-to-k differences
    per_ex_arrays = {k: per_ex[k].numpy() for k in ("log_px", "elbo", "recon", "kl", "ess")}
    per_ex_arrays.update({f"log_px_k{k}": v.numpy() for k, v in per_ex["ladder"].items()})
    write_whole(out_dir / "artifacts" / "per_example.npz", lambda fh: np.savez(fh, **per_ex_arrays))
    write_whole(out_dir / "artifacts" / "samples.npz", lambda fh: np.savez(fh, **images))
    # eval.json names the arrays written with it: a failure between these files and it (a full disk) leaves
    # new arrays beside the earlier numbers, which the report then refuses (report.check_artifacts)
    metrics["artifacts_sha256"] = {n: file_sha256(out_dir / "artifacts" / n) for n in ARTIFACTS}
    # eval_summary.json, DVC's copy of eval.json's headline numbers, is removed before eval.json is written
    # and written after it: a kill between the two leaves no summary, never the earlier one beside this
    # eval.json (until eval.json is replaced, the earlier summary is the earlier eval.json's)
    (out_dir / "metrics" / "eval_summary.json").unlink(missing_ok=True)
    write_json(out_dir / "metrics" / "eval.json", metrics)
    write_json(out_dir / "metrics" / "eval_summary.json", dvc_summary(metrics))

    return metrics
