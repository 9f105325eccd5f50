"""VAE network: shapes, distributions it returns, rebuild from its config, argument checks."""

import json
import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence

from vaerepro.model import (
    VAE,
    DiagonalGaussian,
    HierarchicalPosterior,
    HierarchicalPrior,
    StandardNormal,
    TwoLayerVAE,
    build_vae,
    mlp,
)

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


# --- two stochastic layers (IWAE 5.1) ----------------------------------------------------------------------

Z2 = 2


def make2(**kwargs):
    torch.manual_seed(0)
    kwargs = {"hidden_dims": (7,), "hidden_dims_2": (6, 4), **kwargs}
    return TwoLayerVAE(data_dim=D, latent_dim=Z, latent_dim_2=Z2, **kwargs).double()


def _gaussian_log_prob(z, mu, logvar):
    return (-0.5 * ((z - mu) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi))).sum(-1)


def test_two_layer_shapes_and_densities_by_hand():
    """q(z|x) over z = [z1 | z2] (Z1 + Z2,), sampled z1 then z2 | z1; log q = log q(z1|x) + log q(z2|z1),
    log p(z) = log p(z1|z2) + log N(z2; 0, I), each written out from the four MLPs; p(x|z) reads z1."""
    vae = make2(likelihood={"name": "gaussian"})
    assert (vae.latent_dim, vae.latent_dim_2, vae.z_dim, vae.stochastic_layers) == (Z, Z2, Z + Z2, 2)
    x = torch.rand(B, D, dtype=torch.float64).round()
    q = vae.posterior(x)
    assert isinstance(q, HierarchicalPosterior)
    assert q.batch_shape == (B,) and q.event_shape == (Z + Z2,)
    z = q.rsample((4,))
    assert z.shape == (4, B, Z + Z2) and z.requires_grad
    z1, z2 = z[..., :Z], z[..., Z:]
    mu1, logvar1 = vae.encoder(x).chunk(2, -1)
    mu2, logvar2 = vae.encoder_2(z1).chunk(2, -1)
    ref_q = _gaussian_log_prob(z1, mu1, logvar1) + _gaussian_log_prob(z2, mu2, logvar2)
    torch.testing.assert_close(q.log_prob(z), ref_q)  # the sampled z: q(z2|z1) reused
    torch.testing.assert_close(q.log_prob(z.clone()), ref_q)  # another tensor: q(z2|z1) recomputed
    # ancestral, reparameterised: z from given noise, layer by layer
    eps = torch.randn(3, B, Z + Z2, dtype=torch.float64)
    zs = q.reparameterize(eps)
    s1 = (0.5 * logvar1).exp()
    torch.testing.assert_close(zs[..., :Z], mu1 + s1 * eps[..., :Z])
    m2, lv2 = vae.encoder_2(zs[..., :Z]).chunk(2, -1)
    torch.testing.assert_close(zs[..., Z:], m2 + (0.5 * lv2).exp() * eps[..., Z:])
    assert torch.equal(vae.posterior_params(x)[0], mu1)  # q(z1|x)'s parameters

    p = vae.prior()
    assert isinstance(p, HierarchicalPrior) and p.batch_shape == () and p.event_shape == (Z + Z2,)
    pm, plv = vae.decoder_2(z2).chunk(2, -1)
    ref_p = _gaussian_log_prob(z1, pm, plv) + _gaussian_log_prob(
        z2, torch.zeros_like(z2), torch.zeros_like(z2)
    )
    torch.testing.assert_close(p.log_prob(z), ref_p)
    assert p.sample((5,)).shape == (5, Z + Z2)

    px = vae.decode(z)
    assert px.batch_shape == (4, B) and px.event_shape == (D,)
    moved = torch.cat([z1, z2 + 3.0], -1)  # another z2: the same p(x|z)
    assert torch.equal(vae.decode(moved).log_prob(x), px.log_prob(x))
    assert torch.equal(vae.decoder_params(z1), vae.decoder_params(z))  # z1 alone is read the same way


def test_two_layer_architecture_is_iwaes():
    """IWAE's MNIST model (yburda/iwae experiments.py): q: x -> 200-200 -> z1 (100) -> 100-100 -> z2 (50);
    p: z2 -> 100-100 -> z1 -> 200-200 -> x; every Gaussian layer has a mean and a log-variance head."""
    vae = TwoLayerVAE(
        data_dim=784, latent_dim=100, latent_dim_2=50, hidden_dims=[200, 200], hidden_dims_2=[100, 100]
    )

    def sizes(net):
        return [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)]

    assert sizes(vae.encoder) == [(784, 200), (200, 200), (200, 200)]
    assert sizes(vae.encoder_2) == [(100, 100), (100, 100), (100, 100)]
    assert sizes(vae.decoder_2) == [(50, 100), (100, 100), (100, 200)]
    assert sizes(vae.decoder) == [(100, 200), (200, 200), (200, 784)]
    assert all(sum(isinstance(m, nn.Tanh) for m in net) == 2 for net in (vae.encoder_2, vae.decoder_2))


@pytest.mark.parametrize("init", [{}, {"init": "glorot"}, {"init": "normal", "init_std": 0.05}])
def test_two_layer_rebuild_from_config(init):
    vae = make2(activation="elu", likelihood={"name": "gaussian", "sigma": 0.3}, **init)
    cfg = json.loads(json.dumps(vae.config))  # what a checkpoint stores
    assert cfg == vae.config
    assert (cfg["stochastic_layers"], cfg["latent_dim_2"], cfg["hidden_dims_2"]) == (2, Z2, [6, 4])
    for rebuilt in (build_vae(cfg), TwoLayerVAE(**cfg)):
        assert type(rebuilt) is TwoLayerVAE and rebuilt.config == vae.config
        rebuilt = rebuilt.double()
        rebuilt.load_state_dict(vae.state_dict())
        x = torch.rand(B, D, dtype=torch.float64).round()
        eps = torch.randn(3, B, Z + Z2, dtype=torch.float64)
        z = vae.posterior(x).reparameterize(eps)
        torch.testing.assert_close(rebuilt.posterior(x).reparameterize(eps), z, rtol=0, atol=0)
        torch.testing.assert_close(rebuilt.prior().log_prob(z), vae.prior().log_prob(z), rtol=0, atol=0)
    if init.get("init") == "glorot":
        assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in _linears(vae))
    with pytest.raises(TypeError):
        VAE(**cfg)  # a one-layer VAE does not take the second layer's arguments


def test_build_vae_rebuilds_a_one_layer_vae_unchanged():
    """A one-layer config (with or without stochastic_layers=1) builds VAE: the same draws, weights and
    config as VAE(**config)."""
    torch.manual_seed(0)
    ref = VAE(data_dim=D, latent_dim=Z, hidden_dims=(7,))
    after = torch.rand(3)
    for cfg in (ref.config, {**ref.config, "stochastic_layers": 1}):
        torch.manual_seed(0)
        built = build_vae(cfg)
        assert type(built) is VAE and built.config == ref.config and torch.equal(torch.rand(3), after)
        got, want = built.state_dict(), ref.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    with pytest.raises(ValueError, match="stochastic_layers must be 1 or 2"):
        build_vae({**ref.config, "stochastic_layers": 3})


def test_two_layer_bad_arguments_are_rejected():
    base = {"data_dim": 4, "latent_dim": 3, "latent_dim_2": 2, "hidden_dims_2": [5]}
    with pytest.raises(ValueError, match="latent_dim_2"):
        TwoLayerVAE(**{**base, "latent_dim_2": 0})
    with pytest.raises(ValueError, match="hidden_dims_2"):
        TwoLayerVAE(**{**base, "hidden_dims_2": [5, 0]})
    with pytest.raises(ValueError, match="hidden_dims_2"):
        TwoLayerVAE(**{**base, "hidden_dims_2": 5})
    with pytest.raises(ValueError, match="stochastic_layers=2"):
        TwoLayerVAE(**base, stochastic_layers=1)
    with pytest.raises(ValueError, match="latent_dim"):
        TwoLayerVAE(**{**base, "latent_dim": 0})


def test_sample_prior_draws_what_evaluate_draws_and_ancestrally_for_two_layers():
    """One layer: torch.randn((n, Z)) from the generator (evaluate.sample_images' prior samples). Two layers:
    z2 from N(0, I) and z1 from p(z1|z2), from the same generator's noise."""
    vae = VAE(data_dim=D, latent_dim=Z)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(vae.sample_prior(6, g), torch.randn(6, Z, generator=torch.Generator().manual_seed(3)))
    two = make2()
    z = two.sample_prior(6, torch.Generator().manual_seed(3))
    eps = torch.randn(6, Z + Z2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert z.shape == (6, Z + Z2) and not z.requires_grad
    torch.testing.assert_close(z[:, Z:], eps[:, Z:])
    m, lv = two.decoder_2(eps[:, Z:]).chunk(2, -1)
    torch.testing.assert_close(z[:, :Z], m + (0.5 * lv).exp() * eps[:, :Z])


def test_two_layer_estimators_and_a_training_step():
    """The estimators run on the two-layer model unchanged: log w is the written-out formula; estimator B
    is refused by name; a few Adam steps on the IWAE bound (k = 5) raise it and reach all four MLPs."""
    from vaerepro import estimators

    vae = make2(likelihood={"name": "gaussian", "sigma": 0.5})
    x = torch.rand(B, D, dtype=torch.float64)
    eps = torch.randn(5, B, Z + Z2, dtype=torch.float64)
    lw = estimators.log_weights(vae, x, 5, eps)
    z = lw.z
    q, p = vae.posterior(x), vae.prior()
    ref = vae.decode(z).log_prob(x) + p.log_prob(z) - q.log_prob(z)
    torch.testing.assert_close(lw.log_w, ref)
    torch.testing.assert_close(estimators.elbo(vae, x, 5, "A", eps), ref.mean(0))
    terms = estimators.elbo_terms(vae, x, 5, eps, estimator="A")
    torch.testing.assert_close(terms["elbo"], ref.mean(0))
    with pytest.raises(ValueError, match="estimator B needs KL"):
        estimators.elbo(vae, x, 1, "B")
    est = estimators.estimate_log_px(vae, x, 300, 64, generator_seed=0)
    assert est.log_px.shape == (B,) and est.log_px.dtype == torch.float64 and est.log_px.isfinite().all()

    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    eps = torch.randn(
        5, B, Z + Z2, dtype=torch.float64
    )  # fixed noise: the bound as a function of the weights
    before = estimators.iwae_bound(vae, x, 5, eps).mean().item()
    for step in range(20):
        opt.zero_grad()
        (-estimators.iwae_bound(vae, x, 5, eps).mean()).backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.parameters())
        opt.step()
    assert estimators.iwae_bound(vae, x, 5, eps).mean().item() > before + 1.0
