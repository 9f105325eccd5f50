"""The VAE network: MLP encoder q(z|x), standard-normal prior p(z), MLP decoder p(x|z). No losses here.

Objectives and log p(x) estimates are pure functions of a model in ``estimators.py``. ``vae.config`` holds
the JSON-able constructor arguments, so a checkpoint rebuilds the model with ``VAE(**config)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal, register_kl

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


def mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    """Linear layers sizes[0] -> sizes[1] -> ... with the activation between them (not after the last)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i > 0:
            layers.append(ACTIVATIONS[activation]())
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


class VAE(nn.Module):
    """Gaussian-encoder VAE with an MLP encoder and decoder (AEVB default: one hidden layer of 500 units).

    Encoder: x (B, D) -> [mu | logvar] (B, 2Z), logvar = log sigma^2 of the diagonal posterior.
    Decoder: z (..., Z) -> raw outputs (..., P*D) handed to the likelihood (P outputs per pixel); its hidden
    sizes are ``hidden_dims`` reversed.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (500,),
        activation: str = "tanh",
        likelihood: Mapping | None = None,
        init: str = "default",
        init_std: float = 0.01,
    ):
        super().__init__()
        data_dim = _positive_int(data_dim, "data_dim")
        latent_dim = _positive_int(latent_dim, "latent_dim")
        if isinstance(hidden_dims, str | bytes) or not isinstance(hidden_dims, Sequence):
            raise ValueError(f"hidden_dims must be a sequence of integers >= 1, got {hidden_dims!r}")
        hidden = [_positive_int(h, "each of hidden_dims") for h in hidden_dims]
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; allowed: {', '.join(INITS)}")
        real = isinstance(init_std, numbers.Real) and not isinstance(init_std, bool)
        if not (real and 0 < init_std < math.inf):
            raise ValueError(f"init_std must be a finite number > 0, got {init_std!r}")
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
        # Normalised constructor kwargs (lists, full likelihood config) so VAE(**config) rebuilds this model.
        self.config: dict = {
            "data_dim": data_dim,
            "latent_dim": latent_dim,
            "hidden_dims": list(hidden),
            "activation": activation,
            "likelihood": self.likelihood.config(),
            "init": init,
            "init_std": float(init_std),
        }
        self.encoder = mlp([data_dim, *hidden, 2 * latent_dim], activation)
        self.decoder = mlp(
            [latent_dim, *reversed(hidden), self.likelihood.num_params() * data_dim], activation
        )
        # after torch's init of both (its draws come first whatever `init` is): encoder, then decoder
        initialise(self, init, init_std)

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
