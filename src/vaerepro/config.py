"""The typed schema of the resolved configuration, and where it comes from.

Every stage reads one resolved config: `params.yaml` (written by `dvc exp run`, or `vaerepro params`) under
DVC, or the Hydra-composed config under `vaerepro run`. Both pass through `validate`, so a mistake fails at
once with the key, what was given and what is allowed, before any data is touched.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from vaerepro.errors import UserError
from vaerepro.likelihoods import DATA_SPACES, DEFAULT_MIN_SIGMA, GAUSSIAN_SCALES, REGISTRY, get_likelihood
from vaerepro.model import INITS
from vaerepro.schedules import LR_SCHEDULES
from vaerepro.sources import DEFAULT_MAX_NPZ_BYTES, SOURCES, SPLIT_KINDS, split_kind_error

PROJECT_MARKERS = ("dvc.yaml", "conf/config.yaml")

# A seed: what every generator it reaches accepts. Lightning's seed_everything replaces a seed outside
# numpy's legacy range [0, 2**32 - 1] with 0 (a warning, and another run under the same label).
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
# Upper bounds that name the key instead of failing later with an allocation error: far above any
# published VAE (AEVB: latent sizes 3..200, 500 hidden units).
MAX_LATENT_DIM = 10_000
MAX_HIDDEN = 100_000
# The allowed values of data.source and data.space, derived from their one definition (sources.SOURCES,
# likelihoods.DATA_SPACES): a bad value's error lists them, e.g. "Input should be 'auto', 'binary' or ...".
DataSource = Literal[SOURCES]
DataSpace = Literal[("auto", *DATA_SPACES)]  # auto: the likelihood's natural space
# torch.optim.Adam's defaults: the optimiser every run used before train.adam_betas / adam_eps existed
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
AdamBeta = Annotated[float, Field(ge=0, lt=1)]
# one candidate of train.lr_candidates: a learning rate, > 0 and finite
LearningRate = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names each bad key."""


def _numbers_only(annotation: Any) -> bool:
    """Whether a field's type holds numbers (int, float, Literal[1, 2], lists, unions of them), no bool."""

    def kinds(t: Any):
        if get_origin(t) is Literal:
            yield from (type(v) for v in get_args(t))
        elif get_args(t):
            for arg in get_args(t):
                yield from kinds(arg)
        else:
            yield t

    found = set(kinds(annotation))
    return bool(found & {int, float}) and bool not in found


def _no_bool_for_a_number(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    # pydantic reads true as 1 where a number is meant (`seed: true`, `model.latent_dim: yes`, hidden_dims
    # [true]): a mistake, not a number. Strings stay accepted: PyYAML reads 1e-3 as the string "1e-3"
    given = value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) for v in given) and _numbers_only(
        cls.model_fields[info.field_name].annotation
    ):
        raise PydanticCustomError("bool_for_number", "Input should be a number, not true or false")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    _no_bool = field_validator("*", mode="before")(_no_bool_for_a_number)


class _LikelihoodSection(BaseModel):
    # without _Section's validator of every key: pydantic refuses one before the discriminator `name`
    model_config = ConfigDict(extra="forbid", frozen=True)


# Data keys that leave the examples as they are: where the files are, a cap on their size, and the data
# space (the same images, drawn into another space, which checkpoints and comparisons record by themselves)
SAME_IMAGES_DATA_KEYS = ("space", "raw_dir", "url", "max_npz_bytes")


class DataConfig(_Section):
    source: DataSource = "mnist5k"
    path: str | None = None
    url: str | None = None
    raw_dir: str = "data"
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: Seed = 0
    max_examples: int | None = Field(None, ge=3)
    # the test split: pooled (every example of the source pooled, then cut by val/test_fraction) or official
    # (the source's own test set whole, in file order, e.g. MNIST's 10,000 t10k images; validation drawn
    # from its training files; test_fraction unused). official: sources.OFFICIAL_TEST_SOURCES only
    split: Literal[SPLIT_KINDS] = "pooled"
    # the validation split's size in examples, instead of val_fraction (IWAE: 400 of MNIST's 60,000)
    val_size: int | None = Field(None, ge=1)
    space: DataSpace = "auto"
    # Most bytes a user's .npz (source npz) may decompress to, x and y together; default 8 GiB. Checked from
    # the zip's headers before anything is decompressed: a small compressed file can expand to fill memory.
    max_npz_bytes: int = Field(DEFAULT_MAX_NPZ_BYTES, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        problem = split_kind_error(self.source, self.split)
        if problem:
            raise ValueError(problem)
        if self.split == "pooled" and self.val_size is None and self.val_fraction + self.test_fraction >= 1:
            total = self.val_fraction + self.test_fraction
            raise ValueError(f"val_fraction + test_fraction = {total:g} leaves no training data")
        if self.source == "npz" and not self.path:
            raise ValueError("source=npz needs data.path=/path/to/file.npz")
        if self.source != "npz" and self.path:  # else prepare would read the source and ignore the file
            raise ValueError(f"data.path is for your own .npz (data=npz), not data.source={self.source}")
        if self.source == "npz" and self.url:
            raise ValueError("data.url is for downloaded sources; your .npz is read from data.path")
        return self


class ModelConfig(_Section):
    latent_dim: int = Field(20, ge=1, le=MAX_LATENT_DIM)
    hidden_dims: list[Annotated[int, Field(ge=1, le=MAX_HIDDEN)]] = Field(
        default_factory=lambda: [500], min_length=1
    )
    activation: Literal["tanh", "relu", "softplus", "elu"] = "tanh"
    # every linear layer's parameters: torch's own (default), Glorot & Bengio 2010's uniform weights and
    # zero biases (glorot, IWAE 5.1), or weights and biases from N(0, init_std^2) (normal, AEVB 5)
    init: Literal[INITS] = "default"
    # standard deviation of init=normal's draw. AEVB writes "N(0, 0.01)" without saying whether 0.01 is the
    # standard deviation or the variance (its N(z; mu, sigma^2 I) suggests the variance, i.e. std 0.1)
    init_std: float = Field(0.01, gt=0, allow_inf_nan=False)
    # 2: IWAE's second stochastic layer (model.TwoLayerVAE) on top of the first: x -> hidden_dims -> z1
    # (latent_dim units) -> hidden_dims_2 -> z2 (latent_dim_2 units, the N(0, I) prior); IWAE's MNIST model:
    # hidden_dims [200, 200], latent_dim 100, hidden_dims_2 [100, 100], latent_dim_2 50. Both _2 keys are
    # needed with 2 layers and refused with 1
    stochastic_layers: Literal[1, 2] = 1
    latent_dim_2: int | None = Field(None, ge=1, le=MAX_LATENT_DIM)
    hidden_dims_2: list[Annotated[int, Field(ge=1, le=MAX_HIDDEN)]] | None = Field(None, min_length=1)
    # the probability of zeroing each hidden unit after its activation, in training only (model.mlp): the
    # continuous-Bernoulli code's keep_prob 0.9 is 0.1 (cunningham-lab/cb_and_cc utils.py encoder_mnist,
    # decoder_mnist_*). 0: no dropout layers at all
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        given = [k for k in ("latent_dim_2", "hidden_dims_2") if getattr(self, k) is not None]
        if self.stochastic_layers == 1 and given:
            keys = ", ".join(f"model.{k}" for k in given)
            raise ValueError(f"{keys}: for model.stochastic_layers=2 only (a second stochastic layer)")
        missing = [f"model.{k}" for k in ("latent_dim_2", "hidden_dims_2") if k not in given]
        if self.stochastic_layers == 2 and missing:
            raise ValueError(
                f"model.stochastic_layers=2 needs {' and '.join(missing)} (IWAE: 50, [100, 100])"
            )
        return self


class BernoulliConfig(_LikelihoodSection):
    name: Literal["bernoulli"]
    allow_improper: bool = False


class GaussianConfig(_LikelihoodSection):
    name: Literal["gaussian"]
    sigma: float | None = Field(None, gt=0)
    min_sigma: float = Field(DEFAULT_MIN_SIGMA, gt=0)
    # a learned sigma from the decoder's h: min_sigma + softplus(h), or exp(h / 2) (log_variance: AEVB's
    # Frey Face decoder, no floor); see likelihoods.GAUSSIAN_SCALES
    scale: Literal[GAUSSIAN_SCALES] = "softplus"

    _no_bool = field_validator("sigma", "min_sigma", mode="before")(_no_bool_for_a_number)

    @model_validator(mode="after")
    def _check(self) -> GaussianConfig:
        get_likelihood(**self.model_dump())  # the likelihood's own checks (ValueError), under this key
        return self


class ContinuousBernoulliConfig(_LikelihoodSection):
    name: Literal["continuous_bernoulli"]


LikelihoodConfig = Annotated[
    BernoulliConfig | GaussianConfig | ContinuousBernoulliConfig, Field(discriminator="name")
]


class TrainConfig(_Section):
    objective: Literal["elbo", "iwae"] = "elbo"
    estimator: Literal["A", "B"] = "B"
    num_samples: int = Field(1, ge=1)
    optimizer: Literal["adam", "adagrad"] = "adam"
    # torch's fused optimiser kernel (same update, one kernel per parameter tensor); Adagrad's foreach kernels
    # where this torch has no fused Adagrad for the device (CUDA in torch 2.11), saying so
    fused: bool = True
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)  # inf: NaN weights in the first step, and a traceback
    # AEVB's step-size selection (Kingma & Welling 2014, 5: Adagrad's global step size "chosen from {0.01,
    # 0.02, 0.1} based on performance on the training set in the first few iterations"): null (no selection,
    # train.lr is the rate), or >= 2 distinct rates; each trains lr_pilot_steps optimiser steps from the run's
    # initial weights on the run's first batches, and the one with the highest mean training bound (nats per
    # example over the pilot's steps; the first on a tie) replaces train.lr (stepsize.py). One device only
    lr_candidates: Annotated[list[LearningRate], Field(min_length=2)] | None = None
    # the pilot's optimiser steps per candidate: the paper says "the first few iterations" without a number;
    # 100 is our reading of it (AEVB's MNIST epoch is 500 steps of 100 examples)
    lr_pilot_steps: int = Field(100, ge=1)
    # the rate of epoch e is lr x schedules.lr_factor(lr_schedule)(e): constant, or IWAE's 10^(-i/7) for
    # 3^i epochs, i = 0..7 (Burda et al. 2016, 5.1; 3,280 epochs, then the last rate)
    lr_schedule: Literal[LR_SCHEDULES] = "constant"
    # Adam's (beta1, beta2) and epsilon; torch's defaults; IWAE uses epsilon 1e-4. optimizer=adam only
    adam_betas: Annotated[list[AdamBeta], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: list(ADAM_BETAS)
    )
    adam_eps: float = Field(ADAM_EPS, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    # every element of the gradient clipped to [-v, v] before the optimiser's step (the gradient of the
    # objective, before Adagrad's or Adam's weight decay term is added to it): the continuous-Bernoulli code
    # clips each gradient to [-1, 1] (cunningham-lab/cb_and_cc cb_vae_mnist.ipynb: tf.clip_by_value(grad,
    # -1.0, 1.0) on every encoder and decoder gradient). null: no clipping
    grad_clip_value: float | None = Field(None, gt=0, allow_inf_nan=False)
    batch_size: int = Field(100, ge=1)
    # validation (and the test curve) images per batch and device, or auto (datamodule.resolve_val_batch_size:
    # 1,000 on a CPU; on a GPU the whole split, up to a fixed activation budget). Validation needs no
    # gradients: larger batches than training's cost less per image (fewer steps of Lightning's loop); the
    # validation ELBO does not depend on it (see datamodule.VAEData)
    val_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    max_epochs: int = Field(30, ge=1)
    early_stopping: bool = False
    patience: int = Field(10, ge=1)
    # seconds between writes of models/last.ckpt (the resumable state) at epoch ends; 0 = every epoch; it is
    # also written at the end of training. models/best.ckpt is written at every epoch end whose validation
    # ELBO improves, whatever this says
    checkpoint_every_s: float = Field(60.0, ge=0)
    # for plotting only (AEVB Figure 2's test curve): the test-set ELBO (nats per example) at the end of each
    # epoch whose training samples seen reach a new point of 10^(k/10), and at the last epoch, in
    # plots/test_curve.csv (trainer.TestCurve). Never used for checkpoints, early stopping or anything else;
    # training is bit for bit the same with it on or off
    test_curve: bool = False
    resume: bool = False  # continue from models/last.ckpt (and its MLflow run) when it exists

    @field_validator("lr_candidates")
    @classmethod
    def _distinct_candidates(cls, rates: list[float] | None) -> list[float] | None:
        # a repeated rate would run the same pilot twice and could only tie with itself
        if rates is not None and len(set(rates)) != len(rates):
            repeated = sorted({r for r in rates if rates.count(r) > 1})
            raise ValueError(f"repeated rate(s) {', '.join(f'{r:g}' for r in repeated)}; give each once")
        return rates

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        # Adam's settings under another optimiser would be ignored: refused instead, naming the keys
        given = {"adam_betas": (self.adam_betas, list(ADAM_BETAS)), "adam_eps": (self.adam_eps, ADAM_EPS)}
        changed = [f"train.{k}={v!r}" for k, (v, default) in given.items() if v != default]
        if self.optimizer != "adam" and changed:
            raise ValueError(f"{', '.join(changed)}: for optimizer=adam only, not {self.optimizer}")
        return self


# trainer.strategy values vaerepro trains with: Lightning's names for one process and for DDP (tests check
# each is in Lightning's StrategyRegistry and that every ddp name there is here). Lightning's sharded and XLA
# strategies (fsdp, deepspeed, xla) save checkpoints in their own layout, which vaerepro's checkpoints and
# resume are not built for. Written out rather than read from the registry, so that validating a config
# imports no Lightning (seconds at every start of the check stage).
_DDP = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
_UNUSED = ("", "_find_unused_parameters_false", "_find_unused_parameters_true")
STRATEGIES = ("auto", "single_device", *(d + u for d in _DDP for u in _UNUSED))


class TrainerConfig(_Section):
    accelerator: Literal["cpu", "gpu", "cuda", "mps", "auto"] = "cpu"
    devices: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"  # one of STRATEGIES, in any case (Lightning lowers it)
    precision: Literal["32-true", "32", "16-mixed", "bf16-mixed", "64-true"] = "32-true"
    deterministic: bool = True
    matmul_precision: Literal["highest", "high", "medium"] = "highest"  # "high" enables TF32 on GPUs
    # torch.compile of the training objective, forward and backward (train.VAEModule): null runs it eagerly;
    # otherwise a torch.compile mode, "reduce-overhead" capturing it as CUDA graphs on a GPU. The same
    # training up to float rounding (dropout's masks are another draw of the same seeds); compiling takes
    # tens of seconds at the start of each training
    compile: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    # the whole training step (forward, backward, clipping, Adam's update) as one CUDA graph, replayed for
    # every full batch (cudagraph.py): on one CUDA device, float32, no dropout, not with compile (the same
    # training up to float rounding: Adam's foreach kernels, not fused ones; Adagrad's fused kernel as
    # eagerly). true: refused where it cannot run; auto (trainer=gpu's default): wherever it can and has been
    # checked on a GPU (Config.cuda_graph_unproven: not Adagrad yet), eager steps elsewhere (and under DDP,
    # and for Adagrad on a torch without its fused CUDA kernel)
    cuda_graph: bool | Literal["auto"] = False
    # optimiser steps per call of Lightning's training_step: that many consecutive minibatches are gathered
    # as one and stepped one after another (train.VAEModule.training_step), so that Lightning's loop around
    # a batch (hooks, fetching, progress) runs once per that many steps. The same training for any value:
    # each minibatch keeps its own seeded draws and optimiser step (under DDP its own gradient all-reduce)
    steps_per_call: int = Field(1, ge=1)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value.lower() not in STRATEGIES:
            raise ValueError(
                "vaerepro trains with auto, single_device or a ddp strategy (ddp, ddp_spawn, ddp_fork, "
                "ddp_notebook, each also with _find_unused_parameters_true or _false), not Lightning's "
                "sharded or XLA ones (fsdp, deepspeed, xla), whose checkpoints its resume is not built for"
            )
        return value


class EvalConfig(_Section):
    num_samples: int = Field(1000, ge=1)
    # test examples per batch, or auto (evaluate.auto_batch_size: all K samples of a batch in one chunk of
    # the memory budget, at least 100)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # importance samples per decoder call, or auto (evaluate.auto_chunk_size: from the free memory)
    chunk_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    seed: Seed = 1234
    num_images: int = Field(16, ge=1)
    # where importance sampling runs: auto = this process's CUDA device when there is one, else the CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # the arithmetic of importance sampling (evaluate.per_example): 32 (float32 throughout), tf32 (float32
    # matmuls in TF32, CUDA only) or bf16 (the networks under bfloat16 autocast, every log-density and the
    # log-sum-exp in float32). Not 32: the evaluate stage also measures the change of log p(x) against 32
    # on the same test examples and noise, in nats (eval.json `precision`)
    precision: Literal["32", "tf32", "bf16"] = "32"

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, value: Any) -> Any:
        # `eval.precision=32` on Hydra's command line (and `dvc exp run -S`) arrives as the integer 32
        return "32" if type(value) is int and value == 32 else value

    @model_validator(mode="after")
    def _check_precision(self) -> EvalConfig:
        # TF32 is a mode of CUDA's matrix units; eval.device=auto on a machine without a GPU is refused by
        # the evaluate stage (evaluate.check_precision), where the device is known
        if self.precision == "tf32" and self.device == "cpu":
            raise ValueError(
                "eval.precision=tf32: TF32 matmuls exist on CUDA devices only, not on eval.device=cpu; "
                "use eval.precision=32 or bf16"
            )
        return self


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str | None = None
    experiment: str = Field("vaerepro", min_length=1)
    flush_every_s: float = Field(10.0, ge=0)  # send per-epoch metrics to the store this often (0: at once)


class Config(_Section):
    seed: Seed = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    likelihood: LikelihoodConfig = Field(default_factory=lambda: BernoulliConfig(name="bernoulli"))
    train: TrainConfig = Field(default_factory=TrainConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check_space(self) -> Config:
        # The likelihood declares which data spaces it is a normalised distribution on; a mismatch is a
        # configuration error, not something to discover from odd numbers after training.
        try:
            self.likelihood_object().check_space(self.data_space)
        except ValueError as err:
            raise ValueError(f"data.space / likelihood: {err}") from None
        return self

    @model_validator(mode="after")
    def _check_estimator(self) -> Config:
        # estimator B's analytic KL(q(z|x) || p(z)) exists for one stochastic layer only
        if (
            self.model.stochastic_layers == 2
            and self.train.objective == "elbo"
            and self.train.estimator == "B"
        ):
            raise ValueError(
                "train.estimator=B (the analytic KL) is for one stochastic layer; with "
                "model.stochastic_layers=2 use train.estimator=A"
            )
        return self

    @model_validator(mode="after")
    def _check_lr_selection(self) -> Config:
        # Under DDP every rank re-runs the script: each would run the pilots, and their choices could differ.
        # devices=auto may mean every GPU; on the CPU accelerator it is one device.
        t = self.trainer
        if self.train.lr_candidates is None:
            return self
        if t.devices == "auto" and t.accelerator != "cpu":
            world = f"trainer.devices=auto on accelerator {t.accelerator}"
        elif t.devices != "auto" and t.devices * t.num_nodes > 1:
            world = f"trainer.devices x trainer.num_nodes = {t.devices * t.num_nodes}"
        else:
            return self
        raise ValueError(
            f"train.lr_candidates: step-size selection runs on one device; {world} here. Set "
            "trainer.devices=1 trainer.num_nodes=1, or select on one device and train with "
            "train.lr=<its choice> train.lr_candidates=null"
        )

    def cuda_graph_conflicts(self) -> list[str]:
        """The settings that keep the training step out of one CUDA graph (cudagraph.StepGraph), each named
        with what the graph needs; empty when it can run. It captures a float32 step (mixed precision's
        autocast and loss scaling are not captured) with Adam's capturable update or Adagrad's fused one,
        no dropout (its masks come from the global generator, reseeded per batch around the step) and no
        torch.compile inside."""
        t = self.trainer
        conflicts = [
            (t.accelerator not in ("gpu", "cuda"), f"trainer.accelerator={t.accelerator} (needs gpu)"),
            (t.precision not in ("32-true", "32"), f"trainer.precision={t.precision} (needs 32-true)"),
            (t.compile is not None, f"trainer.compile={t.compile} (needs null: the graph is the step)"),
            (self.model.dropout > 0, f"model.dropout={self.model.dropout:g} (needs 0)"),
        ]
        return [why for bad, why in conflicts if bad]

    def cuda_graph_unproven(self) -> list[str]:
        """Settings the graph can run but has not yet been shown on a GPU to train as eager steps do
        (tests/test_gpu.py): trainer.cuda_graph=true runs them, auto keeps their steps eager."""
        return (
            ["train.optimizer=adagrad (not yet checked on a GPU)"]
            if self.train.optimizer == "adagrad"
            else []
        )

    @model_validator(mode="after")
    def _check_cuda_graph(self) -> Config:
        # true asks for the graph: refused where it cannot run (auto then runs the steps eagerly)
        if self.trainer.cuda_graph is True and (conflicts := self.cuda_graph_conflicts()):
            raise ValueError(f"trainer.cuda_graph=true: not with {'; '.join(conflicts)}")
        return self

    @model_validator(mode="after")
    def _check_clipping(self) -> Config:
        # The module clips between its manual backward and the optimiser's step (train.VAEModule). Under
        # 16-mixed the gradients there are still multiplied by the loss scale (Lightning unscales them in the
        # step), so the bound would act on scaled values; and Lightning refuses to clip for an optimiser that
        # unscales in its own step (torch's fused kernels) under either mixed precision.
        precision, fused = self.trainer.precision, self.train.fused
        if self.train.grad_clip_value is None or precision not in ("16-mixed", "bf16-mixed"):
            return self
        if precision == "16-mixed":
            raise ValueError(
                "train.grad_clip_value: under trainer.precision=16-mixed the gradients are still "
                "loss-scaled when the module clips them; use trainer.precision=32-true, or bf16-mixed with "
                "train.fused=false"
            )
        if fused:
            raise ValueError(
                "train.grad_clip_value with trainer.precision=bf16-mixed needs train.fused=false (Lightning "
                "cannot clip the gradients of a fused optimiser under mixed precision)"
            )
        return self

    def likelihood_object(self):
        return get_likelihood(**self.likelihood.model_dump())

    @property
    def data_space(self) -> str:
        if self.data.space != "auto":
            return self.data.space
        return get_likelihood(**self.likelihood.model_dump()).natural_space

    @property
    def improper(self) -> bool:
        return self.likelihood_object().is_improper(self.data_space)

    @property
    def numbers_of(self) -> str:
        """What this config's numbers are numbers of, as the command line's result lines say it: 'bernoulli,
        binary space', with IMPROPER for a Bernoulli on grey levels, which is no normalised density."""
        improper = ", IMPROPER: not a normalised density" if self.improper else ""
        return f"{self.likelihood_object().label}, {self.data_space} space{improper}"

    @property
    def run_name(self) -> str:
        # a Gaussian's variant too (gaussian-sigma=0.1-z5-s0): a fixed-sigma and a learned-sigma Gaussian of
        # one latent size and seed are two models, which the same name would show as one
        variant = self.likelihood_object().variant
        likelihood = f"{self.likelihood.name}-{variant}" if variant else self.likelihood.name
        improper = "-improper" if self.improper else ""
        return f"{likelihood}{improper}-z{self.model.latent_dim}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# Location parts pydantic adds that are no key a user types: validator wrappers, a discriminated union's
# marker, and the branches of a union (`int | Literal["auto"]` fails in `constrained-int`, `literal['auto']`).
_WRAPPER = re.compile(r"^(function-.*|tagged-union.*)$")
_UNION_BRANCH = re.compile(r"^(literal\[.*\]|constrained-\w+|bool|int|float|str|none)$")


def _no_such_key(key: str, raw: dict[str, Any], unknown: set[str]) -> str | None:
    """What to say of `key` (dotted), which the config does not have: the keys its nearest section in `raw`
    (the composed config) does have, less the `unknown` ones. Without them a user who typed eval.K gets only
    "Extra inputs are not permitted", or from Hydra the advice to add it with "+", which is refused next.
    None where a new key may be right: under a key whose value is not a section (null), or in an empty
    section (Hydra's hydra.job.env_set, which "+" fills)."""
    parts, node = key.split("."), raw
    for depth, part in enumerate(parts[:-1]):
        if part not in node:
            parts = parts[: depth + 1]  # evl.K: it is `evl` that is not there
            break
        if not isinstance(node[part], dict):
            return None
        node = node[part]
    # (not Hydra's _target_: where the node is instantiated from, not a setting)
    known = [k for k in node if ".".join([*parts[:-1], k]) not in unknown and not k.startswith("_")]
    if not known:
        return None
    return (
        f"{'.'.join(parts)}: no such key ({'.'.join(parts[:-1]) or 'the top level'} has {', '.join(known)})"
    )


def _format(err: ValidationError, raw: dict[str, Any]) -> str:
    entries: list[tuple[str, list[str], str, bool]] = []  # (key, messages, given, a union's branches)
    errors = err.errors()
    unknown = {_user_key(e) for e in errors if e["type"] == "extra_forbidden"}
    for e in errors:
        if e["type"] == "extra_forbidden":
            key = _user_key(e)
            entries.append((_no_such_key(key, raw, unknown) or f"{key}: no such key", [], "", False))
            continue
        union = any(_UNION_BRANCH.match(p) for p in _loc(e))
        key = _user_key(e)
        given = e.get("input")
        shown = "" if isinstance(given, dict) else f" (given: {given!r})"
        msg = e["msg"].removeprefix("Value error, ")  # pydantic's prefix for our validators' ValueErrors
        if e["type"] == "union_tag_not_found":  # pydantic: "Unable to extract tag using discriminator 'name'"
            msg = f"no name; give {key}.name: {', '.join(REGISTRY)}"
        if union and entries and entries[-1][0] == key and entries[-1][3]:
            # the next branch of the same union: one key, its allowed forms joined ("..., or 'auto'")
            entries[-1][1].append(msg.removeprefix("Input should be "))
        else:
            entries.append((key, [msg], shown, union))
    # One line: each bad key, what is allowed and what was given (a check across sections names its keys)
    return "; ".join(
        f"{key + ': ' if key and msgs else key}{', or '.join(msgs)}{shown}" for key, msgs, shown, _ in entries
    )


def _loc(e: dict[str, Any]) -> list[str]:
    return [str(p) for p in e["loc"] if not _WRAPPER.match(str(p))]


def _user_key(e: dict[str, Any]) -> str:
    """The dotted key a pydantic error is about, as a user types it: without the branches of a union, and
    without the likelihood's tag that a discriminated union puts in the location (likelihood.bernoulli.p)."""
    key = ".".join(p for p in _loc(e) if not _UNION_BRANCH.match(p))
    for tag in REGISTRY:
        key = key.replace(f"likelihood.{tag}", "likelihood")
    return key


def validate(raw: dict[str, Any]) -> Config:
    """Validate a resolved config dict; raise ConfigError naming every bad key and what is allowed."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a configuration must be a mapping, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, raw)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last silently (a
    `model:` section appended to params.yaml replaced the whole section), and DVC refuses such a file."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        problem=f"key {key!r} given twice", problem_mark=key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def load(path: str | os.PathLike) -> Config:
    """Load and validate a resolved config file (params.yaml)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: no resolved config here. Write it with `vaerepro params` (or `dvc exp run`), "
            "or pass --params FILE."
        )
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"{path}: not valid YAML{at} ({problem})") from None
    if isinstance(raw, dict):
        # A stage runs what the file says: a section it lacks is an incomplete file, not a request for
        # the defaults (which may not be what conf/ composes).
        missing = [k for k in Config.model_fields if k not in raw]
        if missing:
            raise ConfigError(
                f"{path}: no {', '.join(missing)} section{'s' if len(missing) > 1 else ''}; "
                "write the whole resolved config with `vaerepro params` (or `dvc exp run`)"
            )
    try:
        return validate(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def find_project_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest directory at or above `start` holding the project's conf/ (or dvc.yaml)."""
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        if any((d / m).exists() for m in PROJECT_MARKERS):
            return d
    raise ConfigError(f"no vaerepro project (conf/config.yaml or dvc.yaml) at or above {here}")


_NO_OVERRIDE = re.compile(r"Could not override '([^']+)'\.")


def _override_key(override: str) -> str:
    """The key a Hydra override sets: eval.K of `eval.K=10`, `+eval.K=10` and `~eval.K`."""
    return override.split("=", 1)[0].lstrip("+~")


def compose(
    overrides: list[str] | None = None,
    config_dir: str | os.PathLike | None = None,
    *,
    named: list[str] | None = None,
) -> dict[str, Any]:
    """Compose conf/ with Hydra overrides into a plain, resolved dict (what `dvc exp run` writes).

    An override Hydra or OmegaConf refuses is a ConfigError of one line naming `named` (default: the
    overrides) and Hydra's reason, without its config search path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    config_dir = Path(config_dir) if config_dir else find_project_root() / "conf"

    def composed(overrides: list[str], hydra: bool = False) -> dict[str, Any]:
        # with `hydra`, Hydra's own section too, unresolved: its ${now:...} resolve only in a run
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=hydra)
        return OmegaConf.to_container(cfg, resolve=not hydra)

    try:
        return composed(list(overrides or []))
    except (HydraException, OmegaConfBaseException, ValueError) as err:  # ValueError: model=null
        # one line, without the search path Hydra appends (after a newline): the options are what helps
        text = " ".join(str(err).split()).split(" Config search path:")[0]
        if text.startswith("Error merging override") and err.__cause__ is not None:  # why is in its cause
            text += f" ({str(err.__cause__).splitlines()[0]})"
        if unknown := _NO_OVERRIDE.match(text):
            # Hydra's advice, to add the key with "+", is refused next (by the schema, or by the sweeper's
            # constructor for a hydra.sweeper key, in several lines): say what keys there are
            key, others = unknown[1], [o for o in overrides or [] if _override_key(o) != unknown[1]]
            with contextlib.suppress(HydraException, OmegaConfBaseException, ValueError):
                text = _no_such_key(key, composed(others, key.startswith("hydra.")), {key}) or text
        shown = " ".join(overrides or []) if named is None else " ".join(named)
        raise ConfigError(f"overrides {shown}: {text}" if shown else f"{config_dir}: {text}") from None
    except yaml.YAMLError as err:  # a file of conf/ that is not YAML: PyYAML's traceback, through Hydra
        problem = getattr(err, "problem", None) or type(err).__name__
        if (mark := getattr(err, "problem_mark", None)) is None:
            raise ConfigError(f"{config_dir}: not valid YAML ({problem})") from None
        at = f"line {mark.line + 1}, column {mark.column + 1}"
        raise ConfigError(f"{mark.name}: not valid YAML at {at} ({problem})") from None


def dump(raw: dict[str, Any]) -> str:
    return yaml.safe_dump(raw, sort_keys=False)
