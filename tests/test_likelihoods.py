"""Likelihoods against reference values: scipy.stats, closed forms in 50-digit mpmath, quadrature."""

import itertools
import json
import math

import mpmath as mp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from conftest import DEVICES
from vaerepro.likelihoods import (
    _CB_LOG_NORM_COEFS,
    _CB_MEAN_COEFS,
    DATA_SPACES,
    REGISTRY,
    Bernoulli,
    BernoulliPixels,
    CBDistribution,
    ContinuousBernoulli,
    Gaussian,
    cb_log_norm,
    cb_mean,
    get_likelihood,
)

mp.mp.dps = 50


# --- mpmath references, evaluated at the exact float value of the parameter ---------------------------------


def mp_log_c_from_probs(lam: float) -> mp.mpf:
    """log C(lambda) = log(2 artanh(1 - 2 lambda) / (1 - 2 lambda)); log 2 at lambda = 1/2."""
    lam = mp.mpf(lam)
    if lam == mp.mpf(1) / 2:
        return mp.log(2)
    return mp.log(2 * mp.atanh(1 - 2 * lam) / (1 - 2 * lam))


def mp_log_c_from_logits(eta: float) -> mp.mpf:
    """log C = log(eta / tanh(eta / 2)); log 2 at eta = 0."""
    eta = mp.mpf(eta)
    return mp.log(2) if eta == 0 else mp.log(eta / mp.tanh(eta / 2))


def mp_dlog_c(eta: float) -> mp.mpf:
    """d log C / d eta = 1/eta - 1/sinh(eta); 0 at eta = 0."""
    with mp.workdps(120):  # the two terms cancel to ~eta/6: 1e-30 needs > 60 extra digits
        eta = mp.mpf(eta)
        return +(mp.mpf(0) if eta == 0 else 1 / eta - 1 / mp.sinh(eta))


def mp_cb_mean(eta: float) -> mp.mpf:
    """E[x] = 1 / (1 - exp(-eta)) - 1/eta; 1/2 at eta = 0."""
    with mp.workdps(120):  # cancellation of the two terms, as above
        eta = mp.mpf(eta)
        return +(mp.mpf(1) / 2 if eta == 0 else -1 / mp.expm1(-eta) - 1 / eta)


def mp_cb_log_prob(x: float, eta: float) -> mp.mpf:
    """log C(lambda) + x log lambda + (1 - x) log(1 - lambda), lambda = sigmoid(eta)."""
    x, eta_m = mp.mpf(x), mp.mpf(eta)
    lam = 1 / (1 + mp.exp(-eta_m))
    return mp_log_c_from_logits(eta) + x * mp.log(lam) + (1 - x) * mp.log(1 - lam)


def max_rel_err(values, refs) -> float:
    return max(abs((mp.mpf(float(v)) - r) / r) for v, r in zip(values, refs, strict=True))


# lambda grid: the ends, the window around 1/2 where torch switches to its Taylor series, exactly 1/2
LAMBDAS = sorted(
    {1e-6, 1e-4, 1e-3, 0.01, 0.1, 0.25, 0.4, 0.49, 0.5, 0.51, 0.6, 0.75, 0.9, 0.99, 0.999, 1 - 1e-4, 1 - 1e-6}
    | {0.5 + s * d for s in (-1, 1) for d in (1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 0.1)}
)
# logit grid: dense across the series/closed-form switch at |eta| = 0.5, plus tiny and huge values
LOGITS = sorted(
    {
        0.0,
        1e-30,
        1e-8,
        1e-4,
        0.01,
        0.1,
        0.3,
        0.49,
        0.4999999,
        0.5,
        0.5000001,
        0.51,
        0.7,
        1.0,
        2.0,
        5.0,
        13.8,
        30.0,
    }
    | {float(v) for v in np.linspace(0.0, 3.0, 61)}
)
LOGITS = sorted(set(LOGITS) | {-v for v in LOGITS})

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


# --- continuous Bernoulli normaliser --------------------------------------------------------------


def test_cb_series_coefficients_match_mpmath_taylor_expansions():
    """log(x coth x) = sum c_n x^(2n) and (coth x - 1/x) / 2 = sum m_n x^(2n-1), from mpmath.taylor."""
    c = mp.taylor(lambda x: mp.log(x * mp.coth(x)) if x else mp.mpf(0), 0, 2 * len(_CB_LOG_NORM_COEFS))
    m = mp.taylor(lambda x: (mp.coth(x) - 1 / x) / 2 if x else mp.mpf(0), 0, 2 * len(_CB_MEAN_COEFS))
    for n, coef in enumerate(_CB_LOG_NORM_COEFS, start=1):
        assert coef == pytest.approx(float(c[2 * n]), rel=1e-15)
    for n, coef in enumerate(_CB_MEAN_COEFS, start=1):
        assert coef == pytest.approx(float(m[2 * n - 1]), rel=1e-15)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cb_log_norm_from_logits_matches_mpmath(dtype, device):
    eta = torch.tensor(LOGITS + [50.0, -50.0, 1e4, -1e4], dtype=dtype, device=device)
    refs = [mp_log_c_from_logits(e) for e in eta.tolist()]
    assert max_rel_err(cb_log_norm(eta).tolist(), refs) < TOL[dtype]
    # the distribution built from logits uses the same normaliser
    assert max_rel_err(CBDistribution(logits=eta).log_norm().tolist(), refs) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cb_log_norm_from_probs_matches_mpmath(dtype, device):
    lam = torch.tensor(LAMBDAS, dtype=dtype, device=device)
    assert (lam == 0.5).any()
    refs = [mp_log_c_from_probs(v) for v in lam.tolist()]  # exact float value of each lambda
    assert max_rel_err(CBDistribution(probs=lam).log_norm().tolist(), refs) < TOL[dtype]


def test_cb_log_norm_is_accurate_in_float32_just_outside_torchs_taylor_window():
    """torch's normaliser switches to its series only inside (0.499, 0.501); just outside it, in float32,
    log C still holds to 1e-6 relative here."""
    lam = torch.tensor([0.5 - 2e-3, 0.5 + 2e-3, 0.5 - 1.5e-3, 0.5 + 1.5e-3], dtype=torch.float32)
    refs = [mp_log_c_from_probs(v) for v in lam.tolist()]
    assert max_rel_err(CBDistribution(probs=lam).log_norm().tolist(), refs) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_cb_log_norm_gradient_finite_and_correct(dtype, device):
    extreme = [1e30, -1e30, 1e4, -1e4, 0.0]
    eta = torch.tensor(LOGITS + extreme, dtype=dtype, device=device, requires_grad=True)
    (grad,) = torch.autograd.grad(cb_log_norm(eta).sum(), eta)
    assert torch.isfinite(grad).all()
    refs = [mp_dlog_c(e) for e in eta.tolist()]
    # gradient errors are absolute near eta = 0 where the derivative vanishes
    err = max(abs(mp.mpf(float(g)) - r) / (abs(r) + 1e-3) for g, r in zip(grad.tolist(), refs, strict=True))
    assert err < (1e-12 if dtype == torch.float64 else 1e-5)


def test_cb_log_prob_gradient_finite_at_half():
    for kwargs in (
        {"probs": torch.full((3,), 0.5, dtype=torch.float64, requires_grad=True)},
        {"logits": torch.zeros(3, dtype=torch.float64, requires_grad=True)},
    ):
        (param,) = kwargs.values()
        x = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
        (grad,) = torch.autograd.grad(CBDistribution(**kwargs).log_prob(x).sum(), param)
        assert torch.isfinite(grad).all()
    # d/d eta log p(x|eta) = x - E[x] and E[x] = 1/2 at eta = 0
    eta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(CBDistribution(logits=eta).log_prob(x).sum(), eta)
    torch.testing.assert_close(grad, x - 0.5, rtol=0, atol=1e-14)


def test_cb_log_prob_matches_mpmath_closed_form():
    lik = ContinuousBernoulli()
    etas = [-13.8, -3.0, -0.4, -1e-3, 0.0, 2e-4, 0.3, 0.6, 4.0, 20.0]
    xs = [0.0, 0.013, 0.25, 0.5, 0.77, 1.0]
    # one "image" per eta, D = len(xs) pixels sharing that eta
    logits = torch.tensor([[e] * len(xs) for e in etas], dtype=torch.float64)  # (B, D)
    x = torch.tensor(xs, dtype=torch.float64)  # (D,)
    lp = lik.distribution(logits).log_prob(x)  # (B,)
    ref = [mp.fsum(mp_cb_log_prob(xi, e) for xi in xs) for e in etas]
    assert lp.shape == (len(etas),)
    for v, r in zip(lp.tolist(), ref, strict=True):
        assert abs(v - float(r)) < 1e-12 * max(1.0, abs(float(r)))


@pytest.mark.parametrize("lam", [0.5, 1e-3, 0.999, 0.3, 0.5 + 1e-4, 0.5 - 3e-3])
def test_cb_density_integrates_to_one(lam):
    eta = math.log(lam) - math.log1p(-lam)
    dist = ContinuousBernoulli().distribution(torch.tensor([eta], dtype=torch.float64))  # D = 1

    def density(x):
        return math.exp(dist.log_prob(torch.tensor([x], dtype=torch.float64)).item())

    total, _ = scipy.integrate.quad(density, 0.0, 1.0, epsabs=1e-13, epsrel=1e-13)
    mean, _ = scipy.integrate.quad(lambda x: x * density(x), 0.0, 1.0, epsabs=1e-13, epsrel=1e-13)
    assert total == pytest.approx(1.0, abs=1e-10)
    # the likelihood's mean (used for reconstructions) is the distribution's expectation, not lambda
    assert ContinuousBernoulli().mean(torch.tensor([eta], dtype=torch.float64)).item() == pytest.approx(
        mean, abs=1e-10
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cb_mean_matches_mpmath(dtype):
    eta = torch.tensor(LOGITS + [1e4, -1e4, 1e30, -1e30], dtype=dtype, requires_grad=True)
    m = cb_mean(eta)
    for v, r in zip(m.tolist(), [mp_cb_mean(e) for e in eta.tolist()], strict=True):
        assert abs(v - float(r)) < (1e-14 if dtype == torch.float64 else 1e-6)
    (grad,) = torch.autograd.grad(m.sum(), eta)
    assert torch.isfinite(grad).all()
    # CBDistribution.mean agrees; torch's own mean from probs agrees to float accuracy away from saturation
    torch.testing.assert_close(CBDistribution(logits=eta.detach()).mean, m.detach())
    lam = torch.tensor([0.1, 0.3, 0.45, 0.55, 0.8], dtype=torch.float64)
    torch.testing.assert_close(
        CBDistribution(probs=lam).mean, torch.distributions.ContinuousBernoulli(probs=lam).mean
    )


# --- Bernoulli ------------------------------------------------------------------------------------


def test_bernoulli_log_prob_matches_scipy():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 7, generator=g, dtype=torch.float64)  # (B, D)
    x = torch.bernoulli(torch.full((4, 7), 0.5, dtype=torch.float64), generator=g)
    lp = Bernoulli().distribution(logits).log_prob(x)  # (B,)
    p = 1 / (1 + np.exp(-logits.numpy()))
    ref = scipy.stats.bernoulli.logpmf(x.numpy(), p).sum(axis=1)
    np.testing.assert_allclose(lp.numpy(), ref, rtol=1e-12)


def test_bernoulli_log_prob_and_gradient_are_torchs_to_the_bit():
    """Ours negates per-example sums, torch's Independent(Bernoulli) each pixel: the same bits."""
    g = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(2, 3, 7, generator=g)).requires_grad_()  # (K, B, D)
    x = torch.bernoulli(torch.full((3, 7), 0.3), generator=g)  # (B, D), broadcast over K
    ours = Bernoulli().distribution(logits).log_prob(x)
    ref = torch.distributions.Independent(torch.distributions.Bernoulli(logits=logits), 1).log_prob(x)
    assert ours.shape == (2, 3) and torch.equal(ours, ref)
    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)
    (grad_ref,) = torch.autograd.grad(ref.sum(), logits)
    assert torch.equal(grad_ours, grad_ref)
    with pytest.raises(ValueError, match="support"):  # grey levels are outside a proper Bernoulli's support
        Bernoulli().distribution(logits).log_prob(torch.full((3, 7), 0.5))


def test_bernoulli_pmf_sums_to_one_over_all_binary_images():
    d = 5
    logits = torch.tensor([-2.0, -0.3, 0.0, 1.1, 4.0], dtype=torch.float64)  # (D,)
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=torch.float64)  # (2^D, D)
    lp = Bernoulli().distribution(logits).log_prob(images)  # (2^D,)
    assert torch.exp(lp).sum().item() == pytest.approx(1.0, abs=1e-14)


def test_bernoulli_space_rules():
    with pytest.raises(ValueError, match="allow_improper"):
        Bernoulli().check_space("continuous")
    Bernoulli().check_space("binary")
    Bernoulli(allow_improper=True).check_space("continuous")
    assert Bernoulli(allow_improper=True).is_improper("continuous")
    assert not Bernoulli(allow_improper=True).is_improper("binary")
    assert Bernoulli().allowed_spaces() == ("binary",)
    assert Bernoulli(allow_improper=True).allowed_spaces() == ("binary", "continuous")


def test_improper_bernoulli_on_grey_levels():
    """x*logit - softplus(logit) on grey levels; its integral over [0, 1] is 1/C(lambda), not 1."""
    lik = Bernoulli(allow_improper=True)
    logits = torch.tensor([-1.5, 0.0, 2.5], dtype=torch.float64)
    x = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    ref = (x * logits - torch.nn.functional.softplus(logits)).sum()
    assert lik.distribution(logits).log_prob(x).item() == pytest.approx(ref.item(), abs=1e-14)
    for eta in (-1.5, 0.0, 2.5):
        d = lik.distribution(torch.tensor([eta], dtype=torch.float64))
        total, _ = scipy.integrate.quad(
            lambda v, d=d: math.exp(d.log_prob(torch.tensor([v], dtype=torch.float64)).item()), 0.0, 1.0
        )
        assert total == pytest.approx(math.exp(-float(mp_log_c_from_logits(eta))), rel=1e-10)


# --- Gaussian -------------------------------------------------------------------------------------


def _sigmoid(h):
    return 1 / (1 + np.exp(-h))


def test_gaussian_learned_sigma_matches_scipy():
    g = torch.Generator().manual_seed(1)
    b, d = 3, 6
    params = 2 * torch.randn(b, 2 * d, generator=g, dtype=torch.float64)  # (B, 2D) = [h_mu | h_s]
    x = torch.rand(b, d, generator=g, dtype=torch.float64)
    lik = Gaussian(min_sigma=1e-3)
    assert lik.num_params() == 2
    h = params.numpy()
    loc, scale = _sigmoid(h[:, :d]), 1e-3 + np.logaddexp(0.0, h[:, d:])
    ref = scipy.stats.norm.logpdf(x.numpy(), loc, scale).sum(axis=1)
    np.testing.assert_allclose(lik.distribution(params).log_prob(x).numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(lik.mean(params).numpy(), loc, rtol=1e-14)


def test_gaussian_fixed_sigma_matches_scipy():
    g = torch.Generator().manual_seed(2)
    params = torch.randn(4, 5, generator=g, dtype=torch.float64)  # (B, D)
    x = torch.rand(4, 5, generator=g, dtype=torch.float64)
    lik = Gaussian(sigma=0.1)
    assert lik.num_params() == 1
    ref = scipy.stats.norm.logpdf(x.numpy(), _sigmoid(params.numpy()), 0.1).sum(axis=1)
    np.testing.assert_allclose(lik.distribution(params).log_prob(x).numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize(
    "lik",
    [Gaussian(), Gaussian(sigma=0.2), Gaussian(scale="log_variance")],
    ids=["learned", "fixed", "logvar"],
)
def test_gaussian_density_integrates_to_one(lik):
    params = torch.tensor([0.4, -1.7][: lik.num_params()], dtype=torch.float64)  # one pixel
    dist = lik.distribution(params)
    loc, scale = dist.base_dist.loc.item(), dist.base_dist.scale.item()
    total, _ = scipy.integrate.quad(
        lambda v: math.exp(dist.log_prob(torch.tensor([v], dtype=torch.float64)).item()),
        loc - 40 * scale,
        loc + 40 * scale,
        points=[loc],
        epsabs=1e-12,
        limit=200,
    )
    assert total == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_scale_floor_holds_for_adversarial_outputs(dtype):
    big = torch.finfo(dtype).max
    raw = torch.tensor([1e4, -1e4, 1e30, -1e30, -big, big, -float("inf"), 0.0], dtype=dtype)
    params = torch.cat([raw, raw.flip(0)]).unsqueeze(0)  # (1, 2D): h_mu and h_s both adversarial
    lik = Gaussian(min_sigma=1e-3)
    dist = lik.distribution(params)
    scale = dist.base_dist.scale
    assert (scale >= torch.tensor(1e-3, dtype=dtype)).all()
    assert scale[0, 1].item() == pytest.approx(1e-3, rel=1e-6)  # h_s = -inf -> exactly the floor
    x = torch.rand(1, raw.numel(), dtype=dtype)
    assert torch.isfinite(dist.log_prob(x)).all()


def test_gaussian_log_variance_scale_is_aevbs():
    """scale=log_variance: sigma = exp(h_s / 2), no floor (AEVB Appendix C.2), against torch's Normal."""
    g = torch.Generator().manual_seed(3)
    b, d = 4, 5
    params = 3 * torch.randn(b, 2 * d, generator=g, dtype=torch.float64)  # (B, 2D) = [h_mu | h_s]
    params[0, d:] = torch.tensor([-30.0, -10.0, 0.0, 10.0, 30.0], dtype=torch.float64)  # far from any floor
    x = torch.rand(b, d, generator=g, dtype=torch.float64)
    lik = Gaussian(scale="log_variance")
    assert lik.num_params() == 2
    ref = torch.distributions.Normal(torch.sigmoid(params[:, :d]), torch.exp(0.5 * params[:, d:]))
    torch.testing.assert_close(
        lik.distribution(params).log_prob(x), ref.log_prob(x).sum(-1), rtol=1e-14, atol=0
    )
    torch.testing.assert_close(lik.mean(params), torch.sigmoid(params[:, :d]), rtol=0, atol=0)
    assert lik.distribution(params).base_dist.scale[0, 0].item() == pytest.approx(math.exp(-15.0), rel=1e-14)
    # a known answer: h_mu = 0, h_s = log 0.04 (mu 0.5, sigma 0.2), x = 0.7: -1/2 - log 0.2 - log(2 pi) / 2
    one = torch.tensor([0.0, math.log(0.04)], dtype=torch.float64)
    value = lik.distribution(one).log_prob(torch.tensor([0.7], dtype=torch.float64)).item()
    assert value == pytest.approx(-0.5 - math.log(0.2) - 0.5 * math.log(2 * math.pi), rel=1e-12)
    assert value == pytest.approx(0.19049937922943, rel=1e-12)


def test_gaussian_scale_default_is_softplus():
    """Without scale (a checkpoint written before it existed): the softplus scale, min_sigma + softplus(h)."""
    old = get_likelihood(name="gaussian", sigma=None, min_sigma=0.01)
    assert old.scale == Gaussian().scale == "softplus" and old.config()["scale"] == "softplus"
    h = torch.tensor([0.3, -2.0], dtype=torch.float64)
    assert old.distribution(h).base_dist.scale.item() == pytest.approx(0.01 + math.log1p(math.exp(-2.0)))


def test_gaussian_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sigma"):
        Gaussian(sigma=0.0)
    with pytest.raises(ValueError, match="min_sigma"):
        Gaussian(min_sigma=-1.0)
    with pytest.raises(ValueError, match="unknown scale 'exp'; allowed: softplus, log_variance"):
        Gaussian(scale="exp")
    with pytest.raises(ValueError, match="scale=log_variance is for a learned sigma"):
        Gaussian(sigma=0.1, scale="log_variance")
    with pytest.raises(ValueError, match="min_sigma=0.001 is the floor of scale=softplus"):
        Gaussian(min_sigma=1e-3, scale="log_variance")
    # accepted and ignored before: a run labelled with a floor its fixed sigma never had
    with pytest.raises(
        ValueError, match="min_sigma=0.5 is the floor of a learned sigma; a fixed sigma=0.1 has none"
    ):
        Gaussian(sigma=0.1, min_sigma=0.5)
    with pytest.raises(ValueError, match="2 \\* D"):
        Gaussian().distribution(torch.zeros(2, 5))


# --- every likelihood -----------------------------------------------------------------------------


ALL = [
    Bernoulli(),
    Bernoulli(allow_improper=True),
    Gaussian(),
    Gaussian(sigma=0.5),
    Gaussian(scale="log_variance"),
    ContinuousBernoulli(),
]


def test_every_registered_likelihood_is_among_those_every_test_here_runs_on():
    assert {type(lik) for lik in ALL} == set(REGISTRY.values())


@pytest.mark.parametrize("lik", ALL, ids=repr)
@pytest.mark.parametrize("batch", [(), (4,), (3, 4)])
def test_log_prob_is_one_number_per_example(lik, batch):
    d = 6
    params = torch.randn(*batch, lik.num_params() * d, dtype=torch.float64)
    x = torch.bernoulli(torch.full((*batch, d), 0.5, dtype=torch.float64))  # {0,1} lies in every support
    dist = lik.distribution(params)
    assert dist.batch_shape == batch and dist.event_shape == (d,)
    lp = dist.log_prob(x)
    assert lp.shape == batch
    # summed over pixels: equals the per-pixel base log-probs summed
    torch.testing.assert_close(lp, dist.base_dist.log_prob(x).sum(-1))
    assert lik.mean(params).shape == (*batch, d)


@pytest.mark.parametrize("lik", ALL, ids=repr)
def test_config_round_trip(lik):
    cfg = lik.config()
    json.dumps(cfg)
    rebuilt = get_likelihood(**cfg)
    assert type(rebuilt) is type(lik) and rebuilt.config() == cfg
    assert REGISTRY[cfg["name"]] is type(lik)


def test_space_rules_of_continuous_likelihoods():
    for lik in (Gaussian(), ContinuousBernoulli()):
        assert lik.natural_space == "continuous"
        lik.check_space("continuous")
        assert not lik.is_improper("continuous")
        with pytest.raises(ValueError, match=f"{lik.name}.*binary.*continuous"):
            lik.check_space("binary")
    with pytest.raises(ValueError, match="binary, continuous"):
        Bernoulli().check_space("greyscale")
    assert DATA_SPACES == ("binary", "continuous")


def test_registry_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="bernoulli, continuous_bernoulli, gaussian"):
        get_likelihood("laplace")
    with pytest.raises(ValueError, match="sigmaa"):
        get_likelihood("gaussian", sigmaa=0.1)
    # a likelihood without options says so, not object.__init__'s (*args, **kwargs)
    with pytest.raises(ValueError, match=r"unknown option\(s\) sigma; accepted: \(none\)$"):
        get_likelihood("continuous_bernoulli", sigma=0.1)
    assert get_likelihood("gaussian", sigma=0.3).config() == {
        "name": "gaussian",
        "sigma": 0.3,
        "min_sigma": 1e-2,
        "scale": "softplus",
    }


def test_cb_samples_follow_the_distribution_and_carry_gradients():
    """rsample draws from the continuous Bernoulli (mean and a CDF value against numerical integration of
    its density) and is reparameterised: d sample / d logit is finite."""
    etas = [-4.0, -0.3, 0.0, 2.5]
    logits = torch.tensor(etas, dtype=torch.float64, requires_grad=True)
    dist = CBDistribution(logits=logits)
    torch.manual_seed(0)
    x = dist.rsample((200_000,))  # (N, 4)
    assert x.shape == (200_000, 4) and ((x >= 0) & (x <= 1)).all()
    for j, eta in enumerate(etas):
        one = CBDistribution(logits=torch.tensor([eta], dtype=torch.float64))

        def density(v, one=one):
            return math.exp(one.log_prob(torch.tensor([v], dtype=torch.float64)).item())

        below_03, _ = scipy.integrate.quad(density, 0.0, 0.3)
        # 200,000 draws: the SE of a mean in [0, 1] is < 0.0012, of a fraction < 0.0012
        assert x[:, j].mean().item() == pytest.approx(one.mean.item(), abs=0.005)
        assert (x[:, j] < 0.3).double().mean().item() == pytest.approx(below_03, abs=0.005)
    (grad,) = torch.autograd.grad(x.sum(), logits)
    assert torch.isfinite(grad).all()
    # a larger logit moves every draw up (at eta = 0 exactly, torch's inverse CDF is its series in u alone,
    # whose derivative in eta it does not carry: 0 there)
    assert (grad[[0, 1, 3]] > 0).all()


def test_a_learned_sigma_without_a_floor_is_refused_on_data_that_are_not_dequantized(tmp_path):
    """On float or bool pixels, which may sit exactly on a value, a Gaussian whose sigma is learned without
    a floor has an unbounded density (+49 nats a pixel at mu = 0, log sigma^2 = -100, and more below); on
    dequantized 8-bit levels, and with a floor or a fixed sigma, every likelihood is bounded."""
    from vaerepro.data import check_bounded
    from vaerepro.formats import DataError

    unfloored = Gaussian(scale="log_variance")
    assert float(unfloored.distribution(torch.tensor([[-60.0, -100.0]])).log_prob(torch.zeros(1, 1))) > 49
    with pytest.raises(ValueError, match="likelihood.scale=log_variance .* not dequantized"):
        unfloored.check_data(dequantized=False)
    unfloored.check_data(dequantized=True)
    for bounded in (Gaussian(), Gaussian(sigma=0.3), ContinuousBernoulli(), Bernoulli()):
        bounded.check_data(dequantized=False)
    with pytest.raises(DataError, match=rf"^{tmp_path}: likelihood.scale=log_variance"):
        check_bounded(unfloored, "continuous", False, tmp_path)  # float data: the stages refuse it
    check_bounded(unfloored, "continuous", True, tmp_path)  # uint8 levels, dequantized


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_continuous_bernoulli_draws_follow_its_cdf_at_every_logit(dtype):
    """rsample's inverse CDF in logit space against the exact CDF F(x) = expm1(eta x) / expm1(eta): a
    Kolmogorov-Smirnov distance below 0.012 for 50,000 draws (its 1e-4 critical value is ~0.0087 x 1.36),
    at logits where torch's own sampler clamps (|eta| = 30, 60: it drew from |eta| ~ 16 in float32)."""
    torch.manual_seed(0)
    eta = torch.tensor([-60.0, -30.0, -3.0, -1e-6, 0.0, 1e-5, 2.0, 30.0, 60.0], dtype=dtype)
    x = CBDistribution(logits=eta).rsample((50_000,))  # (50000, 9)
    assert x.dtype == dtype and bool(((x >= 0) & (x <= 1)).all())
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)  # (201,)
    e = eta.double()[:, None]  # (9, 1)
    small = e.abs() < 1e-8
    exact = torch.where(small, grid, torch.expm1(e * grid) / torch.expm1(torch.where(small, 1.0, e)))
    ordered = x.double().T.sort(dim=1).values.contiguous()  # (9, 50000)
    empirical = torch.searchsorted(ordered, grid.expand(len(eta), -1).contiguous(), right=True) / len(x)
    assert float((empirical - exact).abs().max()) < 0.012


def test_continuous_bernoulli_draws_are_the_inverse_cdf_of_their_uniforms():
    """Each draw against F^-1(u) = log1p(u expm1(eta)) / eta (u at eta = 0) in 40-digit mpmath, for the very
    uniforms u rsample drew (the global RNG, reseeded): in every branch, the first-order series below
    |eta| = 1e-4 included, where F^-1(u) - u = eta u (1 - u) / 2 + O(eta^2) is below any distribution test."""
    etas = [-30.0, -3.0, -1e-3, -5e-5, 0.0, 5e-5, 2.0, 30.0]
    torch.manual_seed(0)
    x = CBDistribution(logits=torch.tensor(etas, dtype=torch.float64)).rsample((200,))  # (200, 8)
    torch.manual_seed(0)
    u = torch.rand((200, len(etas)), dtype=torch.float64)
    with mp.workdps(40):
        for j, eta in enumerate(etas):
            for i in range(0, 200, 5):
                ui = mp.mpf(float(u[i, j]))
                exact = ui if eta == 0 else mp.log1p(ui * mp.expm1(eta)) / eta
                assert float(x[i, j]) == pytest.approx(float(exact), abs=1e-10), (eta, float(ui))


def test_bernoulli_and_cb_log_prob_equal_torchs_formula_to_the_last_bit():
    """BernoulliPixels sums -BCE over the pixels and negates once, CBDistribution subtracts the BCE from
    log C: the same numbers as torch's Independent(Bernoulli).log_prob and -BCE + log C, bit for bit, for
    decoder outputs (K, B, D) against pixels (B, D) as the importance sampler calls them."""
    torch.manual_seed(0)
    logits = 8 * torch.randn(16, 5, 784)  # (K, B, D)
    x = torch.bernoulli(torch.full((5, 784), 0.3))  # (B, D)
    p = get_likelihood("bernoulli").distribution(logits)
    assert isinstance(p, BernoulliPixels) and p.batch_shape == (16, 5) and p.event_shape == (784,)
    ref = torch.distributions.Independent(torch.distributions.Bernoulli(logits=logits), 1).log_prob(x)
    assert torch.equal(p.log_prob(x), ref)
    grey = torch.rand(5, 784)
    improper = get_likelihood("bernoulli", allow_improper=True).distribution(logits)
    ref = torch.distributions.Bernoulli(logits=logits, validate_args=False).log_prob(grey).sum(-1)
    assert torch.equal(improper.log_prob(grey), ref)
    with pytest.raises(ValueError, match="support"):
        p.log_prob(grey)  # a proper Bernoulli still refuses grey levels
    wide = p.expand((3, 16, 5))
    assert isinstance(wide, BernoulliPixels) and torch.equal(wide.log_prob(x)[2], p.log_prob(x))
    cb = get_likelihood("continuous_bernoulli").distribution(logits)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, grey.expand_as(logits), reduction="none"
    )
    assert torch.equal(cb.log_prob(grey), (-bce + cb_log_norm(logits)).sum(-1))
