"""Two stochastic layers (Burda et al. 2016's two-layer rows) with the estimators written once: on a
linear-Gaussian two-layer model with a closed-form marginal, the exact posterior gives the exact log p(x)
with every sample, a perturbed one converges to it, and the IWAE bound rises with K towards it."""

from __future__ import annotations

import functools

import pytest
import scipy.stats
import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from conftest import DEVICES
from test_estimators import (  # the one-layer checks' helpers
    CHUNKS,
    K_CHUNKS,
    _ladder_and_ess,
    assert_converges,
    reference_noise,
)
from vaerepro.estimators import (
    elbo,
    elbo_terms,
    estimate_log_px,
    iwae_bound,
    log_weights,
    mean_se,
)
from vaerepro.model import HierarchicalPosterior, HierarchicalPrior

D, N = 5, 200  # pixels, examples
F64 = torch.float64


# --- two stochastic layers ---------------------------------------------------------------------------------

Z1, Z2 = 3, 2


class TwoLayerLinearGaussian:
    """z2 ~ N(0, I), z1 | z2 ~ N(A z2 + a, diag(s1^2)), x | z1 ~ N(Bm z1 + b, sigma^2 I), so
        p(z1)       = N(a, C1),  C1 = A A^T + diag(s1^2)
        p(x)        = N(Bm a + b, Bm C1 Bm^T + sigma^2 I)
        p(z1 | x)   = N(P1^-1 (C1^-1 a + Bm^T (x - b) / sigma^2), P1^-1),  P1 = C1^-1 + Bm^T Bm / sigma^2
        p(z2 | z1)  = N(P2^-1 A^T S1^-1 (z1 - a), P2^-1),  P2 = I + A^T S1^-1 A   (x adds nothing given z1)
    and the exact posterior p(z1, z2 | x) = p(z1 | x) p(z2 | z1) is a q(z1|x) q(z2|z1) with full-covariance
    layers. q: each layer's mean + shift * its mean-field scale, its covariance * scale^2 (full) or, with
    ``diagonal``, diag(scale * mean-field scale)^2 (the shape of the VAE's layers).
    """

    def __init__(self, A, a, s1, Bm, b, sigma, shift=0.0, scale=1.0, diagonal=False):
        self.A, self.a, self.s1, self.Bm, self.b, self.sigma = A, a, s1, Bm, b, sigma
        self.shift, self.scale, self.diagonal = shift, scale, diagonal
        eye = functools.partial(torch.eye, dtype=F64, device=A.device)
        self.C1_inv = torch.linalg.inv(A @ A.T + torch.diag(s1**2))
        P1 = self.C1_inv + Bm.T @ Bm / sigma**2
        P2 = eye(Z2) + A.T @ (A / s1[:, None] ** 2)
        self.cov1, self.cov2 = torch.linalg.inv(P1), torch.linalg.inv(P2)
        self.mf1, self.mf2 = P1.diagonal().rsqrt(), P2.diagonal().rsqrt()

    def _layer(self, mean, cov, mf):
        mean = mean + self.shift * mf
        if self.diagonal:
            return Independent(Normal(mean, (self.scale * mf).expand_as(mean)), 1)
        return MultivariateNormal(mean, covariance_matrix=cov * self.scale**2)

    def posterior(self, x):
        m1 = ((x - self.b) @ self.Bm / self.sigma**2 + self.a @ self.C1_inv) @ self.cov1  # (B, Z1)
        q1 = self._layer(m1, self.cov1, self.mf1)
        return HierarchicalPosterior(q1, self.posterior_2, Z2)

    def posterior_2(self, z1):
        m2 = ((z1 - self.a) / self.s1**2) @ self.A @ self.cov2  # (..., Z2)
        return self._layer(m2, self.cov2, self.mf2)

    def prior_1(self, z2):
        return Independent(Normal(z2 @ self.A.T + self.a, self.s1), 1)  # p(z1 | z2)

    def prior(self):
        zeros = torch.zeros(Z2, dtype=F64, device=self.A.device)
        return HierarchicalPrior(Independent(Normal(zeros, torch.ones_like(zeros)), 1), self.prior_1, Z1)

    def decode(self, z):
        return Independent(Normal(z[..., :Z1] @ self.Bm.T + self.b, self.sigma), 1)


@pytest.fixture(scope="module")
def two_layer():
    g = torch.Generator().manual_seed(4321)
    A = torch.randn(Z1, Z2, generator=g, dtype=F64)
    a = 0.5 * torch.randn(Z1, generator=g, dtype=F64)
    s1 = 0.3 + 0.4 * torch.rand(Z1, generator=g, dtype=F64)
    Bm = torch.randn(D, Z1, generator=g, dtype=F64)
    b = 0.5 * torch.randn(D, generator=g, dtype=F64)
    sigma = 0.5
    z2 = torch.randn(N, Z2, generator=g, dtype=F64)
    z1 = z2 @ A.T + a + s1 * torch.randn(N, Z1, generator=g, dtype=F64)
    x = z1 @ Bm.T + b + sigma * torch.randn(N, D, generator=g, dtype=F64)  # (N, D) drawn from the model
    cov = Bm @ (A @ A.T + torch.diag(s1**2)) @ Bm.T + sigma**2 * torch.eye(D, dtype=F64)
    exact = scipy.stats.multivariate_normal((Bm @ a + b).numpy(), cov.numpy()).logpdf(x.numpy())
    params = {"A": A, "a": a, "s1": s1, "Bm": Bm, "b": b, "sigma": sigma}
    return {"params": params, "x": x, "log_px": torch.from_numpy(exact)}


def two_layer_model(two_layer, device="cpu", **kwargs):
    p = {k: v.to(device) if torch.is_tensor(v) else v for k, v in two_layer["params"].items()}
    return TwoLayerLinearGaussian(**p, **kwargs)


@pytest.mark.parametrize("k", [1, 10, 1000])
@pytest.mark.parametrize("device", DEVICES)
def test_two_layers_exact_posterior_gives_exact_log_px_for_every_k(two_layer, k, device):
    """q = p(z1|x) p(z2|z1), sampled ancestrally: every log weight is log p(x), so the estimate is exact for
    any K and ESS = K."""
    m, x = two_layer_model(two_layer, device), two_layer["x"].to(device)
    exact = two_layer["log_px"].to(device)
    torch.manual_seed(0)
    lw = log_weights(m, x, 7).log_w  # (K, N), z from q's own rsample
    torch.testing.assert_close(lw, exact.expand(7, N), rtol=0, atol=1e-10)
    est = estimate_log_px(m, x, k, chunk_size=64, generator_seed=0)
    torch.testing.assert_close(est.log_px, exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        est.ess, torch.full((N,), float(k), dtype=F64, device=device), rtol=1e-9, atol=0
    )
    for v in est.ladder.values():
        torch.testing.assert_close(v, exact, rtol=0, atol=1e-10)


@pytest.mark.parametrize("diagonal", [False, True])
def test_two_layers_perturbed_posterior_converges_to_exact_log_px(two_layer, diagonal):
    """Both layers off in mean and width (full covariance, or mean-field as the VAE's layers): the error
    shrinks with every decade of K, and at K = 1000 it is within its Monte Carlo error across examples."""
    m = two_layer_model(two_layer, shift=0.5, scale=1.3, diagonal=diagonal)
    est = estimate_log_px(m, two_layer["x"], 1000, chunk_size=128, generator_seed=0)
    assert_converges(est, two_layer["log_px"])


def test_two_layers_iwae_bound_rises_with_k_to_log_px(two_layer):
    """E[ELBO] = E[L_1] < E[L_10] < E[L_100] < log p(x) for a poor mean-field q (Burda et al. 2016,
    Theorem 1); estimator A's terms add up to its ELBO; estimator B is refused by name."""
    m, x = two_layer_model(two_layer, shift=1.0, scale=0.7, diagonal=True), two_layer["x"]
    runs = {"elbo": [], 1: [], 10: [], 100: []}
    for s in range(10):
        torch.manual_seed(s)
        runs["elbo"].append(elbo(m, x, 1, "A"))
        for k in (1, 10, 100):
            runs[k].append(iwae_bound(m, x, k))
    v = {key: torch.stack(r).reshape(-1) for key, r in runs.items()}  # (seeds * N,)
    mean, se = mean_se(v[1] - v["elbo"])
    assert abs(mean) < 4 * se  # L_1 is the ELBO
    exact = two_layer["log_px"].repeat(10)
    for lo, hi in [(v["elbo"], v[10]), (v[10], v[100]), (v[100], exact)]:
        mean, se = mean_se(hi - lo)
        assert mean > 4 * se, (mean, se)
    eps = torch.randn(3, N, Z1 + Z2, dtype=F64)
    terms = elbo_terms(m, x, 3, eps, estimator="A")
    torch.testing.assert_close(terms["elbo"], elbo(m, x, 3, "A", eps), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["elbo"], terms["recon"] - terms["kl"])
    for call in (lambda: elbo(m, x, 1, "B"), lambda: elbo_terms(m, x, 1)):
        with pytest.raises(ValueError, match="estimator B needs KL.*HierarchicalPosterior.*estimator A"):
            call()
    with pytest.raises(ValueError, match="A, B"):
        elbo_terms(m, x, 1, estimator="C")


@pytest.mark.slow
def test_two_layers_estimate_is_the_logsumexp_of_the_documented_samples_for_every_chunk_size(two_layer):
    """Known answer, written out without the hierarchical classes: the documented noise (K, N, Z1 + Z2), z1
    from its first Z1 columns, z2 | z1 from the rest; log w from the five densities; for every chunk size."""
    m, x = two_layer_model(two_layer, shift=0.5, scale=1.3), two_layer["x"]
    eps = reference_noise(3, 30, 30 + N, K_CHUNKS, z=Z1 + Z2)  # (K, N, Z1 + Z2)
    q1 = m.posterior(x).q1  # MultivariateNormal, batch (N,)
    z1 = q1.loc + (q1.scale_tril @ eps[..., :Z1, None]).squeeze(-1)  # (K, N, Z1)
    q2 = m.posterior_2(z1)
    z2 = q2.loc + (q2.scale_tril @ eps[..., Z1:, None]).squeeze(-1)  # (K, N, Z2)
    p2 = Independent(Normal(torch.zeros(Z2, dtype=F64), torch.ones(Z2, dtype=F64)), 1)
    log_w = (
        Independent(Normal(z1 @ m.Bm.T + m.b, m.sigma), 1).log_prob(x)
        + m.prior_1(z2).log_prob(z1)
        + p2.log_prob(z2)
        - q1.log_prob(z1)
        - q2.log_prob(z2)
    )  # (K, N)
    ladder, ess = _ladder_and_ess(log_w)
    for chunk in CHUNKS:
        est = estimate_log_px(m, x, K_CHUNKS, chunk, generator_seed=3, example_offset=30)
        for k, val in ladder.items():
            torch.testing.assert_close(est.ladder[k], val, rtol=1e-12, atol=0)
        torch.testing.assert_close(est.ess, ess, rtol=1e-10, atol=0)
