"""VAE network: shapes, distributions it returns, rebuild from its config, argument checks."""

import json
import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence

from vaerepro.model import VAE, DiagonalGaussian, StandardNormal, mlp

D, Z, B = 12, 3, 5


def make(**kwargs):
    torch.manual_seed(0)
    return VAE(data_dim=D, latent_dim=Z, **kwargs).double()


@pytest.mark.parametrize(
    "likelihood, params_per_pixel",
    [
        (None, 1),
        ({"name": "gaussian"}, 2),
        ({"name": "gaussian", "sigma": 0.1}, 1),
        ({"name": "continuous_bernoulli"}, 1),
    ],
)
def test_shapes_and_distributions(likelihood, params_per_pixel):
    vae = make(hidden_dims=(7, 4), likelihood=likelihood)
    x = torch.rand(B, D, dtype=torch.float64).round()
    mu, logvar = vae.posterior_params(x)
    assert mu.shape == (B, Z) and logvar.shape == (B, Z)

    q = vae.posterior(x)
    assert q.batch_shape == (B,) and q.event_shape == (Z,)
    # q is N(mu, exp(logvar)) with diagonal covariance: check its density at a point by hand
    z = torch.randn(B, Z, dtype=torch.float64)
    ref = (-0.5 * ((z - mu) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi))).sum(-1)
    torch.testing.assert_close(q.log_prob(z), ref)

    p = vae.prior()
    assert p.batch_shape == () and p.event_shape == (Z,)
    assert p.mean.dtype == torch.float64
    torch.testing.assert_close(
        p.log_prob(torch.zeros(Z, dtype=torch.float64)),
        torch.tensor(-0.5 * Z * math.log(2 * math.pi), dtype=torch.float64),
    )

    zs = torch.randn(4, B, Z, dtype=torch.float64)  # (K, B, Z)
    assert vae.decoder_params(zs).shape == (4, B, params_per_pixel * D)
    px = vae.decode(zs)
    assert px.batch_shape == (4, B) and px.event_shape == (D,)
    assert px.log_prob(x).shape == (4, B)  # x (B, D) broadcasts over the K samples


def test_architecture_follows_hidden_dims_and_activation():
    vae = make(hidden_dims=(9, 6), activation="relu", likelihood={"name": "gaussian"})
    enc = [(m.in_features, m.out_features) for m in vae.encoder if isinstance(m, nn.Linear)]
    dec = [(m.in_features, m.out_features) for m in vae.decoder if isinstance(m, nn.Linear)]
    assert enc == [(D, 9), (9, 6), (6, 2 * Z)]
    assert dec == [(Z, 6), (6, 9), (9, 2 * D)]  # decoder hidden sizes reversed; 2 outputs per pixel
    assert sum(isinstance(m, nn.ReLU) for m in vae.encoder) == 2  # between layers, not after the last
    # AEVB default: one hidden layer of 500 tanh units, Bernoulli decoder
    default = VAE(data_dim=D, latent_dim=Z)
    assert [m.out_features for m in default.encoder if isinstance(m, nn.Linear)] == [500, 2 * Z]
    assert sum(isinstance(m, nn.Tanh) for m in default.decoder) == 1
    assert default.likelihood.name == "bernoulli"


@pytest.mark.parametrize(
    "likelihood, init",
    [
        (None, {}),
        ({"name": "gaussian", "sigma": 0.3}, {"init": "glorot"}),
        ({"name": "continuous_bernoulli"}, {"init": "normal", "init_std": 0.05}),
    ],
)
def test_rebuild_from_config(likelihood, init):
    vae = make(hidden_dims=(8,), activation="elu", likelihood=likelihood, **init)
    assert vae.config["init"] == init.get("init", "default")
    assert vae.config["init_std"] == init.get("init_std", 0.01)
    cfg = json.loads(json.dumps(vae.config))  # what a checkpoint stores
    assert cfg == vae.config and isinstance(cfg["hidden_dims"], list)
    rebuilt = VAE(**cfg).double()
    rebuilt.load_state_dict(vae.state_dict())
    x = torch.rand(B, D, dtype=torch.float64).round()
    z = torch.randn(B, Z, dtype=torch.float64)
    torch.testing.assert_close(rebuilt.posterior_params(x), vae.posterior_params(x), rtol=0, atol=0)
    torch.testing.assert_close(rebuilt.decode(z).log_prob(x), vae.decode(z).log_prob(x), rtol=0, atol=0)
    assert rebuilt.config == vae.config


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="data_dim"):
        VAE(data_dim=0, latent_dim=2)
    with pytest.raises(ValueError, match="latent_dim"):
        VAE(data_dim=4, latent_dim=-1)
    with pytest.raises(ValueError, match="latent_dim"):
        VAE(data_dim=4, latent_dim=2.5)
    with pytest.raises(ValueError, match="hidden_dims"):
        VAE(data_dim=4, latent_dim=2, hidden_dims=(3, 0))
    with pytest.raises(ValueError, match="tanh, relu, softplus, elu"):
        VAE(data_dim=4, latent_dim=2, activation="sigmoid")
    with pytest.raises(ValueError, match="allowed: bernoulli, continuous_bernoulli, gaussian"):
        VAE(data_dim=4, latent_dim=2, likelihood={"name": "poisson"})
    with pytest.raises(ValueError, match="unknown init 'xavier'; allowed: default, glorot, normal"):
        VAE(data_dim=4, latent_dim=2, init="xavier")
    for bad in (0, -0.1, float("inf"), float("nan"), True, "0.01"):
        with pytest.raises(ValueError, match="init_std must be a finite number > 0"):
            VAE(data_dim=4, latent_dim=2, init="normal", init_std=bad)


def _linears(vae: VAE) -> list[nn.Linear]:
    return [m for m in vae.modules() if isinstance(m, nn.Linear)]


def test_default_init_is_torchs_and_draws_what_it_drew_before():
    """model.init=default: for a fixed seed, the same weights as the encoder and decoder MLPs built as
    before the key existed (torch's nn.Linear init, encoder first), and the global generator left where
    they leave it, so the default pipeline's numbers do not move."""
    torch.manual_seed(0)
    vae = VAE(data_dim=D, latent_dim=Z, hidden_dims=(7, 4), likelihood={"name": "gaussian"})
    after = torch.rand(3)
    torch.manual_seed(0)
    encoder, decoder = mlp([D, 7, 4, 2 * Z], "tanh"), mlp([Z, 4, 7, 2 * D], "tanh")
    assert torch.equal(torch.rand(3), after)
    expected = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    expected |= {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    got = vae.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert all(m.bias.abs().min() > 0 for m in _linears(vae))  # torch's biases are drawn, not zero


def test_glorot_init_has_glorots_bound_and_zero_biases():
    """U(-a, a), a = sqrt(6 / (n_in + n_out)) for every weight matrix (Glorot & Bengio 2010, IWAE 5.1):
    within the bound, reaching near it, with the uniform's variance a^2 / 3; every bias 0."""
    torch.manual_seed(0)
    vae = VAE(data_dim=300, latent_dim=10, hidden_dims=(200,), init="glorot")
    for layer in _linears(vae):
        w = layer.weight.detach().double()
        bound = math.sqrt(6 / (layer.in_features + layer.out_features))
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound, layer
        # the variance of n = w.numel() draws of U(-a, a): a^2 / 3, relative SE sqrt(0.8 / n) (<= 0.8 %)
        assert w.var().item() == pytest.approx(bound**2 / 3, rel=5 * math.sqrt(0.8 / w.numel()))
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_normal_init_draws_weights_and_biases_with_the_given_std():
    """N(0, init_std^2) for every parameter (AEVB: "all parameters"): sample std within 5 standard errors
    (sqrt(1 / 2n) relative), mean within 5 standard errors of 0, for the weights and for the biases. Another
    std scales the same draws."""
    stds = {}
    for std in (0.01, 0.1):
        torch.manual_seed(0)
        vae = VAE(data_dim=300, latent_dim=10, hidden_dims=(200,), init="normal", init_std=std)
        for kind in ("weight", "bias"):
            values = torch.cat([getattr(m, kind).detach().double().reshape(-1) for m in _linears(vae)])
            n = values.numel()
            assert values.std().item() == pytest.approx(std, rel=5 / math.sqrt(2 * n)), kind
            assert abs(values.mean().item()) < 5 * std / math.sqrt(n), kind
            stds[std, kind] = values
    for kind in ("weight", "bias"):  # the same draws, scaled: only std differs
        torch.testing.assert_close(stds[0.1, kind], 10 * stds[0.01, kind])


def test_posterior_prior_kl_is_the_closed_form_and_matches_torchs_generic_kl():
    """KL(q(z|x) || p(z)) uses the closed form on logvar (registered for DiagonalGaussian, StandardNormal):
    value and gradients equal torch's generic Normal-Normal KL on the same distributions, including for
    posteriors far from the prior."""
    vae = make()
    x = torch.rand(B, D, dtype=torch.float64).round()
    mu, logvar = vae.posterior_params(x)
    mu = (mu * 30).detach().requires_grad_()  # far from the prior too: |mu| up to tens,
    logvar = (logvar * 20).detach().requires_grad_()  # sigma^2 from ~e-20 to ~e+20
    q, p = DiagonalGaussian(mu, logvar), vae.prior()
    assert isinstance(p, StandardNormal)
    ours = kl_divergence(q, p)
    generic = kl_divergence(
        Independent(Normal(mu, torch.exp(0.5 * logvar)), 1),
        Independent(Normal(torch.zeros(Z, dtype=torch.float64), torch.ones(Z, dtype=torch.float64)), 1),
    )
    assert ours.shape == (B,)
    torch.testing.assert_close(ours, generic, rtol=1e-12, atol=1e-9)
    g_ours = torch.autograd.grad(ours.sum(), (mu, logvar))
    g_generic = torch.autograd.grad(generic.sum(), (mu, logvar))
    for a, b in zip(g_ours, g_generic, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the same distribution as torch's: density, samples' shape, expand
    z = torch.randn(B, Z, dtype=torch.float64)
    torch.testing.assert_close(q.log_prob(z), Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1))
    wide = q.expand((4, B))
    assert wide.batch_shape == (4, B) and torch.equal(wide.logvar[2], logvar)
    assert p.expand((3,)).batch_shape == (3,)


def test_prior_follows_the_model_device_and_dtype_and_a_step_after_inference_mode_trains():
    """p(z) is on the model's dtype, also after a move; asked for under torch.inference_mode (as Lightning's
    validation does) and then in training, a training step's backward through log p(z) (estimator A) works."""
    from vaerepro import estimators

    torch.manual_seed(0)
    vae = VAE(data_dim=D, latent_dim=Z, hidden_dims=(8,))
    x = torch.rand(B, D).round()
    with torch.inference_mode():
        assert vae.prior().mean.dtype == torch.float32
        estimators.elbo(vae, x, 2, "A")
    prior = vae.prior()
    assert prior.event_shape == (Z,) and not prior.mean.is_inference()
    torch.testing.assert_close(prior.log_prob(torch.zeros(Z)), torch.tensor(-0.5 * Z * math.log(2 * math.pi)))
    loss = -estimators.elbo(vae, x, 2, "A").mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vae.parameters())
    assert vae.double().prior().mean.dtype == torch.float64


def test_validate_args_reaches_the_posterior_and_the_decoder():
    """torch's checks run by default (grey levels are outside a Bernoulli's support; a NaN mean is not a
    real number) and none run with validate_args=False, as in training."""
    vae = VAE(4, 2)
    grey, z = torch.full((3, 4), 0.5), torch.zeros(3, 2)
    nan = torch.full((3, 4), float("nan"))
    with pytest.raises(ValueError, match="support"):
        vae.decode(z).log_prob(grey)
    with pytest.raises(ValueError, match="loc"):
        vae.posterior(nan)
    vae.validate_args = False
    assert torch.isfinite(vae.decode(z).log_prob(grey)).all()
    assert torch.isnan(vae.posterior(nan).mean).all()
