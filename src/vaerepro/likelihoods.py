"""Decoder likelihoods p(x|z): raw decoder outputs -> a ``torch.distributions`` object.

Each likelihood turns the decoder's raw outputs ``params`` of shape ``(..., P*D)`` (P = ``num_params()``
outputs per pixel) into ``Independent(base, 1)`` with batch shape ``(...)`` and event shape ``(D,)``, so
``log_prob(x)`` is one log-likelihood per example, summed over pixels, in nats.

Each likelihood also declares the data space it is a proper density/mass function on (``natural_space``);
using Bernoulli on continuous (grey-level) data is allowed only on request and is then *improper*: its
numbers are not log-likelihoods and are never ranked against proper ones (``compare.py``).

Likelihoods are chosen by name through one registry (``get_likelihood``), never by string comparison
elsewhere, but for one estimate: ``reproductions.judge.estimate_seconds``, which must not import torch,
counts a learned-sigma Gaussian's two decoder outputs by name. Each name here also has its schema section in
``config.LikelihoodConfig`` and its option ``conf/likelihood/<name>.yaml`` (tests/test_config.py checks).
"""

from __future__ import annotations

import abc
import inspect
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Bernoulli as _TorchBernoulli
from torch.distributions import Distribution, Independent, constraints
from torch.distributions import Normal as _TorchNormal
from torch.distributions.utils import broadcast_all

# The data spaces a model can see (data.to_space makes them): the one list of their names, which data and
# config import. binary: points of {0,1}^D; continuous: points of [0, 1]^D.
DATA_SPACES = ("binary", "continuous")


def space_name(data_space: str, improper: bool) -> str:
    """The name a run's numbers in its data space's unit go under: 'binary', 'continuous', or 'improper' (a
    Bernoulli on grey levels: no unit). MLflow names them binary/test/log_px, DVC's metrics binary.log_px."""
    return "improper" if improper else data_space


def _check_known_space(space: str) -> None:
    if space not in DATA_SPACES:
        raise ValueError(f"unknown data space {space!r}; known data spaces: {', '.join(DATA_SPACES)}")


class Likelihood(abc.ABC):
    """A decoder output distribution over one example of D pixels."""

    name: ClassVar[str]  # registry key
    natural_space: ClassVar[str]  # "binary" or "continuous": where this is a proper likelihood

    @abc.abstractmethod
    def num_params(self) -> int:
        """Decoder outputs per pixel (1 or 2)."""

    @abc.abstractmethod
    def _base(self, params: Tensor, validate_args: bool | None) -> Distribution:
        """Per-pixel distribution from params (..., P*D): batch_shape (..., D); validate_args as torch's."""

    @abc.abstractmethod
    def mean(self, params: Tensor) -> Tensor:
        """(..., P*D) raw decoder outputs -> (..., D) expected pixel value (reconstructions, samples)."""

    @abc.abstractmethod
    def config(self) -> dict:
        """JSON-able constructor kwargs incl. ``"name"``; ``get_likelihood(**lik.config())`` rebuilds it."""

    def distribution(self, params: Tensor, validate_args: bool | None = None) -> Distribution:
        """(..., P*D) raw decoder outputs -> p(x|z): batch_shape (...), event_shape (D,).

        ``log_prob(x)`` of the result sums over the D pixels: one number per example, in nats.
        validate_args: torch's (None: its process-wide default; False skips the argument and support checks).
        """
        self._split_dim(params)  # shape check with a clear message
        return Independent(self._base(params, validate_args), 1, validate_args=validate_args)

    @property
    def variant(self) -> str:
        """What tells this likelihood apart from others of its name ("" for none): a Gaussian's fixed sigma,
        its log-variance scale or another floor; a fixed-sigma and a learned-sigma Gaussian are two models."""
        return ""

    @property
    def label(self) -> str:
        """The name with its variant, as the reports and run names tell likelihoods apart:
        'gaussian (sigma=0.1)', 'gaussian (log_variance)', 'continuous_bernoulli'."""
        return f"{self.name} ({self.variant})" if self.variant else self.name

    def allowed_spaces(self) -> tuple[str, ...]:
        return (self.natural_space,)

    def is_improper(self, space: str) -> bool:
        """True when this likelihood is not a normalised density/mass function on data of ``space``."""
        _check_known_space(space)
        return False

    def check_space(self, space: str) -> None:
        """Raise ``ValueError`` unless this likelihood may be used on data of ``space``."""
        _check_known_space(space)
        if space not in self.allowed_spaces():
            raise ValueError(
                f"likelihood {self.name!r} cannot be used on {space!r} data: allowed data spaces are "
                f"{', '.join(self.allowed_spaces())} (its natural space is {self.natural_space!r})"
            )

    def check_data(self, dequantized: bool) -> None:  # noqa: B027 - a default, not abstract: most are bounded
        """Raise ``ValueError`` if this likelihood's density is unbounded on the data: ``dequantized`` says
        whether they are uniformly dequantized 8-bit levels (data.is_dequantized), else points that may sit
        exactly on a value (float or bool data in [0, 1]). Every likelihood is bounded on both but a
        Gaussian with a learned scale and no floor."""

    def _split_dim(self, params: Tensor) -> int:
        """Number of pixels D from the decoder width P*D."""
        width = params.shape[-1] if params.dim() > 0 else 0
        p = self.num_params()
        if width == 0 or width % p != 0:
            raise ValueError(
                f"likelihood {self.name!r} expects the last dimension of params to be {p} * D "
                f"(D >= 1 pixels), got shape {tuple(params.shape)}"
            )
        return width // p

    def __repr__(self) -> str:
        kwargs = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({kwargs})"


class BernoulliPixels(Independent):
    """p(x|z) of D Bernoulli pixels, ``Independent(Bernoulli(logits), 1)``: batch (...), event (D,).

    ``log_prob`` is the same formula as torch's ``Bernoulli.log_prob`` (the negative binary cross-entropy
    with logits) summed over the D pixels, negated once per example where torch negates each pixel's term:
    one pass fewer over the (K, B, D) logits of an importance-sampled chunk, the same numbers (negation is
    exact). At eval scale that pass is about a quarter of the likelihood's time: a (128, 100, 784) float32
    chunk's log_prob takes 84 ms instead of 113 ms on one CPU thread (2026-11-30).
    """

    def __init__(self, base: _TorchBernoulli, validate_args: bool | None = None):
        super().__init__(base, 1, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> BernoulliPixels:
        # torch's idiom for a subclass: Independent.expand fills the instance made here
        new = self._get_checked_instance(BernoulliPixels, _instance)
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)  # Distribution's own support and shape check, as Bernoulli's
        logits, value = broadcast_all(self.base_dist.logits, value)  # (..., D) each; value expanded, no copy
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)  # (...)


class Bernoulli(Likelihood):
    """Pixel-wise Bernoulli with logits = decoder outputs (AEVB/IWAE on binarised data).

    On grey-level data x in [0, 1] the formula ``x*logit - softplus(logit)`` (negative binary cross-entropy)
    is still computed, but it is not a normalised density on [0, 1] (the continuous Bernoulli's point), so
    this is refused unless ``allow_improper=True`` and flagged by ``is_improper("continuous")``.
    """

    name = "bernoulli"
    natural_space = "binary"

    def __init__(self, allow_improper: bool = False):
        self.allow_improper = bool(allow_improper)

    def num_params(self) -> int:
        return 1

    def _checks(self, validate_args: bool | None) -> bool | None:
        # torch's support check would reject grey levels; when the improper use is allowed, switch it off so
        # log_prob evaluates x*logit - softplus(logit) for any x in [0, 1].
        return False if self.allow_improper else validate_args

    def _base(self, params: Tensor, validate_args: bool | None) -> Distribution:
        return _TorchBernoulli(logits=params, validate_args=self._checks(validate_args))

    def distribution(self, params: Tensor, validate_args: bool | None = None) -> Distribution:
        self._split_dim(params)
        return BernoulliPixels(self._base(params, validate_args), validate_args=self._checks(validate_args))

    def mean(self, params: Tensor) -> Tensor:
        self._split_dim(params)
        return torch.sigmoid(params)

    def allowed_spaces(self) -> tuple[str, ...]:
        return DATA_SPACES if self.allow_improper else (self.natural_space,)

    def is_improper(self, space: str) -> bool:
        _check_known_space(space)
        return space == "continuous"

    def check_space(self, space: str) -> None:
        _check_known_space(space)
        if space == "continuous" and not self.allow_improper:
            raise ValueError(
                "likelihood 'bernoulli' on 'continuous' (grey-level) data is not a normalised likelihood; "
                "allowed data spaces: binary. Use 'continuous_bernoulli' or 'gaussian', or opt in with "
                "allow_improper: true (its numbers are then marked improper and never ranked)."
            )

    def config(self) -> dict:
        return {"name": self.name, "allow_improper": self.allow_improper}


# How a learned Gaussian scale comes from the decoder's raw output h_s (per pixel; sigma in units of x):
# softplus: sigma = min_sigma + softplus(h_s), floored at min_sigma (this project's default);
# log_variance: h_s = log sigma^2, sigma = exp(h_s / 2), no floor (AEVB, Kingma & Welling 2014: Appendix
# C.2's Gaussian MLP, log sigma^2 = W h + b; its Frey Face decoder). Without a floor the density of a
# pixel at exactly 0 (or 1) is unbounded: mu -> 0 and sigma -> 0 send log p to +inf. So it runs only on
# uniformly dequantised 8-bit data, (v + u) / 256 (data.to_space), whose expected log-density is bounded;
# float or bool data, whose pixels may sit exactly on a value, are refused (Gaussian.check_data).
GAUSSIAN_SCALES = ("softplus", "log_variance")
DEFAULT_MIN_SIGMA = 1e-2  # the softplus floor's default (conf/likelihood/gaussian.yaml says why)


class Gaussian(Likelihood):
    """Pixel-wise Gaussian with mean ``sigmoid(h_mu)`` (pixels live in [0, 1]).

    ``sigma=None``: learned per-pixel scale, 2 decoder outputs per pixel laid out as ``[h_mu | h_s]``
    (each (..., D)); ``scale`` says how h_s becomes sigma (``GAUSSIAN_SCALES``):

    - ``softplus`` (default): ``sigma = min_sigma + softplus(h_s)``. The floor ``sigma >= min_sigma`` holds
      for any decoder output (softplus >= 0, no NaN for +-1e30 or -inf): without it the density on [0, 1]
      data is unbounded and the likelihood can diverge.
    - ``log_variance``: ``sigma = exp(h_s / 2)``, AEVB's Frey Face decoder; no floor, so ``min_sigma`` is
      unused and must keep its default (a changed value is refused rather than silently ignored).

    ``sigma=float``: fixed scale for every pixel (Doersch's tutorial: sigma acts as the weight of the
    reconstruction term), 1 decoder output per pixel; ``scale`` must then be ``softplus`` (unused).
    """

    name = "gaussian"
    natural_space = "continuous"

    def __init__(
        self, sigma: float | None = None, min_sigma: float = DEFAULT_MIN_SIGMA, scale: str = "softplus"
    ):
        if sigma is not None:
            sigma = float(sigma)
            if not (math.isfinite(sigma) and sigma > 0):
                raise ValueError(f"gaussian likelihood: sigma must be > 0 and finite, or None; got {sigma}")
        min_sigma = float(min_sigma)
        if not (math.isfinite(min_sigma) and min_sigma > 0):
            raise ValueError(f"gaussian likelihood: min_sigma must be positive and finite, got {min_sigma}")
        if scale not in GAUSSIAN_SCALES:
            raise ValueError(
                f"gaussian likelihood: unknown scale {scale!r}; allowed: {', '.join(GAUSSIAN_SCALES)}"
            )
        if scale == "log_variance" and sigma is not None:
            raise ValueError(
                f"gaussian likelihood: scale=log_variance is for a learned sigma, not a fixed sigma={sigma}"
            )
        if sigma is not None and min_sigma != DEFAULT_MIN_SIGMA:
            raise ValueError(
                f"gaussian likelihood: min_sigma={min_sigma} is the floor of a learned sigma; a fixed "
                f"sigma={sigma} has none, leave min_sigma at its default"
            )
        if scale == "log_variance" and min_sigma != DEFAULT_MIN_SIGMA:
            raise ValueError(
                f"gaussian likelihood: min_sigma={min_sigma} is the floor of scale=softplus; "
                "scale=log_variance has no floor (AEVB Appendix C.2), leave min_sigma at its default"
            )
        self.sigma = sigma
        self.min_sigma = min_sigma
        self.scale = scale

    @property
    def variant(self) -> str:
        """'sigma=0.1' (fixed), 'log_variance' (learned, no floor), 'min_sigma=0.001' (learned, another
        floor), or '' for the default, a learned sigma with the floor DEFAULT_MIN_SIGMA."""
        if self.sigma is not None:
            return f"sigma={self.sigma:g}"
        if self.scale == "log_variance":
            return "log_variance"
        return "" if self.min_sigma == DEFAULT_MIN_SIGMA else f"min_sigma={self.min_sigma:g}"

    def num_params(self) -> int:
        return 1 if self.sigma is not None else 2

    def check_data(self, dequantized: bool) -> None:
        if self.sigma is None and self.scale == "log_variance" and not dequantized:
            raise ValueError(
                "likelihood.scale=log_variance (a learned sigma without a floor) on data that are not "
                "dequantized 8-bit levels (float or bool pixels): its density at a pixel exactly on a value "
                "is unbounded, so the objective can diverge and log p(x) means nothing. Use "
                "likelihood.scale=softplus (sigma >= likelihood.min_sigma), or store the pixels as uint8 "
                "0..255, which are dequantized"
            )

    def _loc_scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        d = self._split_dim(params)
        if self.sigma is not None:
            loc = torch.sigmoid(params)  # (..., D)
            scale = torch.full_like(loc, self.sigma)
        else:
            loc = torch.sigmoid(params[..., :d])  # (..., D)
            h_s = params[..., d:]  # (..., D)
            if self.scale == "log_variance":
                scale = torch.exp(0.5 * h_s)  # h_s = log sigma^2; > 0 unless h_s < ~-200 (float32 underflow)
            else:
                scale = self.min_sigma + F.softplus(h_s)  # >= min_sigma everywhere
        return loc, scale

    def _base(self, params: Tensor, validate_args: bool | None) -> Distribution:
        loc, scale = self._loc_scale(params)
        return _TorchNormal(loc, scale, validate_args=validate_args)

    def mean(self, params: Tensor) -> Tensor:
        return self._loc_scale(params)[0]

    def config(self) -> dict:
        return {"name": self.name, "sigma": self.sigma, "min_sigma": self.min_sigma, "scale": self.scale}


# --- continuous Bernoulli ----------------------------------------------------------------------------------
#
# p(x | lambda) = C(lambda) lambda^x (1 - lambda)^(1 - x) on [0, 1] (Loaiza-Ganem & Cunningham 2019), with
# C(lambda) = 2 artanh(1 - 2 lambda) / (1 - 2 lambda). In terms of eta = logit(lambda),
# C = eta / tanh(eta / 2): even in eta, C(0) = 2. We work in logit space because that is what the decoder
# outputs; going through lambda = sigmoid(eta) first throws away precision near 0.5 and saturates at 0/1.
#
# |eta| >= _CB_TAYLOR_BELOW: log C = log a - log(-expm1(-a)) + log1p(exp(-a)), a = |eta|, i.e.
#   log(a * coth(a / 2)); every piece is well conditioned for a away from 0 and finite up to a = 1e30.
# |eta| <  _CB_TAYLOR_BELOW: log C = log 2 + log(x coth x), x = eta / 2, by its Taylor series
#   sum_n c_n x^(2n), c_n = 2^(2n) (2^(2n) - 2) B_(2n) / (2n (2n)!), radius of convergence pi / 2.
#
# The threshold 0.5 (x <= 0.25) with 10 terms was tuned against mpmath: the truncation error is < 1e-16
# relative and the closed form's cancellation (log a vs log(-expm1(-a)), both ~log a) is < 2e-7 relative
# in float32 at a >= 0.5; its *gradient* cancels worse (relative error ~ eps / a), so a larger threshold than
# torch-style 1e-2 keeps float32 gradients accurate to ~3e-6 (vs ~4e-3 at 1e-2).
#
# torch's own ContinuousBernoulli switches to a 2-term Taylor series only for lambda in (0.499, 0.501) and
# works from lambda: just outside that window, in float32, log|log1p(-p) - log p| loses ~1e-5 relative.
_CB_TAYLOR_BELOW = 0.5
_CB_LOG_NORM_COEFS = (  # c_1..c_10 of log(x coth x) = sum_n c_n x^(2n); checked against mpmath in the tests
    0.3333333333333333,
    -0.07777777777777778,
    0.021869488536155203,
    -0.00671957671957672,
    0.0021848110736999624,
    -0.0007384225938017826,
    0.00025656491264956874,
    -9.098826077765802e-05,
    3.277917723116302e-05,
    -1.1956444309602021e-05,
)
_CB_MEAN_COEFS = (  # m_1..m_8 of (coth x - 1/x) / 2 = sum_n m_n x^(2n-1), m_n = 2^(2n) B_(2n) / (2 (2n)!)
    0.16666666666666666,
    -0.011111111111111112,
    0.0010582010582010583,
    -0.00010582010582010582,
    1.0688899577788467e-05,
    -1.0822021404031986e-06,
    1.0962973925936889e-07,
    -1.1107304394989839e-08,
)


def _poly(t: Tensor, coefs: tuple[float, ...]) -> Tensor:
    """coefs[0] + coefs[1] t + coefs[2] t^2 + ... (Horner)."""
    acc = torch.full_like(t, coefs[-1])
    for c in reversed(coefs[:-1]):
        acc = acc * t + c
    return acc


def _split_small(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Double-``where`` inputs: (small mask, eta safe for the series, eta safe for the closed form).

    ``torch.where`` evaluates both branches and backpropagates ``0 * d(branch)`` into the one not taken;
    if that branch is NaN/inf at the input (closed form at eta = 0: 0/0; series at eta = 1e30: overflow)
    the zero times NaN poisons the gradient. So each branch only ever sees inputs it is finite on.
    """
    small = logits.abs() < _CB_TAYLOR_BELOW
    eta_series = torch.where(small, logits, torch.zeros_like(logits))
    eta_closed = torch.where(small, torch.full_like(logits, 2 * _CB_TAYLOR_BELOW), logits)
    return small, eta_series, eta_closed


def cb_log_norm(logits: Tensor) -> Tensor:
    """log C(lambda) of the continuous Bernoulli, lambda = sigmoid(logits), computed in logit space.

    Elementwise; finite value and gradient for every finite logit, eta = 0 (lambda = 0.5) included.
    Relative error vs 50-digit mpmath: < 1e-15 in float64, < 2e-7 in float32 (see the tests).
    """
    small, eta_series, eta_closed = _split_small(logits)
    x = 0.5 * eta_series
    t = x * x
    series = math.log(2.0) + t * _poly(t, _CB_LOG_NORM_COEFS)
    a = eta_closed.abs()
    closed = torch.log(a) - torch.log(-torch.expm1(-a)) + torch.log1p(torch.exp(-a))
    return torch.where(small, series, closed)


def cb_mean(logits: Tensor) -> Tensor:
    """E[x] of the continuous Bernoulli in logit space: 1 / (1 - exp(-eta)) - 1 / eta (1/2 at eta = 0).

    Same double-``where`` split as ``cb_log_norm``; near 0 the series 1/2 + (coth x - 1/x) / 2, x = eta/2.
    """
    small, eta_series, eta_closed = _split_small(logits)
    x = 0.5 * eta_series
    series = 0.5 + x * _poly(x * x, _CB_MEAN_COEFS)
    # with a = |eta| and s = 1 / (exp(a) - 1) written as exp(-a) / -expm1(-a) (no overflow, so no inf * 0
    # in the backward pass for eta -> -inf): E[x] = 1 + s - 1/a for eta > 0 and 1/a - s for eta < 0
    a = eta_closed.abs()
    s = torch.exp(-a) / -torch.expm1(-a)
    closed = torch.where(eta_closed > 0, 1.0 + s - 1.0 / a, 1.0 / a - s)
    return torch.where(small, series, closed)


class CBDistribution(Distribution):
    """The continuous Bernoulli on [0, 1] with its log-normaliser and mean computed in logit space.

    log p(x | eta) = x eta - softplus(eta) + log C(eta) (the negative binary cross-entropy plus
    ``cb_log_norm``). torch's ContinuousBernoulli computes log C from ``probs`` with a 2-term Taylor window
    (0.499, 0.501), which in float32 loses ~1e-5 relative just outside the window, and from logits it first
    squashes them through a clamped sigmoid (float32, |logit| = 30: 19 % relative error in log C). Its
    sampler clamps too: above |eta| ~ 16 in float32 (~36 in float64) it draws from |eta| ~ 16, a mean of
    0.063 where eta = -30 has 0.033. So sampling is the inverse CDF in logit space too (``rsample``).
    """

    arg_constraints = {"logits": constraints.real}
    support = constraints.unit_interval
    has_rsample = True

    def __init__(
        self, probs: Tensor | None = None, logits: Tensor | None = None, validate_args: bool | None = None
    ):
        if (probs is None) == (logits is None):
            raise ValueError("CBDistribution: give exactly one of probs or logits")
        if logits is None:
            probs = torch.as_tensor(probs)
            logits = torch.log(probs) - torch.log1p(-probs)  # exact float lambda -> eta
        self.logits = torch.as_tensor(logits)
        super().__init__(batch_shape=self.logits.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> CBDistribution:
        return CBDistribution(logits=self.logits.expand(batch_shape), validate_args=self._validate_args)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)  # Distribution's own check, for its subclasses
        logits, value = torch.broadcast_tensors(self.logits, value.to(self.logits.dtype))
        # log C - BCE, not -BCE + log C: the same numbers, without negating every (K, B, D) term first
        return cb_log_norm(logits) - F.binary_cross_entropy_with_logits(logits, value, reduction="none")

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:  # noqa: B008 - torch's signature
        """Inverse-CDF draws, differentiable in the logits: with u ~ U(0, 1) and F(x) = expm1(eta x) /
        expm1(eta), x = log1p(u expm1(eta)) / eta for eta < 0 and 1 + log(u + (1 - u) e^-eta) / eta for
        eta > 0 (the same, written so that neither overflows), and x = u + eta u (1 - u) / 2 for
        |eta| < 1e-4 (its first-order series, where the quotients lose precision)."""
        shape = self._extended_shape(sample_shape)
        eta = self.logits.expand(shape)
        u = torch.rand(shape, dtype=eta.dtype, device=eta.device).clamp(torch.finfo(eta.dtype).tiny, 1.0)
        small = eta.abs() < 1e-4
        safe = torch.where(small, torch.ones_like(eta), eta)  # no 0/0 in the unused branch (nor its gradient)
        negative = torch.log1p(u * torch.expm1(-safe.abs())) / -safe.abs()
        positive = 1 + torch.log(u + (1 - u) * torch.exp(-safe.abs())) / safe.abs()
        x = torch.where(safe < 0, negative, positive)
        return torch.where(small, u + eta * u * (1 - u) / 2, x).clamp(0.0, 1.0)

    def log_norm(self) -> Tensor:
        """log C(eta), elementwise (``cb_log_norm``)."""
        return cb_log_norm(self.logits)

    @property
    def mean(self) -> Tensor:
        return cb_mean(self.logits)


class ContinuousBernoulli(Likelihood):
    """Pixel-wise continuous Bernoulli (Loaiza-Ganem & Cunningham 2019), logits = decoder outputs.

    The properly normalised counterpart of the Bernoulli/BCE loss on grey-level data in [0, 1].
    ``mean`` is the distribution's expectation, not sigmoid(logits).
    """

    name = "continuous_bernoulli"
    natural_space = "continuous"

    def num_params(self) -> int:
        return 1

    def _base(self, params: Tensor, validate_args: bool | None) -> Distribution:
        return CBDistribution(logits=params, validate_args=validate_args)

    def mean(self, params: Tensor) -> Tensor:
        self._split_dim(params)
        return cb_mean(params)

    def config(self) -> dict:
        return {"name": self.name}


REGISTRY: dict[str, type[Likelihood]] = {cls.name: cls for cls in (Bernoulli, Gaussian, ContinuousBernoulli)}


def get_likelihood(name: str, **options) -> Likelihood:
    """Build a likelihood by registry name; ``get_likelihood(**lik.config())`` round-trips."""
    if name not in REGISTRY:
        raise ValueError(f"unknown likelihood {name!r}; allowed: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    # the constructor's named parameters; a likelihood without options has object's (*args, **kwargs)
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(cls.__init__).parameters.values()
    accepted = [p.name for p in params if p.name != "self" and p.kind in named]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"likelihood {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) if accepted else '(none)'}"
        )
    return cls(**options)
