"""Objectives and log p(x) estimates, as pure functions of a model. Everything is per example, in nats.

One formula, reused: ``log_weights`` computes log w = log p(x|z) + log p(z) - log q(z|x) for K samples
z ~ q(z|x); the ELBO (estimator A), the IWAE bound and the importance-sampled log p(x) used for evaluation
are all means or log-mean-exps over it. ``convergence`` judges whether such a log p(x) has converged in K.

``model`` is anything with ``posterior(x)`` (q(z|x), batch (B,), event (Z,)), ``prior()`` (p(z), event
(Z,)) and ``decode(z)`` (p(x|z), batch z.shape[:-1], event (D,)); see ``model.VAE``.

Randomness: every function draws from torch's global RNG (callers seed it), except ``estimate_log_px``
with ``generator_seed``, which seeds a forked RNG and leaves the global state untouched, and the bounds given
their standard-normal noise ``eps`` (K, B, Z) (the training step draws it for a whole multi-device batch).
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal, kl_divergence

ELBO_ESTIMATORS = ("A", "B")


class LogWeights:
    """Per-sample terms of the importance weights; all (K, B), nats.

    The one formula, computed for given samples z (K, B, Z) from ``posterior`` = q(z|x): log p(x|z) at
    once (every objective needs it), log q(z|x), log p(z) and log w = log p(x|z) + log p(z) - log q(z|x)
    on first use, so estimator B (which needs only log p(x|z) and the analytic KL) does not pay for two
    log-densities and their backward pass on every training step.
    """

    def __init__(self, model, x: Tensor, posterior: Distribution, z: Tensor):
        self.model, self.posterior, self.z = model, posterior, z  # posterior: q(z|x), batch (B,)
        self.log_px_z: Tensor = model.decode(z).log_prob(x)  # x (B, D) broadcasts against (K, B) -> (K, B)

    @functools.cached_property
    def log_qz(self) -> Tensor:
        return self.posterior.log_prob(self.z)  # (K, B)

    @functools.cached_property
    def log_pz(self) -> Tensor:
        return self.model.prior().log_prob(self.z)  # (K, B)

    @functools.cached_property
    def log_w(self) -> Tensor:
        return self.log_px_z + self.log_pz - self.log_qz  # (K, B)


def log_weights(model, x: Tensor, num_samples: int, eps: Tensor | None = None) -> LogWeights:
    """K = num_samples reparameterised samples z ~ q(z|x), z (K, B, Z), and their log weights (K, B).

    ``eps`` (K, B, Z): the standard-normal noise to use, z = mean + stddev * eps (exactly what ``rsample``
    computes for a diagonal Gaussian q, the VAE's encoder); drawn from torch's global RNG when None.
    """
    _check_count(num_samples, "num_samples")
    q = model.posterior(x)
    if eps is None:
        z = q.rsample((num_samples,))  # (K, B, Z), differentiable w.r.t. the encoder
    else:
        if not (isinstance(q, Independent) and isinstance(q.base_dist, Normal)):
            raise ValueError(f"given noise eps needs a diagonal Gaussian q(z|x), got {type(q).__name__}")
        expected = (num_samples, *q.batch_shape, *q.event_shape)
        if tuple(eps.shape) != expected:
            raise ValueError(f"eps has shape {tuple(eps.shape)}, expected (K, B, Z) = {expected}")
        # (K, B, Z); the base Normal's scale, not Independent's stddev, which re-derives it as sqrt(variance)
        z = q.base_dist.loc + eps * q.base_dist.scale
    return LogWeights(model, x, q, z)


def elbo(model, x: Tensor, num_samples: int = 1, estimator: str = "B", eps: Tensor | None = None) -> Tensor:
    """ELBO per example (B,), nats, from K samples.

    "A": mean_K log w (Kingma & Welling's generic estimator).
    "B": mean_K log p(x|z) - KL(q(z|x) || p(z)) with the KL in closed form; same expectation, and lower
    variance whenever q is not close to the exact posterior (the KL removes the noise of log q - log p).
    """
    if estimator == "A":
        return log_weights(model, x, num_samples, eps).log_w.mean(0)
    if estimator == "B":
        return elbo_terms(model, x, num_samples, eps)["elbo"]
    raise ValueError(f"unknown ELBO estimator {estimator!r}; allowed: {', '.join(ELBO_ESTIMATORS)}")


def elbo_terms(model, x: Tensor, num_samples: int = 1, eps: Tensor | None = None) -> dict[str, Tensor]:
    """Estimator B split into its terms, each (B,), nats: recon = mean_K log p(x|z), kl, elbo = recon - kl."""
    lw = log_weights(model, x, num_samples, eps)
    recon = lw.log_px_z.mean(0)  # (B,)
    kl = kl_divergence(lw.posterior, model.prior())  # (B,), analytic
    return {"recon": recon, "kl": kl, "elbo": recon - kl}


def iwae_bound(model, x: Tensor, num_samples: int, eps: Tensor | None = None) -> Tensor:
    """IWAE bound L_K = log mean_K w per example (B,), nats (Burda et al. 2016); L_1 is the ELBO."""
    log_w = log_weights(model, x, num_samples, eps).log_w  # (K, B)
    return torch.logsumexp(log_w, dim=0) - math.log(num_samples)


class StreamingLogMeanExp:
    """log mean exp over samples (dim 0) fed in chunks, without keeping them; also the ESS.

    Keeps logsumexp(log w) and logsumexp(2 log w) per example, merged chunk by chunk with logaddexp, so
    the result equals ``logsumexp(all, 0) - log K`` up to rounding whatever the chunking.
    """

    def __init__(self) -> None:
        self.count: int = 0
        self._lse: Tensor | None = None  # (B,) logsumexp of log w so far
        self._lse2: Tensor | None = None  # (B,) logsumexp of 2 log w so far

    def update(self, log_w_chunk: Tensor) -> None:
        """Add a chunk of log weights (k_c, B)."""
        if log_w_chunk.dim() < 1 or log_w_chunk.shape[0] == 0:
            raise ValueError(
                f"expected a non-empty chunk of log weights (k_c, B), got shape {tuple(log_w_chunk.shape)}"
            )
        lse = torch.logsumexp(log_w_chunk, dim=0)  # (B,)
        lse2 = torch.logsumexp(2 * log_w_chunk, dim=0)  # (B,)
        if self._lse is None:
            self._lse, self._lse2 = lse, lse2
        else:
            self._lse = torch.logaddexp(self._lse, lse)
            self._lse2 = torch.logaddexp(self._lse2, lse2)
        self.count += log_w_chunk.shape[0]

    def _require(self) -> None:
        if self._lse is None:
            raise RuntimeError("StreamingLogMeanExp: no samples seen yet")

    def value(self) -> Tensor:
        """(B,) log mean exp of all log weights seen."""
        self._require()
        return self._lse - math.log(self.count)

    def ess(self) -> Tensor:
        """(B,) effective sample size (sum w)^2 / sum w^2, between 1 and count."""
        self._require()
        return torch.exp(2 * self._lse - self._lse2)


@dataclass
class MarginalEstimate:
    log_px: Tensor  # (B,) importance-sampled log p(x), K samples, q(z|x) as proposal; nats
    ess: Tensor  # (B,) effective sample size of the K importance weights
    ladder: dict[int, Tensor]  # k -> (B,) estimate from the first k samples (ladder_points(K)); [K] == log_px


def ladder_points(num_samples: int) -> list[int]:
    """[1, 10, 100, ...] (powers of ten below K), then K."""
    _check_count(num_samples, "num_samples")
    points = []
    k = 1
    while k < num_samples:
        points.append(k)
        k *= 10
    return [*points, num_samples]


def estimate_log_px(
    model,
    x: Tensor,
    num_samples: int,
    chunk_size: int,
    ladder: bool = True,
    generator_seed: int | None = None,
) -> MarginalEstimate:
    """Importance-sampled log p(x) = log mean_K w (B,), nats, with q(z|x) as proposal (the IWAE bound L_K).

    Samples are decoded in chunks of at most ``chunk_size``, so memory is O(chunk_size * B * D) for any K;
    chunks are cut so that each ladder point k is reached exactly. Runs under ``torch.no_grad()``; the
    encoder runs once.

    Samples are drawn one importance sample at a time (a (B, Z) draw each), so the random stream and
    hence the estimate do not depend on ``chunk_size``, and the first k samples of a K-sample run are
    those of a k-sample run with the same seed (so ``ladder[k]`` equals that run's ``log_px``).

    ``generator_seed``: if given, sampling runs inside ``torch.random.fork_rng`` seeded with it (CPU and
    x's CUDA device), so the global RNG state is unchanged afterwards; if None, draws from the global RNG.
    """
    _check_count(num_samples, "num_samples")
    _check_count(chunk_size, "chunk_size")
    if generator_seed is None:
        return _estimate_log_px(model, x, num_samples, chunk_size, ladder)
    # fork (save and restore) the CPU RNG and, for CUDA inputs, the RNG of x's device
    devices = []
    if x.is_cuda:
        devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(generator_seed)
        return _estimate_log_px(model, x, num_samples, chunk_size, ladder)


@torch.no_grad()
def _estimate_log_px(model, x: Tensor, num_samples: int, chunk_size: int, ladder: bool) -> MarginalEstimate:
    q = model.posterior(x)  # batch (B,)
    acc = StreamingLogMeanExp()
    estimates: dict[int, Tensor] = {}
    for target in ladder_points(num_samples) if ladder else [num_samples]:
        while acc.count < target:
            n = min(chunk_size, target - acc.count)
            z = torch.stack([q.sample() for _ in range(n)])  # (n, B, Z); one draw per sample, see docstring
            acc.update(LogWeights(model, x, q, z).log_w)  # (n, B)
        estimates[target] = acc.value()
    return MarginalEstimate(log_px=estimates[num_samples], ess=acc.ess(), ladder=estimates)


# The convergence verdict of an importance-sampled log p(x) (``convergence``).
LADDER_GAIN_SIGMAS = 2.0  # the last ladder step counts as a rise only beyond this many paired SEs
# ... and beyond this many nats/example: smaller than the differences between models that IWAE-style tables
# compare (tenths of a nat and up), so a rise below it does not change a comparison
LADDER_GAIN_TOL_NATS = 0.1
# Delta method: the log of a mean of K weights is biased low by about Var(w) / (2 K E[w]^2) ~= 1 / (2 ESS)
# nats (ESS = (sum w)^2 / sum w^2 ~= K E[w]^2 / E[w^2]); averaged over examples that is 1 / (2 harmonic-mean
# ESS). The floor keeps this bias within the ladder's tolerance: 1 / (2 * 0.1) = 5 samples. The sample ESS
# overstates the effective count when the weights are heavy-tailed; the ladder test covers that case.
ESS_FLOOR = 1.0 / (2.0 * LADDER_GAIN_TOL_NATS)  # samples; floor on the harmonic mean over examples of ESS


def ladder_steps(ladder: dict[int, Tensor]) -> list[dict]:
    """The paired gain between consecutive ladder points, one dict per step (k_from, k): nats/example.

    ``ladder``: k -> (B,) estimates from the first k samples of the same run (``MarginalEstimate.ladder``), so
    d = log p_k(x) - log p_k_from(x) is a paired per-example difference; ``gain`` is its mean and ``gain_se``
    its standard error across examples, which excludes the example-to-example spread of log p(x) that the
    SE of each point carries.
    """
    ks = sorted(ladder)
    steps = []
    for k0, k1 in itertools.pairwise(ks):
        gain, gain_se = mean_se(ladder[k1] - ladder[k0])  # (B,) -> mean, SE
        steps.append({"k_from": k0, "k": k1, "gain": gain, "gain_se": gain_se})
    return steps


@dataclass
class Convergence:
    """The verdict of ``convergence`` and the numbers behind it."""

    converged: bool
    reasons: list[str]  # why not converged, one short phrase each; empty when converged
    ladder_gain: float | None  # mean log p_K(x) - log p_k(x) over the last ladder step; nats/example
    ladder_gain_se: float | None  # its paired SE across examples; nats/example
    ladder_from_k: int | None  # k, the ladder point before K
    ess_hmean: float  # harmonic mean over examples of the per-example ESS; samples


def convergence(ladder: dict[int, Tensor], ess: Tensor) -> Convergence:
    """The verdict on an importance-sampled log p(x) from its ladder {k: (B,)} and per-example ESS (B,).

    Not converged when (a) the last ladder step (previous point k to K) still rises: its mean paired gain
    exceeds LADDER_GAIN_SIGMAS paired SEs and LADDER_GAIN_TOL_NATS (with one example, no SE: the tolerance
    alone); or (b) the harmonic mean of the ESS is below ESS_FLOOR.
    """
    reasons = []
    steps = ladder_steps(ladder)
    last = steps[-1] if steps else None
    if last is not None:
        gain, se = last["gain"], last["gain_se"]
        beyond_noise = math.isnan(se) or gain > LADDER_GAIN_SIGMAS * se
        if beyond_noise and gain > LADDER_GAIN_TOL_NATS:
            reasons.append(
                f"ladder still rising: {gain:+.2f} ± {se:.2f} nats/example from K={last['k_from']} "
                f"to K={last['k']} (paired SE)"
            )
    ess_hmean = 1.0 / torch.as_tensor(ess, dtype=torch.float64).reciprocal().mean().item()
    if ess_hmean < ESS_FLOOR:
        reasons.append(f"ESS too low: harmonic mean {ess_hmean:.1f} < {ESS_FLOOR:g} samples per example")
    return Convergence(
        converged=not reasons,
        reasons=reasons,
        ladder_gain=None if last is None else last["gain"],
        ladder_gain_se=None if last is None else last["gain_se"],
        ladder_from_k=None if last is None else last["k_from"],
        ess_hmean=ess_hmean,
    )


def mean_se(values: Tensor) -> tuple[float, float]:
    """Mean and standard error (std with ddof=1 / sqrt(n)) across examples; SE is NaN for n = 1."""
    v = torch.as_tensor(values).detach().reshape(-1).to(torch.float64)
    if v.numel() == 0:
        raise ValueError("mean_se: no values")
    mean = v.mean().item()
    se = (v.std(unbiased=True) / math.sqrt(v.numel())).item() if v.numel() > 1 else float("nan")
    return mean, se


def _check_count(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
