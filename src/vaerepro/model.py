"""The VAE network: MLP encoder q(z|x), standard-normal prior p(z), MLP decoder p(x|z). No losses here.

Objectives and log p(x) estimates are pure functions of a model in ``estimators.py``. ``vae.config`` holds
the JSON-able constructor arguments, so a checkpoint rebuilds the model with ``build_vae(config)`` (for one
stochastic layer that is ``VAE(**config)``).

``TwoLayerVAE``: IWAE's model with two stochastic layers (Burda et al. 2016, 5.1), z = [z1 | z2]. To the
estimators it is a VAE whose z is the concatenation: its q(z|x) (``HierarchicalPosterior``) samples z1 and
then z2 given z1, its p(z) (``HierarchicalPrior``) is p(z1|z2) p(z2), and its decoder reads z1.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import (
    Distribution,
    Independent,
    MultivariateNormal,
    Normal,
    constraints,
    kl_divergence,
    register_kl,
)

from vaerepro.likelihoods import Likelihood, get_likelihood

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,  # AEVB (Kingma & Welling 2014) and IWAE use tanh
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
}


# How the linear layers start (config model.init), n_in x n_out each: torch's nn.Linear init (default:
# weights and biases U(-1/sqrt(n_in), 1/sqrt(n_in))), Glorot & Bengio 2010's uniform (glorot: weights
# U(-a, a), a = sqrt(6 / (n_in + n_out)), as IWAE 5.1) or N(0, std^2) (normal: AEVB 5's "N(0, 0.01)");
# glorot and normal zero the biases.
INITS = ("default", "glorot", "normal")


def initialise(module: nn.Module, init: str, std: float = 0.01) -> None:
    """Re-draw the parameters of every nn.Linear in `module` by `init` (one of INITS), in place, from torch's
    global generator: "glorot", Glorot & Bengio's uniform weights and zero biases (IWAE 5.1); "normal",
    weights and biases from N(0, std^2) (AEVB 5: "all parameters ... initialized by random sampling from
    N(0, 0.01)"). "default" leaves the module as constructed (torch's init, no draws)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; allowed: {', '.join(INITS)}")
    if init == "default":
        return
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            if init == "glorot":  # gain 1: Glorot & Bengio's bound, whatever the activation
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
            else:
                nn.init.normal_(layer.weight, mean=0.0, std=std)
                nn.init.normal_(layer.bias, mean=0.0, std=std)


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return int(value)


def _sizes(value, what: str) -> list[int]:
    """A sequence of integers >= 1 (hidden layer sizes), as a list."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{what} must be a sequence of integers >= 1, got {value!r}")
    return [_positive_int(h, f"each of {what}") for h in value]


def _dropout(value) -> float:
    """A dropout probability: a real number in [0, 1) (1 would drop every unit)."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and 0 <= value < 1):
        raise ValueError(f"dropout must be a number in [0, 1), got {value!r}")
    return float(value)


def mlp(sizes: Sequence[int], activation: str, dropout: float = 0.0) -> nn.Sequential:
    """Linear layers sizes[0] -> sizes[1] -> ... with the activation between them (not after the last).

    `dropout` > 0: ``nn.Dropout(dropout)`` after every hidden layer's activation, none on the input or the
    output layer, as the continuous-Bernoulli code has it (cunningham-lab/cb_and_cc utils.py
    ``encoder_mnist`` and ``decoder_mnist_*``: ``tf.nn.dropout(hid, keep_prob)`` after each ReLU dense layer,
    keep_prob 0.9 in training and 1.0 in evaluation; here torch's train/eval mode). Both scale the kept units
    by 1 / (1 - dropout) in training, so that eval mode needs no rescaling. The activation and its
    dropout share the activation's slot, ``nn.Sequential(activation, Dropout)``, so that the Linear layers
    keep their indices 0, 2, 4, ... and a state_dict has the same keys with dropout as without (Dropout
    holds no parameters). 0: no Dropout module at all, the network as it was before the option existed.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
    dropout = _dropout(dropout)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i > 0:
            act = ACTIVATIONS[activation]()
            layers.append(nn.Sequential(act, nn.Dropout(dropout)) if dropout > 0 else act)
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class DiagonalGaussian(Independent):
    """N(mu, diag(exp(logvar))) over the last dimension: ``Independent(Normal(mu, exp(logvar / 2)), 1)``
    that also keeps ``logvar`` (B, Z), the encoder's output, so that its KL to ``StandardNormal`` is the
    closed form of AEVB's Appendix B on it (see ``_kl_diagonal_standard``)."""

    def __init__(self, mu: Tensor, logvar: Tensor, validate_args: bool | None = None):
        base = Normal(mu, torch.exp(0.5 * logvar), validate_args=validate_args)
        super().__init__(base, 1, validate_args=validate_args)
        self.logvar = logvar

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        return DiagonalGaussian(self.mean.expand(shape), self.logvar.expand(shape), self._validate_args)


class StandardNormal(Independent):
    """N(0, I) in ``zeros.shape[-1]`` dimensions, on the device and dtype of ``zeros``."""

    def __init__(self, zeros: Tensor, validate_args: bool | None = None):
        base = Normal(zeros, torch.ones_like(zeros), validate_args=validate_args)
        super().__init__(base, 1, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return StandardNormal(
            self.mean.expand(torch.Size(batch_shape) + self.event_shape), self._validate_args
        )


@register_kl(DiagonalGaussian, StandardNormal)
def _kl_diagonal_standard(q: DiagonalGaussian, p: StandardNormal) -> Tensor:
    """KL(N(mu, diag(sigma^2)) || N(0, I)) = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2), (B,), nats.

    Written from the encoder's log sigma^2 directly: four element-wise ops, where torch's generic
    Normal-Normal KL (the same value) takes ten, dividing by the prior's unit scale and taking log sigma^2
    back from sigma.
    """
    return 0.5 * (q.mean.pow(2) + q.logvar.exp() - 1 - q.logvar).sum(-1)


# kl_divergence memoises its dispatch per (type(p), type(q)). Resolved once here, the pair is in the memo when
# torch.compile traces an objective (trainer.compile): the dispatch's search of the registry cannot be traced
# and would split the objective's graph in two. (A register_kl elsewhere empties the memo: the objective still
# runs, in two graphs.)
kl_divergence(DiagonalGaussian(torch.zeros(1), torch.zeros(1)), StandardNormal(torch.zeros(1)))


class VAE(nn.Module):
    """Gaussian-encoder VAE with an MLP encoder and decoder (AEVB default: one hidden layer of 500 units).

    One stochastic layer: z = the latent, of ``latent_dim`` units (``z_dim``).

    Encoder: x (B, D) -> [mu | logvar] (B, 2Z), logvar = log sigma^2 of the diagonal posterior.
    Decoder: z (..., Z) -> raw outputs (..., P*D) handed to the likelihood (P outputs per pixel); its hidden
    sizes are ``hidden_dims`` reversed.
    ``dropout``: the probability of zeroing each hidden unit after its activation, in training mode only
    (``mlp``); evaluation runs the model in eval mode, where dropout is the identity.
    """

    stochastic_layers = 1

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (500,),
        activation: str = "tanh",
        likelihood: Mapping | None = None,
        init: str = "default",
        init_std: float = 0.01,
        dropout: float = 0.0,
    ):
        super().__init__()
        data_dim = _positive_int(data_dim, "data_dim")
        latent_dim = _positive_int(latent_dim, "latent_dim")
        hidden = _sizes(hidden_dims, "hidden_dims")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; allowed: {', '.join(INITS)}")
        real = isinstance(init_std, numbers.Real) and not isinstance(init_std, bool)
        if not (real and 0 < init_std < math.inf):
            raise ValueError(f"init_std must be a finite number > 0, got {init_std!r}")
        dropout = _dropout(dropout)
        if likelihood is None:
            likelihood = {"name": "bernoulli"}
        if not isinstance(likelihood, Mapping) or "name" not in likelihood:
            raise ValueError(f"likelihood must be a dict with a 'name' key, got {likelihood!r}")

        self.likelihood: Likelihood = get_likelihood(**dict(likelihood))
        # torch.distributions' argument and support checks on q(z|x), p(z) and p(x|z) (None: torch's
        # process-wide default). Training sets False: the config's data-space check and `prepare`'s
        # validation already guarantee them, and re-checking every batch costs a small model's step time.
        self.validate_args: bool | None = None
        self.data_dim = data_dim
        self.latent_dim = latent_dim
        self.dropout = dropout
        # Normalised constructor kwargs (lists, full likelihood config) so VAE(**config) rebuilds this model.
        self.config: dict = {
            "data_dim": data_dim,
            "latent_dim": latent_dim,
            "hidden_dims": list(hidden),
            "activation": activation,
            "likelihood": self.likelihood.config(),
            "init": init,
            "init_std": float(init_std),
            "dropout": dropout,
        }
        self.encoder = mlp([data_dim, *hidden, 2 * latent_dim], activation, dropout)
        self.decoder = mlp(
            [latent_dim, *reversed(hidden), self.likelihood.num_params() * data_dim], activation, dropout
        )
        # after torch's init of both (its draws come first whatever `init` is): encoder, then decoder
        initialise(self, init, init_std)

    @property
    def z_dim(self) -> int:
        """The width Z of a sample z of q(z|x), and of its standard-normal noise eps."""
        return self.latent_dim

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws z ~ p(z) (n, Z) from `generator` (torch's global RNG if None), on the model's device and
        dtype: torch.randn((n, Z)) here."""
        ref = next(self.parameters())
        return torch.randn((n, self.z_dim), generator=generator, device=ref.device, dtype=ref.dtype)

    def posterior_params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, D) -> mu (B, Z), logvar (B, Z) of q(z|x)."""
        h = self.encoder(x)  # (B, 2Z)
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar

    def posterior(self, x: Tensor) -> Distribution:
        """q(z|x) = N(mu, diag(exp(logvar))): batch_shape (B,), event_shape (Z,)."""
        return DiagonalGaussian(*self.posterior_params(x), validate_args=self.validate_args)

    def prior(self) -> Distribution:
        """p(z) = N(0, I): batch_shape (), event_shape (Z,), on the model's device and dtype."""
        ref = next(self.parameters())
        zeros = torch.zeros(self.latent_dim, device=ref.device, dtype=ref.dtype)
        return StandardNormal(zeros, validate_args=self.validate_args)

    def decoder_params(self, z: Tensor) -> Tensor:
        """z (..., Z) -> raw decoder outputs (..., P*D)."""
        # the MLP on a 2-D (K*B, Z) batch: nn.Linear on 3-D input takes a slower path (matmul, then a
        # separate bias add, forward and backward)
        return self.decoder(z.reshape(-1, z.shape[-1])).reshape(*z.shape[:-1], -1)

    def decode(self, z: Tensor) -> Distribution:
        """z (..., Z) -> p(x|z): batch_shape z.shape[:-1], event_shape (D,)."""
        return self.likelihood.distribution(self.decoder_params(z), self.validate_args)


# --- two stochastic layers -------------------------------------------------------------------------------


def _layer_sample(q: Distribution, eps: Tensor) -> Tensor:
    """mean + L eps for one Gaussian layer: diagonal (``Independent(Normal)``) or full covariance
    (``MultivariateNormal``, L its Cholesky factor); eps broadcasts against q's batch."""
    if isinstance(q, Independent) and isinstance(q.base_dist, Normal):
        return q.base_dist.loc + eps * q.base_dist.scale
    if isinstance(q, MultivariateNormal):
        return q.loc + (q.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
    raise ValueError(f"a layer of a hierarchical distribution must be Gaussian, got {type(q).__name__}")


class HierarchicalPosterior(Distribution):
    """q(z|x) = q(z1|x) q(z2|z1) over z = [z1 | z2] (..., Z1 + Z2): batch (B,), event (Z1 + Z2,).

    ``q1``: q(z1|x), a Gaussian with batch (B,), event (Z1,); ``conditional``: z1 (..., Z1) -> q(z2|z1), a
    Gaussian with batch z1.shape[:-1], event (Z2,) (diagonal or full covariance, each). Sampled
    ancestrally and reparameterised: ``reparameterize(eps)`` maps standard-normal noise eps (..., B,
    Z1 + Z2) to z1 = mean1 + L1 eps[..., :Z1], then z2 = mean2(z1) + L2(z1) eps[..., Z1:] (the hook that
    ``estimators.reparameterize`` calls). ``log_prob(z)`` = log q(z1|x) + log q(z2|z1); for the z that the
    last ``reparameterize`` returned it reuses that call's q(z2|z1) instead of running the network again.
    No closed-form mean or KL: estimator B does not apply.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, q1: Distribution, conditional, latent_dim_2: int, validate_args: bool | None = None):
        self.q1, self.conditional, self.split = q1, conditional, q1.event_shape[0]
        self._last: tuple[Tensor, Distribution] | None = None  # (z, q(z2|z1)) of the last reparameterize
        event = torch.Size([self.split + latent_dim_2])
        super().__init__(q1.batch_shape, event, validate_args=validate_args)

    @property
    def dtype(self) -> torch.dtype:
        return self.q1.mean.dtype

    def reparameterize(self, eps: Tensor) -> Tensor:
        """z (..., B, Z1 + Z2) from noise eps of that shape, differentiable w.r.t. both layers."""
        z1 = _layer_sample(self.q1, eps[..., : self.split])
        q2 = self.conditional(z1)
        z = torch.cat([z1, _layer_sample(q2, eps[..., self.split :])], dim=-1)
        self._last = (z, q2)
        return z

    def rsample(self, sample_shape=()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        return self.reparameterize(torch.randn(shape, dtype=self.dtype, device=self.q1.mean.device))

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        z1, z2 = value[..., : self.split], value[..., self.split :]
        q2 = self._last[1] if self._last is not None and value is self._last[0] else self.conditional(z1)
        return self.q1.log_prob(z1) + q2.log_prob(z2)


class HierarchicalPrior(Distribution):
    """p(z) = p(z1|z2) p(z2) over z = [z1 | z2] (..., Z1 + Z2): batch (), event (Z1 + Z2,).

    ``top``: p(z2), batch (), event (Z2,); ``conditional``: z2 (..., Z2) -> p(z1|z2), a Gaussian with batch
    z2.shape[:-1], event (Z1,). ``reparameterize(eps)``: z2 = mean + L eps[..., Z1:], then z1 from p(z1|z2)
    with eps[..., :Z1]; ``sample`` draws eps from torch's global RNG.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, top: Distribution, conditional, latent_dim_1: int, validate_args: bool | None = None):
        self.top, self.conditional, self.split = top, conditional, latent_dim_1
        event = torch.Size([latent_dim_1 + top.event_shape[0]])
        super().__init__(torch.Size(), event, validate_args=validate_args)

    def reparameterize(self, eps: Tensor) -> Tensor:
        z2 = _layer_sample(self.top, eps[..., self.split :])
        return torch.cat([_layer_sample(self.conditional(z2), eps[..., : self.split]), z2], dim=-1)

    def rsample(self, sample_shape=()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        return self.reparameterize(torch.randn(shape, dtype=self.top.mean.dtype, device=self.top.mean.device))

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        z1, z2 = value[..., : self.split], value[..., self.split :]
        return self.top.log_prob(z2) + self.conditional(z2).log_prob(z1)


class TwoLayerVAE(VAE):
    """IWAE's two stochastic layers (Burda et al. 2016, 5.1, Appendix C): z1 (``latent_dim`` units) and z2
    (``latent_dim_2``), z = [z1 | z2] of ``z_dim`` = Z1 + Z2 units.

    Recognition: q(z1|x) by the encoder (x -> ``hidden_dims`` -> [mu1 | logvar1], as ``VAE``'s), q(z2|z1)
    by ``encoder_2`` (z1 -> ``hidden_dims_2`` -> [mu2 | logvar2]); both diagonal Gaussians.
    Generative: p(z2) = N(0, I), p(z1|z2) a diagonal Gaussian by ``decoder_2`` (z2 -> ``hidden_dims_2``
    reversed -> [mu | logvar]), p(x|z1) by the decoder (as ``VAE``'s, on z1).
    IWAE's MNIST model: hidden_dims [200, 200], latent_dim 100, hidden_dims_2 [100, 100], latent_dim_2 50
    (yburda/iwae experiments.py: latent_units [100, 50]). Its Gaussian layers compute sigma = exp(linear);
    here a linear layer computes log sigma^2, the same family. ``posterior_params(x)`` is q(z1|x)'s.
    Modules and init draws: encoder, decoder (as ``VAE``), then encoder_2, decoder_2. ``dropout`` acts in
    all four MLPs alike (IWAE uses none).
    """

    stochastic_layers = 2

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        latent_dim_2: int,
        hidden_dims_2: Sequence[int],
        hidden_dims: Sequence[int] = (500,),
        activation: str = "tanh",
        likelihood: Mapping | None = None,
        init: str = "default",
        init_std: float = 0.01,
        dropout: float = 0.0,
        stochastic_layers: int = 2,
    ):
        if stochastic_layers != 2:
            raise ValueError(f"TwoLayerVAE has stochastic_layers=2, got {stochastic_layers!r}")
        latent_dim_2 = _positive_int(latent_dim_2, "latent_dim_2")
        hidden_2 = _sizes(hidden_dims_2, "hidden_dims_2")
        super().__init__(data_dim, latent_dim, hidden_dims, activation, likelihood, init, init_std, dropout)
        self.latent_dim_2 = latent_dim_2
        self.config.update(stochastic_layers=2, latent_dim_2=latent_dim_2, hidden_dims_2=list(hidden_2))
        z1, d = self.latent_dim, self.dropout
        self.encoder_2 = mlp([z1, *hidden_2, 2 * latent_dim_2], activation, d)  # q(z2|z1)
        self.decoder_2 = mlp([latent_dim_2, *reversed(hidden_2), 2 * z1], activation, d)  # p(z1|z2)
        initialise(self.encoder_2, init, init_std)
        initialise(self.decoder_2, init, init_std)

    @property
    def z_dim(self) -> int:
        return self.latent_dim + self.latent_dim_2

    def _gaussian(self, net: nn.Module, h: Tensor) -> DiagonalGaussian:
        out = net(h.reshape(-1, h.shape[-1])).reshape(*h.shape[:-1], -1)  # a 2-D batch, as decoder_params
        mu, logvar = out.chunk(2, dim=-1)
        return DiagonalGaussian(mu, logvar, validate_args=self.validate_args)

    def posterior_2(self, z1: Tensor) -> Distribution:
        """q(z2|z1): batch z1.shape[:-1], event (Z2,)."""
        return self._gaussian(self.encoder_2, z1)

    def prior_1(self, z2: Tensor) -> Distribution:
        """p(z1|z2): batch z2.shape[:-1], event (Z1,)."""
        return self._gaussian(self.decoder_2, z2)

    def posterior(self, x: Tensor) -> Distribution:
        """q(z|x) = q(z1|x) q(z2|z1): batch (B,), event (Z1 + Z2,)."""
        q1 = super().posterior(x)
        return HierarchicalPosterior(q1, self.posterior_2, self.latent_dim_2, self.validate_args)

    def prior(self) -> Distribution:
        """p(z) = p(z1|z2) N(z2; 0, I): batch (), event (Z1 + Z2,), on the model's device and dtype."""
        ref = next(self.parameters())
        top = StandardNormal(
            torch.zeros(self.latent_dim_2, device=ref.device, dtype=ref.dtype), self.validate_args
        )
        return HierarchicalPrior(top, self.prior_1, self.latent_dim, self.validate_args)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws z ~ p(z) (n, Z1 + Z2), ancestrally (z2, then z1 given z2), noise from `generator`."""
        with torch.no_grad():
            return self.prior().reparameterize(super().sample_prior(n, generator))

    def decoder_params(self, z: Tensor) -> Tensor:
        """z (..., Z1 + Z2), or z1 (..., Z1) alone -> raw decoder outputs (..., P*D): p(x|z) reads z1."""
        return super().decoder_params(z[..., : self.latent_dim])


MODELS: dict[int, type[VAE]] = {1: VAE, 2: TwoLayerVAE}


def bytes_per_pair(vae: VAE) -> int:
    """Bytes of activations per (importance sample, example) pair of a chunk of evaluation (evaluate's
    auto sizes), or per image of a validation batch (datamodule.resolve_val_batch_size).

    Per pair: z and its noise (2 Z), each hidden layer's output before and after the activation (2 h), the
    decoder's output (P D) and the likelihood's elementwise terms (~2 P D); with two stochastic layers also
    q(z2|z1)'s and p(z1|z2)'s hidden layers (2 h each, in both networks) and Gaussian parameters
    (2 Z2 + 2 Z1). float32 or the model's dtype.
    """
    cfg = vae.config
    outputs = vae.likelihood.num_params() * cfg["data_dim"]  # P D
    floats = 2 * vae.z_dim + 2 * sum(cfg["hidden_dims"]) + 3 * outputs
    if vae.stochastic_layers == 2:
        floats += 4 * sum(cfg["hidden_dims_2"]) + 2 * vae.z_dim
    return floats * next(vae.parameters()).element_size()


def build_vae(config: Mapping) -> VAE:
    """The model a ``vae.config`` (a checkpoint's vae_config) describes: ``VAE`` or, for
    ``stochastic_layers`` 2, ``TwoLayerVAE``; a config without the key has one stochastic layer."""
    kwargs = dict(config)
    layers = kwargs.get("stochastic_layers", 1)
    if layers not in MODELS:
        raise ValueError(f"stochastic_layers must be 1 or 2, got {layers!r}")
    if layers == 1:
        kwargs.pop("stochastic_layers", None)
    return MODELS[layers](**kwargs)
