"""Objectives and log p(x) estimates, as pure functions of a model. Everything is per example, in nats.

One formula, reused: ``log_weights`` computes log w = log p(x|z) + log p(z) - log q(z|x) for K samples
z ~ q(z|x); the ELBO (estimator A), the IWAE bound and the importance-sampled log p(x) used for evaluation
are all means or log-mean-exps over it. ``convergence`` judges whether such a log p(x) has converged in K.

``model`` is anything with ``posterior(x)`` (q(z|x), batch (B,), event (Z,)), ``prior()`` (p(z), event
(Z,)) and ``decode(z)`` (p(x|z), batch z.shape[:-1], event (D,)); see ``model.VAE``. z may stand for several
stochastic layers at once: ``model.TwoLayerVAE``'s z = [z1 | z2], its q(z|x) = q(z1|x) q(z2|z1) and p(z) =
p(z1|z2) p(z2), so log w above is log p(x|z1) + log p(z1|z2) + log p(z2) - log q(z1|x) - log q(z2|z1) with
no second formula. Such a q samples z from noise through its own ``reparameterize(eps)`` (see
``reparameterize``); it has no closed-form KL to p(z), so estimator B refuses it.

Randomness: the bounds draw from torch's global RNG (callers seed it) unless given their standard-normal
noise ``eps`` (K, B, Z) (the training step draws it for a whole multi-device batch). ``estimate_log_px``
takes its noise from ``BlockNoise``: generators of its own, keyed by (seed, example block), never the global
RNG, so that each example's estimate depends only on the seed, the example's index in the data set and the
model, not on how samples are chunked or examples batched or shared out between processes.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal, kl_divergence

ELBO_ESTIMATORS = ("A", "B")


class LogWeights:
    """Per-sample terms of the importance weights; all (K, B), nats.

    The one formula, computed for given samples z (K, B, Z) from ``posterior`` = q(z|x): log p(x|z) at
    once (every objective needs it), log q(z|x), log p(z) and log w = log p(x|z) + log p(z) - log q(z|x)
    on first use, so estimator B (which needs only log p(x|z) and the analytic KL) does not pay for two
    log-densities and their backward pass on every training step.

    Computed on first use by plain properties, not functools.cached_property: before Python 3.12 that takes
    a lock, which torch.compile cannot trace, and the objective would fall out of its graph (trainer.compile).
    """

    def __init__(self, model, x: Tensor, posterior: Distribution, z: Tensor):
        self.model, self.posterior, self.z = model, posterior, z  # posterior: q(z|x), batch (B,)
        self.log_px_z: Tensor = model.decode(z).log_prob(x)  # x (B, D) broadcasts against (K, B) -> (K, B)
        self._log_qz: Tensor | None = None
        self._log_pz: Tensor | None = None

    @property
    def log_qz(self) -> Tensor:
        if self._log_qz is None:
            self._log_qz = self.posterior.log_prob(self.z)  # (K, B)
        return self._log_qz

    @property
    def log_pz(self) -> Tensor:
        if self._log_pz is None:
            self._log_pz = self.model.prior().log_prob(self.z)  # (K, B)
        return self._log_pz

    @property
    def log_w(self) -> Tensor:
        return self.log_px_z + self.log_pz - self.log_qz  # (K, B)


def log_weights(
    model, x: Tensor, num_samples: int, eps: Tensor | None = None, posterior: Distribution | None = None
) -> LogWeights:
    """K = num_samples reparameterised samples z ~ q(z|x), z (K, B, Z), and their log weights (K, B).

    ``eps`` (K, B, Z): the standard-normal noise to use, z = mean + L eps with L the scale (diagonal) or
    Cholesky factor (full covariance) of a Gaussian q, exactly what ``rsample`` computes; drawn from torch's
    global RNG when None. ``posterior``: q(z|x) already computed for this x (a chunked caller runs the
    encoder once, not once per chunk); computed here when None.
    """
    _check_count(num_samples, "num_samples")
    q = posterior if posterior is not None else model.posterior(x)
    if eps is None:
        z = q.rsample((num_samples,))  # (K, B, Z), differentiable w.r.t. the encoder
    else:
        expected = (num_samples, *q.batch_shape, *q.event_shape)
        if tuple(eps.shape) != expected:
            raise ValueError(f"eps has shape {tuple(eps.shape)}, expected (K, B, Z) = {expected}")
        z = reparameterize(q, eps)
    return LogWeights(model, x, q, z)


def reparameterize(q: Distribution, eps: Tensor) -> Tensor:
    """z (K, B, Z) = mean + L eps for a Gaussian q(z|x) (batch (B,), event (Z,)) and noise eps (K, B, Z).

    A diagonal Gaussian (``Independent(Normal)``, the VAE's encoder): the base Normal's scale, not
    Independent's stddev, which re-derives it as sqrt(variance). A full-covariance ``MultivariateNormal``:
    its Cholesky factor, as its ``rsample`` does. A q that defines ``reparameterize(eps)`` (the hook; e.g.
    ``model.HierarchicalPosterior``, sampled layer by layer): that method's z.
    """
    hook = getattr(q, "reparameterize", None)
    if hook is not None:
        return hook(eps)
    if isinstance(q, Independent) and isinstance(q.base_dist, Normal):
        return q.base_dist.loc + eps * q.base_dist.scale
    if isinstance(q, MultivariateNormal):
        return q.loc + (q.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)  # (B, Z, Z) @ (K, B, Z, 1)
    raise ValueError(f"given noise eps needs a Gaussian q(z|x), got {type(q).__name__}")


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


def elbo_terms(
    model, x: Tensor, num_samples: int = 1, eps: Tensor | None = None, estimator: str = "B"
) -> dict[str, Tensor]:
    """An ELBO split into its terms, each (B,), nats: recon = mean_K log p(x|z), kl, elbo = recon - kl.

    "B": the KL in closed form (a ValueError naming estimator B where there is none, as for two stochastic
    layers). "A": the KL by Monte Carlo on the same samples, mean_K (log q(z|x) - log p(z)), so that elbo is
    estimator A's mean_K log w (up to rounding).
    """
    if estimator not in ELBO_ESTIMATORS:
        raise ValueError(f"unknown ELBO estimator {estimator!r}; allowed: {', '.join(ELBO_ESTIMATORS)}")
    lw = log_weights(model, x, num_samples, eps)
    recon = lw.log_px_z.mean(0)  # (B,)
    if estimator == "B":
        kl = _analytic_kl(lw.posterior, model.prior())  # (B,)
    else:
        kl = (lw.log_qz - lw.log_pz).mean(0)  # (B,)
    return {"recon": recon, "kl": kl, "elbo": recon - kl}


def _analytic_kl(q: Distribution, p: Distribution) -> Tensor:
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        raise ValueError(
            f"ELBO estimator B needs KL(q(z|x) || p(z)) in closed form, and there is none for "
            f"q = {type(q).__name__}, p = {type(p).__name__} (e.g. two stochastic layers); use estimator A"
        ) from None


def iwae_bound(model, x: Tensor, num_samples: int, eps: Tensor | None = None) -> Tensor:
    """IWAE bound L_K = log mean_K w per example (B,), nats (Burda et al. 2016); L_1 is the ELBO."""
    log_w = log_weights(model, x, num_samples, eps).log_w  # (K, B)
    return torch.logsumexp(log_w, dim=0) - math.log(num_samples)


class StreamingLogMeanExp:
    """log mean exp over samples (dim 0) fed in chunks, without keeping them; also the ESS.

    Keeps logsumexp(log w) and logsumexp(2 log w) per example, merged chunk by chunk with logaddexp, so
    the result equals ``logsumexp(all, 0) - log K`` up to rounding whatever the chunking. The sums run in
    float64 (results are float64): in float32 the merge order's rounding (~1e-7 of |log w|) would make the
    estimate, and more so the ESS (exp(2 lse - lse2): ~1e-5 relative), depend on the chunk size.
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
        log_w_chunk = log_w_chunk.double()  # (k_c, B), small beside the decoder's (k_c, B, D)
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
    # all float64 (StreamingLogMeanExp sums in float64)
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


# Importance-sampling noise (``BlockNoise``): standard normals drawn as whole blocks of SAMPLE_BLOCK samples
# x EXAMPLE_BLOCK examples, one torch.randn call each, from one generator per block of examples. Both sizes
# are fixed constants: changing either changes every estimate's draws.
SAMPLE_BLOCK = 128  # importance samples per draw; a chunk of any size is cut from these blocks
EXAMPLE_BLOCK = 64  # examples per generator: a test batch draws for the example blocks it overlaps
IS_STREAM, ELBO_STREAM = 0, 1  # noise streams: importance samples; the one-sample ELBO of the evaluation


def noise_seed(seed: int, stream: int, example_block: int) -> int:
    """The seed (64 bits) of one example block's generator: blake2b of (seed, stream, example block).

    A fixed mixing function of the key alone, so the same on every process, device and run. The CPU
    generator (mt19937) uses the low 32 bits only; with one key per example block and stream (314 for
    10,000 test examples' two streams) two blocks share their noise with probability ~1e-5.
    """
    key = f"vaerepro.BlockNoise:{int(seed)}:{int(stream)}:{int(example_block)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


class BlockNoise:
    """Standard-normal noise eps for examples [start, start + B) of a data set, handed out sample by sample.

    Example block e (examples e * EXAMPLE_BLOCK ...) has a generator seeded with ``noise_seed(seed, stream,
    e)`` on ``device``; its j-th draw, torch.randn((SAMPLE_BLOCK, EXAMPLE_BLOCK, Z)), holds samples
    j * SAMPLE_BLOCK ... of each of its examples. So sample k of example i is entry (k mod SAMPLE_BLOCK,
    i mod EXAMPLE_BLOCK) of draw k // SAMPLE_BLOCK of block i // EXAMPLE_BLOCK: a function of (seed, stream,
    i, k), the device type and the dtype only, whatever the chunks, the batch (which examples sit beside i)
    or the process. A K-sample run's first k samples are a k-sample run's.

    ``take(n)`` returns the next n samples (n, B, Z). Memory: the current draw, SAMPLE_BLOCK x (B + up to
    2 EXAMPLE_BLOCK) x Z numbers, whatever the number of samples taken.
    """

    def __init__(
        self,
        seed: int,
        stream: int,
        start: int,
        batch: int,
        latent_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
            raise ValueError(f"example offset must be an integer >= 0, got {start!r}")
        _check_count(batch, "batch")
        first, last = start // EXAMPLE_BLOCK, (start + batch - 1) // EXAMPLE_BLOCK  # example blocks
        self._generators = [
            torch.Generator(device=device).manual_seed(noise_seed(seed, stream, e))
            for e in range(first, last + 1)
        ]
        offset = start - first * EXAMPLE_BLOCK  # of example `start` in the draw's example columns
        self._cols = slice(offset, offset + batch)
        self._shape = (SAMPLE_BLOCK, EXAMPLE_BLOCK, latent_dim)
        self._device, self._dtype = device, dtype
        self._block: Tensor | None = None  # (SAMPLE_BLOCK, B, Z), the current draw's columns of this batch
        self._used = SAMPLE_BLOCK  # samples of the current draw already handed out

    def _draw(self) -> None:
        draws = [  # each (SAMPLE_BLOCK, EXAMPLE_BLOCK, Z)
            torch.randn(self._shape, generator=g, device=self._device, dtype=self._dtype)
            for g in self._generators
        ]
        block = draws[0] if len(draws) == 1 else torch.cat(draws, dim=1)  # (SAMPLE_BLOCK, blocks * EB, Z)
        self._block, self._used = block[:, self._cols], 0

    def take(self, n: int) -> Tensor:
        """The next n samples' noise (n, B, Z)."""
        _check_count(n, "n")
        parts = []
        while n > 0:
            if self._used == SAMPLE_BLOCK:
                self._draw()
            m = min(n, SAMPLE_BLOCK - self._used)
            parts.append(self._block[self._used : self._used + m])  # (m, B, Z)
            self._used, n = self._used + m, n - m
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def estimate_log_px(
    model,
    x: Tensor,
    num_samples: int,
    chunk_size: int,
    ladder: bool = True,
    generator_seed: int | None = None,
    example_offset: int = 0,
) -> MarginalEstimate:
    """Importance-sampled log p(x) = log mean_K w (B,), nats, with q(z|x) as proposal (the IWAE bound L_K).

    Samples are decoded in chunks of at most ``chunk_size``, so memory is O(chunk_size * B * D) for any K;
    chunks are cut so that each ladder point k is reached exactly. Runs under ``torch.no_grad()``; the
    encoder runs once. q(z|x) must be Gaussian (diagonal, as the VAE's, or full covariance) or define
    ``reparameterize(eps)`` (see ``reparameterize``).

    The noise comes from ``BlockNoise(generator_seed, IS_STREAM, example_offset, ...)``: example i of x
    (``example_offset + i`` in the data set) gets the same K draws whatever ``chunk_size`` and whichever
    other examples x holds, and the first k samples of a K-sample run are those of a k-sample run with the
    same seed (so ``ladder[k]`` equals that run's ``log_px``). Draws differ between CPU and CUDA and between
    float32 and float64 (other generators), each equally valid.

    ``generator_seed``: the noise's seed; if None, one draw from torch's global CPU RNG picks it (so
    ``torch.manual_seed`` makes it reproducible). The global RNG is otherwise untouched.
    ``example_offset``: the index of x[0] in the data set (a test batch's first example).
    """
    _check_count(num_samples, "num_samples")
    _check_count(chunk_size, "chunk_size")
    if generator_seed is None:
        generator_seed = int(torch.randint(0, 2**62, ()).item())
    return _estimate_log_px(model, x, num_samples, chunk_size, ladder, generator_seed, example_offset)


@torch.no_grad()
def _estimate_log_px(
    model, x: Tensor, num_samples: int, chunk_size: int, ladder: bool, seed: int, example_offset: int
) -> MarginalEstimate:
    q = model.posterior(x)  # batch (B,), event (Z,)
    (batch,), (latent,) = q.batch_shape, q.event_shape
    dtype = getattr(q, "dtype", None) or q.mean.dtype  # a layered q has no closed-form mean: its own dtype
    noise = BlockNoise(seed, IS_STREAM, example_offset, batch, latent, x.device, dtype)
    acc = StreamingLogMeanExp()
    estimates: dict[int, Tensor] = {}
    for target in ladder_points(num_samples) if ladder else [num_samples]:
        while acc.count < target:
            n = min(chunk_size, target - acc.count)
            acc.update(log_weights(model, x, n, eps=noise.take(n), posterior=q).log_w)  # (n, B)
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
    alone); or (b) the harmonic mean of the ESS is below ESS_FLOOR; or (c) some example's log p_K(x) or
    ESS is NaN or infinite: then the mean, the paired gain and the harmonic mean are NaN or infinite too,
    and a NaN fails every comparison in (a) and (b), so without (c) it would pass as converged.
    """
    reasons = []
    final = torch.as_tensor(ladder[max(ladder)], dtype=torch.float64)  # (B,) log p_K(x)
    finite = torch.isfinite(final) & torch.isfinite(torch.as_tensor(ess, dtype=torch.float64))  # (B,)
    if not finite.all():
        reasons.append(
            f"non-finite estimate: log p(x) or ESS is NaN or infinite for {int((~finite).sum())} of "
            f"{finite.numel()} examples"
        )
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
