"""Checkpoint files as evaluation and resumption read them.

A checkpoint is the truth for everything it fixes: the architecture, the likelihood, the data space, the
training data (by digest) and, for resuming, how it was trained. `read` loads one safely (weights only) or
says in one line why it cannot; `mismatches` lists, by config key, where a configuration contradicts it, so
that a stage refuses instead of relabelling a model with the config's names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vaerepro.errors import UserError

# What `vaerepro train` records about the data beside the model: the sha256 of prepared/x_train.npy.
DATA_DIGEST_LABEL = "training data (sha256 of prepared/x_train.npy)"

# Keys a resumed training may change: how long and how often, and what is observed (train.test_curve, a
# test-set curve for plotting), not what is trained or how.
RESUMABLE_CHANGES = frozenset(
    {
        "train.max_epochs",
        "train.early_stopping",
        "train.patience",
        "train.checkpoint_every_s",
        "train.val_batch_size",
        "train.test_curve",
    }
)

# The number of processes (devices x nodes) that wrote a checkpoint, under this key of the checkpoint
# (train.VAEModule.on_save_checkpoint): with train.batch_size, which is per device, it gives the global batch,
# so a resume may change the per-device batch with the devices as long as the global batch stays
# (`global_batch`). Checkpoints written before it lack the key: their train.batch_size must stay.
WORLD_SIZE_KEY = "vaerepro_world_size"

# The arithmetic a checkpoint's training ran in, under this key (train_resume.numerics: Lightning's
# precision, and on CUDA torch's float32 matmul precision): epochs resumed in bf16 after epochs in float32
# would be another training recorded under one precision. Not hyper-parameters: a training's evaluation does
# not depend on them. Checkpoints written before it lack the key and are not compared.
NUMERICS_KEY = "vaerepro_numerics"

# What a key a checkpoint does not record meant: the keys added after checkpoints were first written, with
# the value every training had before (torch's init, no dropout, a constant rate, torch's Adam, no
# clipping). An older checkpoint is compared as if it recorded these, so that it is not resumed under
# another schedule, optimiser or clipping, nor labelled with another init or dropout.
LEGACY_DEFAULTS: dict[str, Any] = {
    "model.init": "default",
    "model.dropout": 0.0,
    "likelihood.scale": "softplus",
    "train.lr_schedule": "constant",
    "train.adam_betas": [0.9, 0.999],
    "train.adam_eps": 1e-8,
    "train.lr_candidates": None,  # no step-size selection: train.lr was the rate
    "train.grad_clip_value": None,
}

# The keys that say which model a checkpoint holds (evaluation's check); training keys are not among them.
# "model." covers model.dropout: a network trained with dropout is another model, though evaluation (in
# eval mode) computes the same function of its weights with or without the Dropout modules.
MODEL_KEYS = (
    "data: pixels per image",
    "model.",
    "likelihood.",
    "data.space",
    "data: 8-bit",
    DATA_DIGEST_LABEL,
)


def expected_hparams(cfg, data_dim: int, quantized: bool, data_digest: str | None) -> dict[str, Any]:
    """The hyper-parameters a training module built from `cfg` (a config.Config) records in its checkpoints:
    the VAE's constructor arguments, the objective (the train section without `resume`), the data space,
    whether the data are 8-bit, the seed and the training data's digest."""
    return {
        "vae_config": {
            "data_dim": int(data_dim),
            "latent_dim": cfg.model.latent_dim,
            "hidden_dims": list(cfg.model.hidden_dims),
            "activation": cfg.model.activation,
            "likelihood": cfg.likelihood.model_dump(),
            "init": cfg.model.init,
            "init_std": cfg.model.init_std,
            "dropout": cfg.model.dropout,
            # a second stochastic layer only: one-layer hparams stay as they were (older checkpoints match)
            **(
                {
                    "stochastic_layers": 2,
                    "latent_dim_2": cfg.model.latent_dim_2,
                    "hidden_dims_2": list(cfg.model.hidden_dims_2),
                }
                if cfg.model.stochastic_layers == 2
                else {}
            ),
        },
        # how to train, not whether this is a resumption
        "train": cfg.train.model_dump(exclude={"resume"}),
        "data_space": cfg.data_space,
        "quantized": bool(quantized),
        "seed": cfg.seed,
        "data_digest": data_digest,
    }


def global_batch(ckpt: dict[str, Any]) -> tuple[int, int] | None:
    """(train.batch_size, world size) of the training that wrote `ckpt`, whose product is its global batch;
    None for a checkpoint written before the world size was recorded (WORLD_SIZE_KEY)."""
    world = ckpt.get(WORLD_SIZE_KEY)
    if world is None:
        return None
    return int(ckpt["hyper_parameters"]["train"]["batch_size"]), int(world)


def data_digest(meta: dict[str, Any]) -> str | None:
    """The training data's digest from prepared/meta.json: the sha256 of x_train.npy."""
    return (meta.get("files") or {}).get("x_train.npy")


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or not the model the configuration describes."""


def read(path: Path) -> dict[str, Any]:
    """The checkpoint at `path` (weights only, on the CPU); CheckpointError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (it is written by `vaerepro train`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's unpickler raises what the bytes lead it to (IndexError
        # for a text file, KeyError, ...): any failure to load is an unreadable file, never a traceback
        raise CheckpointError(f"{path}: not a readable checkpoint, {_why_unreadable(path, exc)}") from None
    if not isinstance(ckpt, dict) or "vae_config" not in (ckpt.get("hyper_parameters") or {}):
        raise CheckpointError(f"{path}: not a vaerepro checkpoint (no hyper_parameters.vae_config)")
    return ckpt


def _why_unreadable(path: Path, exc: BaseException) -> str:
    """Why torch could not load `path`, in the file's terms. torch's own message for a foreign or damaged
    file advises weights_only=False, i.e. running whatever code the file holds: never the fix here."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head.startswith(b"PK"):  # torch.save writes a zip archive
        return f"not written by torch.save (it starts with {head!r})"
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if "weights_only" in reason or "pickle" in reason.lower():
        reason = "its contents are not plain tensors and containers"
    return f"truncated or damaged ({reason[:160]})"


def flatten_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """A training module's hyper-parameters (`train.VAEModule`) by the config key each comes from."""
    vae = hparams["vae_config"]
    out: dict[str, Any] = {
        "data: pixels per image": vae["data_dim"],
        "model.latent_dim": vae["latent_dim"],
        "model.hidden_dims": list(vae["hidden_dims"]),
        "model.activation": vae["activation"],
        **({"model.init": vae["init"]} if "init" in vae else {}),
        # init_std matters to init=normal only; under another init its value is not compared
        **({"model.init_std": vae["init_std"]} if vae.get("init") == "normal" else {}),
        **({"model.dropout": vae["dropout"]} if "dropout" in vae else {}),
        "model.stochastic_layers": vae.get("stochastic_layers", 1),
        **(
            {"model.latent_dim_2": vae["latent_dim_2"], "model.hidden_dims_2": list(vae["hidden_dims_2"])}
            if vae.get("stochastic_layers", 1) == 2
            else {}
        ),
        "likelihood.name": vae["likelihood"]["name"],
    }
    out.update({f"likelihood.{k}": v for k, v in vae["likelihood"].items() if k != "name"})
    out["data.space"] = hparams.get("data_space")
    out["data: 8-bit"] = hparams.get("quantized")
    out.update({f"train.{k}": v for k, v in (hparams.get("train") or {}).items()})
    if out.get("train.lr_candidates") is None:
        # the pilot's length matters to a step-size selection only; without one its value is not compared.
        # With one, train.lr is the rate the selection chose (stepsize.at_rate), compared as such.
        out.pop("train.lr_pilot_steps", None)
    out["seed"] = hparams.get("seed")
    if hparams.get("data_digest") is not None:
        out[DATA_DIGEST_LABEL] = hparams["data_digest"]
    return out


def mismatches(
    saved: dict[str, Any],
    expected: dict[str, Any],
    *,
    only: tuple[str, ...] | None = None,
    ignore: frozenset[str] = frozenset(),
) -> list[str]:
    """'key: checkpoint A, config B' for every key where `expected` (from the config) differs from `saved`
    (a checkpoint's hyper-parameters); both as `flatten_hparams` gives them. `only`: keys starting with one
    of these; `ignore`: keys not compared (beside RESUMABLE_CHANGES, never compared). A key the checkpoint
    does not record (an older checkpoint) is compared as its LEGACY_DEFAULTS value, or not at all; with
    different likelihoods, only the likelihood's name is reported, not its other keys."""
    a, b = {**LEGACY_DEFAULTS, **flatten_hparams(saved)}, flatten_hparams(expected)
    out = []
    for key in b:
        if key not in a or (only is not None and not key.startswith(only)):
            continue
        if key in RESUMABLE_CHANGES or key in ignore:
            continue
        if (
            key.startswith("likelihood.")
            and key != "likelihood.name"
            and a["likelihood.name"] != b["likelihood.name"]
        ):
            continue
        if a[key] != b[key]:
            out.append(f"{key}: checkpoint {a[key]!r}, config {b[key]!r}")
    return out
