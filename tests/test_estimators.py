"""Estimators against known answers: a linear-Gaussian VAE (probabilistic PCA) has an exact log p(x),
an exact posterior and a closed-form ELBO.

Model: z ~ N(0, I_Z), x | z ~ N(W z + b, sigma^2 I_D), so
    p(x)       = N(x; b, W W^T + sigma^2 I)
    p(z | x)   = N(M^-1 W^T (x - b), sigma^2 M^-1),   M = W^T W + sigma^2 I.
Everything is float64; D = 5, Z = 2, a few hundred examples, so each test takes well under a second or two.

The same checks for two stochastic layers are in tests/test_hierarchy.py (``TwoLayerLinearGaussian``):
z2 ~ N(0, I), z1 | z2 ~ N(A z2 + a, S1), x | z1 ~ N(Bm z1 + b, sigma^2 I), with q(z|x) = q(z1|x) q(z2|z1)
the model's ``HierarchicalPosterior`` and p(z) its ``HierarchicalPrior``, through the same estimators.
"""

import hashlib
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from conftest import DEVICES
from vaerepro.estimators import (
    ELBO_STREAM,
    ESS_FLOOR,
    EXAMPLE_BLOCK,
    IS_STREAM,
    LADDER_GAIN_TOL_NATS,
    SAMPLE_BLOCK,
    BlockNoise,
    StreamingLogMeanExp,
    convergence,
    elbo,
    elbo_terms,
    estimate_log_px,
    iwae_bound,
    ladder_points,
    ladder_steps,
    log_weights,
    mean_se,
    noise_seed,
)

D, Z, N = 5, 2, 200
F64 = torch.float64


class LinearGaussian:
    """PPCA with a chosen proposal q(z|x): the exact posterior, or a shifted/scaled version of it.

    ``diagonal=False``: q = N(posterior mean + shift * s, scale^2 * posterior covariance), a full-covariance
    MultivariateNormal (scale = 1, shift = 0 is the exact posterior).
    ``diagonal=True``: q = N(posterior mean + shift * s, diag(scale * s)^2), an Independent Normal like a VAE
    encoder (so estimator B's analytic KL applies), with s = 1 / sqrt(diag(posterior precision)), the
    mean-field scale that minimises KL(q || posterior) and that a trained encoder approaches.
    Shift and scale are in posterior units, so the tests do not depend on the scale of W.
    """

    def __init__(self, W, b, sigma, shift=0.0, scale=1.0, diagonal=False):
        self.W, self.b, self.sigma = W, b, sigma  # (D, Z), (D,), float
        self.shift, self.scale, self.diagonal = shift, scale, diagonal
        M = W.T @ W + sigma**2 * torch.eye(Z, dtype=F64, device=W.device)  # (Z, Z)
        self.M_inv = torch.linalg.inv(M)
        self.post_cov = sigma**2 * self.M_inv  # (Z, Z)
        self.mf_std = (M / sigma**2).diagonal().rsqrt()  # (Z,) mean-field scale

    def exact_posterior_mean(self, x):
        return (x - self.b) @ self.W @ self.M_inv.T  # (B, Z)

    def posterior(self, x):
        mean = self.exact_posterior_mean(x) + self.shift * self.mf_std  # (B, Z)
        if self.diagonal:
            return Independent(Normal(mean, (self.scale * self.mf_std).expand_as(mean)), 1)
        return MultivariateNormal(mean, covariance_matrix=self.post_cov * self.scale**2)

    def prior(self):
        zeros = torch.zeros(Z, dtype=F64, device=self.W.device)
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)

    def decode(self, z):
        return Independent(Normal(z @ self.W.T + self.b, self.sigma), 1)  # batch z.shape[:-1], event (D,)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny; on a shared 2-core machine torch's intra-op thread pool makes the many small
    ops here ~10x slower (threads wait on each other), so run this module single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ppca():
    g = torch.Generator().manual_seed(1234)
    W = torch.randn(D, Z, generator=g, dtype=F64)
    b = 0.5 * torch.randn(D, generator=g, dtype=F64)
    sigma = 0.5
    z = torch.randn(N, Z, generator=g, dtype=F64)
    x = z @ W.T + b + sigma * torch.randn(N, D, generator=g, dtype=F64)  # (N, D) drawn from the model
    cov = (W @ W.T + sigma**2 * torch.eye(D, dtype=F64)).numpy()
    exact = torch.from_numpy(scipy.stats.multivariate_normal(b.numpy(), cov).logpdf(x.numpy()))  # (N,)
    return {"W": W, "b": b, "sigma": sigma, "x": x, "log_px": exact}


def model(ppca, **kwargs):
    return LinearGaussian(ppca["W"], ppca["b"], ppca["sigma"], **kwargs)


def closed_form_elbo(m: LinearGaussian, x):
    """E_q[log p(x|z)] - KL(q || p) for a diagonal Gaussian q, in closed form (B,)."""
    q = m.posterior(x).base_dist
    mu, var = q.loc, q.scale**2  # (B, Z)
    resid = x - mu @ m.W.T - m.b  # (B, D)
    trace = (var * (m.W**2).sum(0)).sum(-1)  # tr(W diag(var) W^T), (B,)
    recon = -0.5 * D * math.log(2 * math.pi * m.sigma**2) - ((resid**2).sum(-1) + trace) / (2 * m.sigma**2)
    kl = 0.5 * (mu**2 + var - 1 - var.log()).sum(-1)
    return recon, kl


# --- the estimate of log p(x) ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 10, 1000])
@pytest.mark.parametrize("device", DEVICES)
def test_exact_posterior_gives_exact_log_px_for_every_k(ppca, k, device):
    """With q = p(z|x) every weight equals p(x): the estimate is exact for any K, ESS = K."""
    m = LinearGaussian(ppca["W"].to(device), ppca["b"].to(device), ppca["sigma"])
    est = estimate_log_px(m, ppca["x"].to(device), k, chunk_size=64, generator_seed=0)
    exact = ppca["log_px"].to(device)
    torch.testing.assert_close(est.log_px, exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        est.ess, torch.full((N,), float(k), dtype=F64, device=device), rtol=1e-9, atol=0
    )
    for v in est.ladder.values():
        torch.testing.assert_close(v, exact, rtol=0, atol=1e-10)


def assert_converges(est, exact: torch.Tensor) -> None:
    """A K = 1000 estimate with an imperfect q against the exact log p(x) (N,): each decade of samples
    shrinks the mean error by more than half (bias ~ 1/K, spread ~ 1/sqrt(K)); at K = 1000 the remaining
    (downward) bias is within 3 SE across examples; the ESS is between 1 and K for every example."""
    err = {k: (v - exact).cpu() for k, v in est.ladder.items()}  # (N,) each
    mean_abs = [err[k].abs().mean().item() for k in (1, 10, 100, 1000)]
    for coarse, fine in zip(mean_abs[:-1], mean_abs[1:], strict=True):
        assert fine < coarse / 2, mean_abs
    mean, se = mean_se(err[1000])
    assert abs(mean) < 3 * se, (mean, se)
    assert ((est.ess > 1) & (est.ess < 1000)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_perturbed_posterior_converges_to_exact_log_px(ppca, device):
    # a full-covariance q that is off in mean and width
    m = LinearGaussian(ppca["W"].to(device), ppca["b"].to(device), ppca["sigma"], shift=0.5, scale=1.3)
    est = estimate_log_px(m, ppca["x"].to(device), 1000, chunk_size=128, generator_seed=0)
    assert_converges(est, ppca["log_px"].to(device))
    assert est.log_px.device.type == torch.device(device).type


def test_bounds_are_ordered_in_expectation(ppca):
    """E[ELBO] = E[L_1] <= E[L_10] <= E[L_100] <= log p(x) (Burda et al. 2016, Theorem 1)."""
    m = model(ppca, shift=1.5, scale=0.7, diagonal=True)
    x, seeds = ppca["x"], range(20)
    runs = {"elbo": [], 1: [], 10: [], 100: []}
    for s in seeds:
        torch.manual_seed(s)
        runs["elbo"].append(elbo(m, x, 1, "B"))
        for k in (1, 10, 100):
            runs[k].append(iwae_bound(m, x, k))
    v = {key: torch.stack(r).reshape(-1) for key, r in runs.items()}  # (seeds * N,)
    exact = ppca["log_px"].repeat(len(seeds))

    def gap(hi, lo):  # mean and SE of a paired difference
        return mean_se(hi - lo)

    mean, se = gap(v[1], v["elbo"])
    assert abs(mean) < 4 * se  # L_1 is the ELBO (estimator A with one sample)
    for lo, hi in [(v["elbo"], v[10]), (v[1], v[10]), (v[10], v[100]), (v[100], exact)]:
        mean, se = gap(hi, lo)
        assert mean > 4 * se, (mean, se)  # strictly ordered, well beyond Monte Carlo error


def test_iwae_bound_is_above_the_sample_mean_of_the_same_weights(ppca):
    """Jensen, sample by sample: log mean_K w >= mean_K log w for the same K weights."""
    m = model(ppca, shift=1.5, scale=0.7)
    torch.manual_seed(0)
    lw = log_weights(m, ppca["x"], 50).log_w  # (K, N)
    assert lw.shape == (50, N)
    assert (torch.logsumexp(lw, 0) - math.log(50) >= lw.mean(0)).all()


# --- ELBO estimators A and B ------------------------------------------------------------------------------


def test_elbo_estimators_a_and_b_agree_in_mean_and_b_has_less_variance(ppca):
    """Both are unbiased for the closed-form ELBO; B replaces log p(z) - log q(z) by -KL in closed form.

    B has the smaller variance when q is not close to the exact posterior (with the exact posterior A has
    zero variance); a narrow, shifted q, the usual regime of a trained VAE, is used here.
    """
    m = model(ppca, shift=0.3, scale=0.5, diagonal=True)
    x = ppca["x"]
    a, b = [], []
    for s in range(100):
        torch.manual_seed(s)
        a.append(elbo(m, x, 1, "A"))
        torch.manual_seed(s)  # same z for both: a paired comparison
        b.append(elbo(m, x, 1, "B"))
    a, b = torch.stack(a), torch.stack(b)  # (seeds, N)
    recon, kl = closed_form_elbo(m, x)
    exact_elbo = recon - kl  # (N,)
    for est in (a, b):
        mean, se = mean_se(est - exact_elbo)
        assert abs(mean) < 4 * se, (mean, se)
    mean, se = mean_se(a - b)
    assert abs(mean) < 4 * se
    var_a, var_b = a.var(0), b.var(0)  # per example, over seeds
    assert var_b.mean() < 0.5 * var_a.mean(), (var_b.mean(), var_a.mean())
    assert (var_b < var_a).double().mean() > 0.9


def test_elbo_terms_kl_is_analytic_and_matches_monte_carlo(ppca):
    m = model(ppca, shift=0.3, scale=0.5, diagonal=True)
    x = ppca["x"]
    recon_ref, kl_ref = closed_form_elbo(m, x)
    torch.manual_seed(0)
    terms = elbo_terms(m, x, num_samples=2000)
    torch.testing.assert_close(terms["kl"], kl_ref, rtol=1e-12, atol=1e-12)  # closed form, no noise
    torch.testing.assert_close(terms["elbo"], terms["recon"] - terms["kl"])
    # recon is a 2000-sample mean: within Monte Carlo error of its closed form
    mean, se = mean_se(terms["recon"] - recon_ref)
    assert abs(mean) < 4 * se
    # Monte Carlo KL: mean of log q(z) - log p(z) over samples
    torch.manual_seed(1)
    lw = log_weights(m, x, 2000)
    kl_mc = lw.log_qz - lw.log_pz  # (K, N)
    z_score = (kl_mc.mean(0) - kl_ref) / (kl_mc.std(0) / math.sqrt(2000))  # (N,)
    assert (z_score.abs() < 4.5).all()
    assert abs(z_score.mean().item()) < 4 / math.sqrt(N)


def test_elbo_rejects_unknown_estimator_and_bad_counts(ppca):
    m = model(ppca, diagonal=True)
    with pytest.raises(ValueError, match="A, B"):
        elbo(m, ppca["x"], 1, "C")
    with pytest.raises(ValueError, match="num_samples"):
        iwae_bound(m, ppca["x"], 0)
    with pytest.raises(ValueError, match="chunk_size"):
        estimate_log_px(m, ppca["x"], 10, chunk_size=0)


# --- streaming log-mean-exp, chunking, ESS, ladder ---------------------------------------------------


def test_streaming_log_mean_exp_equals_logsumexp_for_any_chunking():
    g = torch.Generator().manual_seed(0)
    k, b = 300, 4
    # far from 0 and widely spread: a naive exp() would underflow to 0
    log_w = -1000 + 30 * torch.randn(k, b, generator=g, dtype=F64)  # (K, B)
    ref = torch.logsumexp(log_w, 0) - math.log(k)
    w = np.exp(log_w.numpy() - log_w.numpy().max(0))
    ess_ref = w.sum(0) ** 2 / (w**2).sum(0)
    for sizes in ([1] * k, [7] * 42 + [6], [64] * 4 + [44], [k], [5, 100, 1, 194]):
        acc = StreamingLogMeanExp()
        start = 0
        for n in sizes:
            acc.update(log_w[start : start + n])
            start += n
        assert acc.count == k
        torch.testing.assert_close(acc.value(), ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(acc.ess().numpy(), ess_ref, rtol=1e-10)


def test_ess_is_k_for_equal_weights_and_one_for_a_dominant_weight():
    acc = StreamingLogMeanExp()
    acc.update(torch.full((50, 3), -7.0, dtype=F64))
    torch.testing.assert_close(acc.ess(), torch.full((3,), 50.0, dtype=F64))
    acc = StreamingLogMeanExp()
    log_w = torch.full((50, 3), -1000.0, dtype=F64)
    log_w[17] = 0.0
    acc.update(log_w[:20])
    acc.update(log_w[20:])
    torch.testing.assert_close(acc.ess(), torch.ones(3, dtype=F64))
    torch.testing.assert_close(acc.value(), torch.full((3,), -math.log(50), dtype=F64))
    with pytest.raises(RuntimeError):
        StreamingLogMeanExp().value()


# --- the sampling scheme: keyed block noise ----------------------------------------------------------------

SB, EB = SAMPLE_BLOCK, EXAMPLE_BLOCK
K_CHUNKS = 500  # samples: four sample blocks, the last one partly used
CHUNKS = (1, 7, SB, 3 * SB + 5, K_CHUNKS)


def reference_noise(seed, start, stop, k, dtype=F64, z=Z):
    """The documented scheme written out: sample j of example i is entry (j % SB, i % EB) of the
    (j // SB)-th (SB, EB, Z) draw of the generator seeded with noise_seed(seed, IS_STREAM, i // EB)."""
    out = torch.empty(k, stop - start, z, dtype=dtype)  # (K, B, Z)
    for e in range(start // EB, (stop - 1) // EB + 1):
        g = torch.Generator().manual_seed(noise_seed(seed, IS_STREAM, e))
        draws = torch.cat([torch.randn((SB, EB, z), generator=g, dtype=dtype) for _ in range(-(-k // SB))])
        lo, hi = max(start, e * EB), min(stop, (e + 1) * EB)
        out[:, lo - start : hi - start] = draws[:k, lo - e * EB : hi - e * EB]
    return out


def test_block_noise_is_standard_normal_keyed_as_documented_and_the_same_for_any_take_pattern():
    key = b"vaerepro.BlockNoise:1234:0:5"
    assert noise_seed(1234, 0, 5) == int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    seeds = {noise_seed(s, st, e) for s in (0, 1) for st in (IS_STREAM, ELBO_STREAM) for e in range(100)}
    assert len({v % 2**32 for v in seeds}) == 400  # distinct, also in the 32 bits the CPU generator uses
    ref = BlockNoise(7, IS_STREAM, 50, 100, 3).take(1000)  # (K, B, Z), examples 50..149: 3 example blocks
    assert ref.shape == (1000, 100, 3) and ref.dtype == torch.float32
    assert abs(ref.mean().item()) < 0.01 and abs(ref.std().item() - 1) < 0.01  # 300,000 N(0, 1) draws
    # no two examples or samples share noise: correlations between columns and rows are at noise level
    flat = ref.permute(1, 0, 2).reshape(100, -1)  # (B, K * Z)
    corr = torch.corrcoef(flat) - torch.eye(100)
    assert corr.abs().max() < 0.15  # 3,000 numbers per example: |r| ~ N(0, 0.018)
    for sizes in ([1] * 300 + [700], [7] * 142 + [6], [SB + 1, 3 * SB - 1, 1000 - 4 * SB]):
        noise = BlockNoise(7, IS_STREAM, 50, 100, 3)
        assert torch.equal(torch.cat([noise.take(n) for n in sizes]), ref)
    assert torch.equal(BlockNoise(7, IS_STREAM, 63, 2, 3).take(1000), ref[:, 13:15])  # across a block edge
    assert not torch.equal(BlockNoise(7, ELBO_STREAM, 50, 100, 3).take(1000), ref)


def test_estimate_log_px_is_the_logsumexp_of_the_documented_samples_for_every_chunk_size(ppca):
    """Known answer: log w written out on the documented noise; log p(x), ESS and ladder for every chunk size
    (1, 7, one sample block, 3 blocks + 5, all K), and for examples 30..229 of a larger data set."""
    m, x = model(ppca, shift=0.5, scale=1.3, diagonal=True), ppca["x"]
    eps = reference_noise(3, 30, 30 + N, K_CHUNKS)  # (K, N, Z)
    q = m.posterior(x).base_dist
    z = q.loc + q.scale * eps  # (K, N, Z)
    log_w = m.decode(z).log_prob(x) + m.prior().log_prob(z) - m.posterior(x).log_prob(z)  # (K, N)
    ladder, ess = _ladder_and_ess(log_w)
    for chunk in CHUNKS:
        est = estimate_log_px(m, x, K_CHUNKS, chunk, generator_seed=3, example_offset=30)
        assert list(est.ladder) == list(ladder) == [1, 10, 100, K_CHUNKS]
        for k, v in ladder.items():
            torch.testing.assert_close(est.ladder[k], v, rtol=1e-12, atol=0)
        torch.testing.assert_close(est.log_px, ladder[K_CHUNKS], rtol=1e-12, atol=0)
        torch.testing.assert_close(est.ess, ess, rtol=1e-10, atol=0)


def test_full_covariance_q_is_sampled_through_its_cholesky_factor(ppca):
    m, x = model(ppca, shift=0.5, scale=1.3), ppca["x"][:3]
    q = m.posterior(x)  # MultivariateNormal, batch (3,), event (Z,)
    eps = torch.randn(4, 3, Z, dtype=F64)
    L = torch.linalg.cholesky(m.post_cov * 1.3**2)
    torch.testing.assert_close(log_weights(m, x, 4, eps).z, q.mean + eps @ L.T, rtol=1e-12, atol=1e-12)
    laplace = Independent(torch.distributions.Laplace(q.mean, torch.ones_like(q.mean)), 1)
    with pytest.raises(ValueError, match="Gaussian q"):
        log_weights(m, x, 4, eps, posterior=laplace)


def test_an_example_gets_the_same_draws_whatever_its_batch(ppca):
    """Example offset + i's estimate depends on (seed, its index, K) only: any slice of the examples, also
    across example-block edges and a single example, reproduces the whole run's numbers."""
    m, x = model(ppca, shift=0.5, scale=1.3), ppca["x"]
    whole = estimate_log_px(m, x, 300, 64, generator_seed=9)
    for a, b in ((0, 10), (50, 140), (64, 65), (63, 200)):
        part = estimate_log_px(m, x[a:b], 300, 37, generator_seed=9, example_offset=a)
        for k in whole.ladder:
            torch.testing.assert_close(part.ladder[k], whole.ladder[k][a:b], rtol=1e-12, atol=0)
        torch.testing.assert_close(part.ess, whole.ess[a:b], rtol=1e-10, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_memory_is_bounded_by_the_chunk_not_by_k(ppca, device, monkeypatch):
    """K=5000 in chunks of 50: every decoder call sees at most 50 samples and every noise draw is one fixed
    (SB, EB, Z) block (batched: one per example block and SB samples), so the largest tensors alive are
    < 1/20 of K=5000 at once. CPU memory is not measurable reliably here (a shared machine, torch's own
    allocator); on CUDA the allocator's peak is checked too."""
    m = LinearGaussian(ppca["W"].to(device), ppca["b"].to(device), ppca["sigma"], shift=0.5, scale=1.3)
    decoded, drawn, decode, randn = [], [], m.decode, torch.randn
    m.decode = lambda z: (decoded.append(z.shape[0]), decode(z))[1]
    monkeypatch.setattr(torch, "randn", lambda *a, **kw: (drawn.append(tuple(a[0])), randn(*a, **kw))[1])
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    assert estimate_log_px(m, ppca["x"].to(device), 5000, 50, generator_seed=0).log_px.isfinite().all()
    blocks = -(-N // EB)  # example blocks of the N examples
    assert max(decoded) == 50 and sum(decoded) == 5000
    assert set(drawn) == {(SB, EB, Z)} and len(drawn) == -(-5000 // SB) * blocks
    all_at_once = 5000 * N * D * 8  # bytes of the decoder's means (K, N, D) alone, float64
    assert 8 * (50 * N * D + SB * blocks * EB * Z) < all_at_once / 20  # one chunk's means + one draw
    assert not cuda or torch.cuda.max_memory_allocated() - before < all_at_once / 5


def test_seeding_never_touches_the_global_rng_and_no_seed_draws_one_from_it(ppca):
    m, x = model(ppca, shift=0.5, scale=1.3), ppca["x"]
    torch.manual_seed(99)
    state = torch.get_rng_state()
    a = estimate_log_px(m, x, 20, 8, generator_seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # global stream untouched
    torch.manual_seed(5)
    b = estimate_log_px(m, x, 20, 8)  # no seed: one draw from the global RNG picks it
    assert not torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(5)
    torch.testing.assert_close(estimate_log_px(m, x, 20, 3).log_px, b.log_px, rtol=1e-12, atol=0)
    assert not torch.equal(a.log_px, b.log_px)
    assert not torch.equal(a.log_px, estimate_log_px(m, x, 20, 8, generator_seed=6).log_px)


def test_ladder_points_and_the_ladder_is_a_prefix_of_the_same_draws(ppca):
    """A K-sample run's ladder point k equals a k-sample run's estimate (same seed, any chunk sizes)."""
    assert ladder_points(1) == [1]
    assert ladder_points(10) == [1, 10]
    assert ladder_points(250) == [1, 10, 100, 250]
    assert ladder_points(5000) == [1, 10, 100, 1000, 5000]
    m, x = model(ppca, shift=0.5, scale=1.3), ppca["x"]
    est = estimate_log_px(m, x, 1000, 7, generator_seed=4)
    assert list(est.ladder) == [1, 10, 100, 1000] and torch.equal(est.ladder[1000], est.log_px)
    assert est.log_px.shape == est.ess.shape == (N,)
    for k, chunk in ((1, 1), (10, 3), (100, SB), (1000, 1000)):
        alone = estimate_log_px(m, x, k, chunk, generator_seed=4).log_px
        torch.testing.assert_close(est.ladder[k], alone, rtol=1e-12, atol=0)
    plain = estimate_log_px(m, x, 1000, chunk_size=64, ladder=False, generator_seed=4)
    assert list(plain.ladder) == [1000]
    torch.testing.assert_close(plain.log_px, est.log_px, rtol=1e-12, atol=0)


def test_mean_se_is_the_mean_and_standard_error():
    values = torch.tensor([1.0, 2.0, 4.0, 7.0, -3.5])
    mean, se = mean_se(values)
    assert mean == pytest.approx(np.mean(values.numpy()), rel=1e-12)
    assert se == pytest.approx(scipy.stats.sem(values.numpy().astype(np.float64), ddof=1), rel=1e-12)
    assert math.isnan(mean_se(torch.tensor([3.0]))[1])
    with pytest.raises(ValueError):
        mean_se(torch.tensor([]))


# --- the convergence verdict -----------------------------------------------------------------------------


def _ladder_and_ess(log_w: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """The ladder {k: (B,)} and ESS (B,) that estimate_log_px computes from these log weights (K, B)."""
    ladder = {k: torch.logsumexp(log_w[:k], 0) - math.log(k) for k in ladder_points(log_w.shape[0])}
    acc = StreamingLogMeanExp()
    acc.update(log_w)
    return ladder, acc.ess()


def test_ladder_steps_are_paired_differences():
    g = torch.Generator().manual_seed(0)
    offset = 10.0 * torch.randn(100, generator=g, dtype=F64)  # examples differ by ~10 nats
    gain = 0.5 + 0.1 * torch.randn(100, generator=g, dtype=F64)
    steps = ladder_steps({10: offset, 1: offset - 1.0, 100: offset + gain})  # any key order
    assert [(s["k_from"], s["k"]) for s in steps] == [(1, 10), (10, 100)]
    assert steps[0]["gain"] == pytest.approx(1.0) and steps[0]["gain_se"] == pytest.approx(0.0, abs=1e-12)
    assert steps[1]["gain"] == pytest.approx(gain.mean().item())
    assert steps[1]["gain_se"] == pytest.approx(gain.std().item() / 10)  # ~0.01, not the ~1.4 of unpaired SEs
    assert ladder_steps({7: offset}) == []


def test_equal_weights_converge():
    # every weight of an example equal: the ladder is flat and ESS = K
    log_w = torch.linspace(-120.0, -80.0, 50, dtype=F64).expand(1000, 50)  # (K, B)
    v = convergence(*_ladder_and_ess(log_w))
    assert v.converged and v.reasons == []
    assert v.ladder_gain == pytest.approx(0.0, abs=1e-9) and v.ladder_from_k == 100
    assert v.ess_hmean == pytest.approx(1000.0)


def test_a_ladder_still_rising_beyond_its_paired_error_is_not_converged():
    # the first 100 of 1000 log weights lie 0.3 + s below the other 900: log p_1000 - log p_100 is
    # log(0.1 exp(-0.3 - s) + 0.9) + 0.3 + s, about 0.27 nats for every example. The examples' own levels
    # spread over ~10 nats, so the unpaired SEs of the two points (~1 nat) would hide that rise; the paired
    # SE does not.
    g = torch.Generator().manual_seed(1)
    B = 100
    level = 10.0 * torch.randn(B, generator=g, dtype=F64)  # (B,)
    s = 0.05 * torch.rand(B, generator=g, dtype=F64)
    log_w = level.expand(1000, B).clone()  # (K, B)
    log_w[:100] -= 0.3 + s
    ladder, ess = _ladder_and_ess(log_w)
    expected = (torch.log(0.1 * torch.exp(-0.3 - s) + 0.9) + 0.3 + s).mean().item()
    v = convergence(ladder, ess)
    assert v.ladder_gain == pytest.approx(expected) and 0.26 < expected < 0.30
    assert v.ladder_gain_se < 0.01 and mean_se(ladder[1000])[1] > 0.5
    assert not v.converged and len(v.reasons) == 1 and v.reasons[0].startswith("ladder still rising")
    assert "K=100 to K=1000" in v.reasons[0]
    assert v.ess_hmean > 900  # the weights are nearly equal: ESS is not the reason

    # the same rise, below the tolerance of 0.1 nats/example: converged
    log_w[:100] = level - 0.1
    assert convergence(*_ladder_and_ess(log_w)).converged


def test_a_rise_within_its_paired_error_is_not_a_rise():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(20, generator=g, dtype=F64)
    noise = torch.randn(20, generator=g, dtype=F64)
    d = 0.5 + 5.0 * (noise - noise.mean()) / noise.std()  # mean 0.5 > tolerance, paired SE 5/sqrt(20) = 1.1
    ladder = {100: base, 1000: base + d}
    v = convergence(ladder, torch.full((20,), 100.0, dtype=F64))
    assert v.ladder_gain == pytest.approx(0.5) and v.ladder_gain_se == pytest.approx(5 / math.sqrt(20))
    assert v.converged
    # the same mean gain with a small paired SE is a rise
    assert not convergence({100: base, 1000: base + 0.5}, torch.full((20,), 100.0, dtype=F64)).converged


def test_ess_below_the_floor_is_not_converged_by_its_harmonic_mean():
    assert ESS_FLOOR == pytest.approx(1 / (2 * LADDER_GAIN_TOL_NATS)) == pytest.approx(5.0)
    # half the examples: all 1000 weights equal (ESS 1000); the other half: two equal weights dominate
    # (ESS 2), both among the first 10 samples, so the ladder falls and cannot be the reason
    log_w = torch.zeros(1000, 10, dtype=F64)
    log_w[2:, 5:] = -200.0
    ladder, ess = _ladder_and_ess(log_w)
    torch.testing.assert_close(ess[5:], torch.full((5,), 2.0, dtype=F64))
    assert ess.mean() > 500  # the arithmetic mean would pass any floor
    v = convergence(ladder, ess)
    assert v.ess_hmean == pytest.approx(2 / (1 / 1000 + 1 / 2))  # 3.99
    assert v.ladder_gain < 0
    assert not v.converged and v.reasons == ["ESS too low: harmonic mean 4.0 < 5 samples per example"]


def test_one_sample_is_never_converged():
    # K = 1: no ladder step, and one weight is an ESS of 1
    v = convergence({1: torch.zeros(3, dtype=F64)}, torch.ones(3, dtype=F64))
    assert not v.converged and v.ladder_gain is None and v.ladder_from_k is None
    assert [r.split(":")[0] for r in v.reasons] == ["ESS too low"]


@pytest.mark.parametrize("bad", [math.nan, -math.inf, math.inf])
def test_a_non_finite_estimate_is_never_converged(bad):
    # 50 examples, every weight equal (a flat ladder, ESS = K): converged; then one example's log weights
    # all NaN (a decoder output NaN), all -inf (every weight zero) or one +inf (an unbounded density): its
    # log p(x) is non-finite, and so are the mean, the last step's paired gain and the ESS harmonic mean,
    # whose comparisons with their thresholds are all False. The verdict must not read that as converged.
    log_w = torch.linspace(-120.0, -80.0, 50, dtype=F64).expand(1000, 50).clone()  # (K, B)
    assert convergence(*_ladder_and_ess(log_w)).converged
    if bad == math.inf:
        log_w[500, 7] = bad  # after the last ladder point before K: ladder[100] stays finite
    else:
        log_w[:, 7] = bad
    ladder, ess = _ladder_and_ess(log_w)
    assert not math.isfinite(ladder[1000][7]) and math.isnan(ess[7])
    v = convergence(ladder, ess)
    assert not v.converged
    assert v.reasons[0] == "non-finite estimate: log p(x) or ESS is NaN or infinite for 1 of 50 examples"
    # +inf also makes the last step's gain +inf, a rise beyond any SE; NaN and -inf give a NaN gain: no rise
    assert [r.split(":")[0] for r in v.reasons[1:]] == (["ladder still rising"] if bad > 0 else [])


def test_a_non_finite_final_estimate_or_ess_alone_is_never_converged():
    # each check on its own: the earlier ladder points finite and the ESS fine, only log p_K(x) of one example
    # non-finite; then every log p(x) finite, only one example's ESS NaN (a batch no rank computed is left
    # NaN, evaluate.per_example). A verdict that looked at the first ladder point, or at log p(x) alone, would
    # call either converged.
    flat = torch.linspace(-120.0, -80.0, 50, dtype=F64)  # (B,) a flat ladder: no rise
    ess = torch.full((50,), 1000.0, dtype=F64)
    assert convergence({100: flat, 1000: flat.clone()}, ess).converged
    final = flat.clone()
    final[3] = -math.inf
    v = convergence({1: flat, 10: flat, 100: flat, 1000: final}, ess)
    assert not v.converged
    assert v.reasons[0] == "non-finite estimate: log p(x) or ESS is NaN or infinite for 1 of 50 examples"
    bad_ess = ess.clone()
    bad_ess[3] = math.nan
    v = convergence({100: flat, 1000: flat.clone()}, bad_ess)
    assert not v.converged
    assert v.reasons[0] == "non-finite estimate: log p(x) or ESS is NaN or infinite for 1 of 50 examples"


def test_an_ess_exactly_at_the_floor_is_not_too_low():
    # "below ESS_FLOOR" is too low: a harmonic mean of exactly 5 samples is not, one just under it is
    flat = torch.linspace(-120.0, -80.0, 4, dtype=F64)
    ladder = {1: flat, 10: flat.clone()}
    at_floor = convergence(ladder, torch.full((4,), ESS_FLOOR, dtype=F64))
    assert at_floor.ess_hmean == ESS_FLOOR == 5.0 and at_floor.converged
    below = convergence(ladder, torch.tensor([5.0, 5.0, 5.0, 4.9], dtype=F64))
    assert below.ess_hmean == pytest.approx(4 / (3 / 5.0 + 1 / 4.9))
    assert below.reasons == ["ESS too low: harmonic mean 5.0 < 5 samples per example"]


def test_a_rise_counts_beyond_two_paired_standard_errors_not_one():
    # a mean paired gain of 0.5 nats (above the 0.1 tolerance) with a paired SE of 1/3: 1.5 SEs, within
    # LADDER_GAIN_SIGMAS = 2, not a rise; with an SE of 0.2 (2.5 SEs) a rise
    g = torch.Generator().manual_seed(3)
    base = 10.0 * torch.randn(20, generator=g, dtype=F64)
    noise = torch.randn(20, generator=g, dtype=F64)
    unit = (noise - noise.mean()) / noise.std()  # mean 0, std 1 exactly (up to rounding)
    ess = torch.full((20,), 100.0, dtype=F64)
    for se, rises in ((1 / 3, False), (0.2, True)):
        d = 0.5 + se * math.sqrt(20) * unit
        v = convergence({100: base, 1000: base + d}, ess)
        assert v.ladder_gain == pytest.approx(0.5) and v.ladder_gain_se == pytest.approx(se)
        assert v.converged is not rises, se


def test_a_last_step_of_exactly_the_tolerance_is_not_a_rise():
    # "exceeds LADDER_GAIN_TOL_NATS": a paired gain of exactly 0.1 nats on every example (SE 0) is not a
    # rise; one a hair above it is
    ess = torch.full((8,), 1000.0, dtype=F64)
    zeros = torch.zeros(8, dtype=F64)
    at_tol = convergence({100: zeros, 1000: torch.full((8,), LADDER_GAIN_TOL_NATS, dtype=F64)}, ess)
    assert at_tol.ladder_gain == LADDER_GAIN_TOL_NATS and at_tol.ladder_gain_se == 0.0 and at_tol.converged
    above = convergence({100: zeros, 1000: torch.full((8,), math.nextafter(0.1, 1.0), dtype=F64)}, ess)
    assert not above.converged and above.reasons[0].startswith("ladder still rising: +0.10 ± 0.00")


def test_block_noise_of_a_batch_starting_past_the_second_example_block_is_the_documented_one():
    # examples 150..279: the batch starts inside example block 2 and spans blocks 2..4; a single example
    # deep in the data set (index 1000, block 15)
    for start, batch in ((150, 130), (1000, 1)):
        got = BlockNoise(11, IS_STREAM, start, batch, Z, dtype=F64).take(300)  # (K, B, Z)
        torch.testing.assert_close(got, reference_noise(11, start, start + batch, 300), rtol=0, atol=0)
