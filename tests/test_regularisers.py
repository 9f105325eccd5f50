"""The continuous-Bernoulli code's two regularisers: dropout (model.dropout) and clipping each gradient
element (train.grad_clip_value), with known answers: where the Dropout modules sit, the fraction of units
they zero, evaluation without them, and a clipped training step equal to torch's own clip_grad_value_.

Transcribed from github.com/cunningham-lab/cb_and_cc: utils.py encoder_mnist / decoder_mnist_cb (dense ReLU,
tf.nn.dropout, dense ReLU, tf.nn.dropout, dense output), keep_prob 0.9 in cb_vae_mnist.ipynb's training
steps and 1.0 in its evaluations; its graph cell clips every gradient with tf.clip_by_value(grad, -1, 1)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from conftest import compose, copy_prepared, tiny_config
from vaerepro import checkpoints, estimators, stepsize
from vaerepro import config as config_mod
from vaerepro.config import ConfigError
from vaerepro.data import to_space
from vaerepro.datamodule import TRAIN_STREAM, EpochBatches, VAEData, batch_seed
from vaerepro.evaluate import load_vae, per_example, posterior_means
from vaerepro.model import VAE, TwoLayerVAE, build_vae
from vaerepro.train import VAEModule, build_module, train

D, Z = 12, 3


def _leaves(net: nn.Module) -> list[type[nn.Module]]:
    """The network's modules in forward order, nested Sequentials flattened: [Linear, ReLU, Dropout, ...]."""
    return [type(m) for m in net.modules() if not isinstance(m, nn.Sequential)]


def _pair(dropout: float, **kwargs) -> tuple[VAE, VAE]:
    """A VAE with `dropout` and one without, with the same weights (the same seed draws them)."""
    nets = []
    for p in (dropout, 0.0):
        torch.manual_seed(0)
        nets.append(VAE(data_dim=D, latent_dim=Z, dropout=p, **kwargs))
    return nets[0], nets[1]


# --- model.dropout -------------------------------------------------------------------------------------


def test_dropout_zero_is_the_network_without_the_option():
    """dropout=0 (the default): no Dropout module, the layers, weights and outputs of the model built as
    before the key existed."""
    torch.manual_seed(0)
    default = VAE(data_dim=D, latent_dim=Z, hidden_dims=(7, 5), activation="relu")
    torch.manual_seed(0)
    zero = VAE(data_dim=D, latent_dim=Z, hidden_dims=(7, 5), activation="relu", dropout=0.0)
    for vae in (default, zero):
        assert not any(isinstance(m, nn.Dropout) for m in vae.modules())
        assert _leaves(vae.encoder) == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert default.state_dict().keys() == zero.state_dict().keys()
    assert all(torch.equal(v, zero.state_dict()[k]) for k, v in default.state_dict().items())
    x, z = torch.rand(4, D).round(), torch.randn(4, Z)
    default.train(), zero.train()  # training mode too: nothing random in either
    assert torch.equal(default.encoder(x), zero.encoder(x)) and torch.equal(
        default.decoder(z), zero.decoder(z)
    )
    assert default.config["dropout"] == zero.config["dropout"] == 0.0
    two = TwoLayerVAE(data_dim=D, latent_dim=Z, latent_dim_2=2, hidden_dims_2=[4])
    assert not any(isinstance(m, nn.Dropout) for m in two.modules())


def test_dropout_sits_after_every_hidden_activation_as_in_the_cb_code():
    """The CB preset's network (784 -> 500 -> 500 -> 2 x 20, and back): a Dropout(0.1) after each of the two
    hidden ReLU layers of encoder and decoder, none on the input or the output; four in all."""
    vae = VAE(data_dim=784, latent_dim=20, hidden_dims=(500, 500), activation="relu", dropout=0.1)
    code = [
        nn.Linear,
        nn.ReLU,
        nn.Dropout,
        nn.Linear,
        nn.ReLU,
        nn.Dropout,
        nn.Linear,
    ]  # fc1 drop1 fc2 drop2 fc3
    assert _leaves(vae.encoder) == code and _leaves(vae.decoder) == code
    drops = [m for m in vae.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 4 and all(m.p == 0.1 for m in drops)
    assert [m.out_features for m in vae.encoder if isinstance(m, nn.Linear)] == [500, 500, 40]
    # one hidden layer: one Dropout per network; IWAE's two-layer model: in all four of its MLPs
    assert _leaves(VAE(data_dim=D, latent_dim=Z, hidden_dims=(6,), dropout=0.2).decoder) == [
        nn.Linear, nn.Tanh, nn.Dropout, nn.Linear
    ]  # fmt: skip
    two = TwoLayerVAE(data_dim=D, latent_dim=Z, latent_dim_2=2, hidden_dims_2=[4, 4], dropout=0.2)
    assert [sum(m is nn.Dropout for m in _leaves(n)) for n in (two.encoder_2, two.decoder_2)] == [2, 2]


def test_dropout_zeroes_about_p_of_the_hidden_units_in_training_only():
    """Training mode: each Dropout zeroes a fraction p of its units (within 5 binomial SDs) and scales the
    rest by 1 / (1 - p), so two passes differ. Eval mode: deterministic, and the function of the same weights
    without Dropout modules (whose state_dict has the same keys: Dropout holds no parameters)."""
    p, n = 0.3, 4000
    vae, plain = _pair(p, hidden_dims=(50,), activation="tanh")  # tanh: no unit is 0 before dropout
    seen = []
    vae.encoder[1][1].register_forward_hook(lambda m, inp, out: seen.append((inp[0], out)))
    x = torch.rand(n, D).round()
    vae.train()
    torch.manual_seed(1)
    first, second = vae.posterior_params(x)[0], vae.posterior_params(x)[0]
    assert not torch.equal(first, second)
    h, dropped = seen[0]  # (n, 50) each
    zeroed = float((dropped == 0).double().mean())
    assert abs(zeroed - p) < 5 * math.sqrt(p * (1 - p) / h.numel())  # SD 0.0010 for 200,000 units
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], h[kept] / (1 - p))

    vae.eval()
    assert vae.state_dict().keys() == plain.state_dict().keys()
    loaded = plain.load_state_dict(vae.state_dict())  # strict: every key of each in the other
    assert not loaded.missing_keys and not loaded.unexpected_keys
    a, b = vae.posterior_params(x), vae.posterior_params(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(u, v) for u, v in zip(a, plain.posterior_params(x), strict=True))
    z = torch.randn(5, Z)
    assert torch.equal(vae.decoder_params(z), plain.decoder_params(z))


def test_a_dropout_checkpoint_is_evaluated_in_eval_mode(tmp_path):
    """load_vae rebuilds the model with its Dropout modules and hands it back in eval mode: its log p(x),
    ELBO and latent means equal those of the same weights without dropout, bit for bit. The same model in
    training mode gives other numbers, so the comparison would catch a model left in it."""
    vae, plain = _pair(0.5, hidden_dims=(8,))
    path = tmp_path / "best.ckpt"
    state = {f"vae.{k}": v for k, v in vae.state_dict().items()}  # as VAEModule's checkpoints hold it
    torch.save({"hyper_parameters": {"vae_config": vae.config}, "state_dict": state}, path)
    loaded = load_vae(path)
    assert loaded.config["dropout"] == 0.5 and sum(isinstance(m, nn.Dropout) for m in loaded.modules()) == 2
    assert not any(m.training for m in loaded.modules())
    x = torch.bernoulli(torch.full((30, D), 0.3), generator=torch.Generator().manual_seed(0))

    def numbers(model):
        est = per_example(model, x, num_samples=20, batch_size=10, chunk_size=7, seed=3)
        return est["log_px"], est["elbo"], posterior_means(model, x)

    ours, reference = numbers(loaded), numbers(plain.eval())
    assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))
    assert not torch.equal(numbers(vae.train())[0], reference[0])


def test_dropout_is_rebuilt_from_the_config_and_older_configs_have_none():
    vae = VAE(data_dim=D, latent_dim=Z, dropout=0.25)
    rebuilt = build_vae(vae.config)
    assert rebuilt.config == vae.config and rebuilt.dropout == 0.25
    older = {k: v for k, v in vae.config.items() if k != "dropout"}  # a checkpoint from before the key
    assert build_vae(older).dropout == 0.0 and not any(
        isinstance(m, nn.Dropout) for m in build_vae(older).modules()
    )
    for bad in (1.0, -0.1, 1.5, math.nan, True, "0.1"):
        with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\)"):
            VAE(data_dim=D, latent_dim=Z, dropout=bad)


def test_training_masks_are_a_function_of_the_batch_and_leave_the_global_generator_alone():
    """VAEModule draws a batch's dropout masks from torch's global generator seeded by (seed, epoch, batch
    index, rank) and puts the generator back: the same batch gives the same bound whatever was drawn before
    it (as after resuming from a checkpoint), and nothing else's draws move."""
    train_cfg = tiny_config().train.model_dump()
    vae_config = {"data_dim": D, "latent_dim": Z, "hidden_dims": [16], "dropout": 0.5}
    torch.manual_seed(0)
    module = VAEModule(vae_config, train_cfg, "binary", True, seed=3).train()
    batch = torch.randint(0, 256, (40, D), dtype=torch.uint8)
    before = torch.get_rng_state()
    first = module.shard_loss(batch, 1, 4, 0, 1)[1]
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(100)  # another draw from the global generator in between
    assert torch.equal(module.shard_loss(batch, 1, 4, 0, 1)[1], first)
    # the masks do act: in eval mode (no dropout) the same batch and noise give another bound
    assert not torch.equal(module.eval().shard_loss(batch, 1, 4, 0, 1)[1], first)


def test_training_runs_dropout_and_validation_does_not(prepared_tiny, tmp_path):
    """Through Lightning: every training batch sees the network in training mode, every validation batch
    in eval mode; the checkpoint records the dropout and the clipping, and rebuilds the Dropout modules."""

    class Modes(pl.Callback):
        def __init__(self):
            self.modes = {"train": set(), "val": set()}

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.modes["train"] |= {m.training for m in module.vae.modules()}

        def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
            self.modes["val"] |= {m.training for m in module.vae.modules()}

    out, modes = copy_prepared(prepared_tiny, tmp_path), Modes()
    cfg = tiny_config("model.dropout=0.1", "train.grad_clip_value=1.0", "train.max_epochs=1")
    train(cfg, out, enable_progress_bar=False, callbacks=[modes])
    assert modes.modes == {"train": {True}, "val": {False}}
    ckpt = checkpoints.read(out / "models" / "best.ckpt")
    assert ckpt["hyper_parameters"]["vae_config"]["dropout"] == 0.1
    assert ckpt["hyper_parameters"]["train"]["grad_clip_value"] == 1.0
    assert sum(isinstance(m, nn.Dropout) for m in load_vae(out / "models" / "best.ckpt").modules()) == 2


# --- train.grad_clip_value -----------------------------------------------------------------------------

STEPS = 3  # Adam's first step is lr x sign(g) whatever the clipping; from the second on it is not


def _hand_steps(cfg, data: VAEData, vae_config: dict, start: dict, clip: float | None, steps: int) -> dict:
    """`steps` Adam steps written out in torch, from the weights `start` of the model `vae_config`: the
    sampler's first batches with each batch's seeded binarisation and q noise, the ELBO (estimator B), its
    mean's backward pass, then torch.nn.utils.clip_grad_value_(params, clip) when clip is given, the step."""
    vae = build_vae(vae_config)
    vae.load_state_dict(start)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.train.lr, fused=True)
    sampler = EpochBatches(len(data.x_train), cfg.train.batch_size, shuffle=True, seed=cfg.seed)
    sampler.set_epoch(0)
    for i, idx in zip(range(steps), sampler, strict=False):
        g = torch.Generator().manual_seed(batch_seed(cfg.seed, TRAIN_STREAM, 0, i))
        x = to_space(data.x_train[idx], cfg.data_space, quantized=data.quantized, generator=g)  # (B, D)
        eps = torch.randn((1, len(idx), cfg.model.latent_dim), generator=g)  # (K=1, B, Z)
        loss = -estimators.elbo(vae, x, 1, "B", eps).mean()
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_value_(vae.parameters(), clip)
        opt.step()
    return vae.state_dict()


@pytest.mark.slow
def test_a_clipped_training_step_is_torchs_clip_grad_value_before_the_step(prepared_tiny):
    """VAEModule's steps (through stepsize.pilot's Lightning Trainer, the step-size pilot's path) with
    train.grad_clip_value=v equal a torch loop that calls clip_grad_value_(params, v) between backward and
    step; without it, the torch loop without the call. v = 0.01 bites (two thirds of the elements of the
    first batch's gradient are larger), and the clipped weights differ from the unclipped ones by far more
    than the float rounding between the loops."""
    v, ends, hand = 0.01, {}, {}
    for clip in (v, None):
        cfg = tiny_config("train.lr=0.01", f"train.grad_clip_value={'null' if clip is None else clip}")
        data = VAEData(
            prepared_tiny / "prepared", cfg.data_space, cfg.train.batch_size, cfg.seed, latent_dim=4
        )
        data.setup()
        torch.manual_seed(0)
        module = build_module(cfg, data)
        start = {k: t.detach().clone() for k, t in module.vae.state_dict().items()}
        stepsize.pilot(module, data, cfg, STEPS)
        ends[clip] = module.vae.state_dict()
        hand[clip] = _hand_steps(cfg, data, module.hparams["vae_config"], start, clip, STEPS)
        for k, t in ends[clip].items():
            torch.testing.assert_close(t, hand[clip][k], rtol=1e-5, atol=1e-6)
    gap = max(float((ends[v][k] - ends[None][k]).abs().max()) for k in ends[v])
    assert gap > 1e-3  # the update with clipping is another update (lr 0.01, three steps)


# --- the configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("model.dropout=1.0", "model.dropout", "less than 1"),
        ("model.dropout=-0.1", "model.dropout", "greater than or equal to 0"),
        ("train.grad_clip_value=0", "train.grad_clip_value", "greater than 0"),
        ("train.grad_clip_value=-1", "train.grad_clip_value", "greater than 0"),
        ("train.grad_clip_value=inf", "train.grad_clip_value", "a finite number"),
    ],
)
def test_bad_values_name_the_key(override, key, allowed):
    with pytest.raises(ConfigError, match=rf"^{key}: Input should be {allowed}") as err:
        config_mod.validate(compose(override))
    assert "\n" not in str(err.value)


def test_defaults_and_the_cb_values_validate():
    cfg = config_mod.validate(compose())
    assert cfg.model.dropout == 0.0 and cfg.train.grad_clip_value is None
    cfg = config_mod.validate(compose("model.dropout=0.1", "train.grad_clip_value=1.0"))
    assert (cfg.model.dropout, cfg.train.grad_clip_value) == (0.1, 1.0)


def test_clipping_under_mixed_precision_is_refused_where_it_would_be_wrong():
    """16-mixed: the gradients are still loss-scaled when the module clips them; bf16-mixed: Lightning
    cannot clip for a fused optimiser. Both refused with one line naming the keys; bf16 unfused is fine."""
    clip = "train.grad_clip_value=1.0"
    with pytest.raises(ConfigError, match=r"train.grad_clip_value: under trainer.precision=16-mixed"):
        config_mod.validate(compose(clip, "trainer.precision=16-mixed"))
    with pytest.raises(ConfigError, match=r"bf16-mixed needs train.fused=false"):
        config_mod.validate(compose(clip, "trainer.precision=bf16-mixed"))
    config_mod.validate(compose(clip, "trainer.precision=bf16-mixed", "train.fused=false"))
    config_mod.validate(compose("trainer.precision=16-mixed"))  # no clipping: as before


def test_older_checkpoints_count_as_no_dropout_and_no_clipping():
    """A checkpoint from before the keys matches today's defaults; against the CB preset's values it is
    another model (model.dropout, which evaluation compares) and another training (grad_clip_value, which
    resuming compares)."""

    def hparams(*overrides):
        return checkpoints.expected_hparams(tiny_config(*overrides), 784, True, "digest")

    now = hparams()
    old = {
        **now,
        "vae_config": {k: v for k, v in now["vae_config"].items() if k != "dropout"},
        "train": {k: v for k, v in now["train"].items() if k != "grad_clip_value"},
    }
    assert checkpoints.mismatches(old, now) == []
    cb = hparams("model.dropout=0.1", "train.grad_clip_value=1.0")
    assert set(checkpoints.mismatches(old, cb)) == {
        "model.dropout: checkpoint 0.0, config 0.1",
        "train.grad_clip_value: checkpoint None, config 1.0",
    }
    assert checkpoints.mismatches(now, cb, only=checkpoints.MODEL_KEYS) == [
        "model.dropout: checkpoint 0.0, config 0.1"
    ]
