"""What this machine can train on: `check_trainer` refuses a trainer section whose accelerator, devices or
precision this machine cannot run as written. torch only, no Lightning, so that the check stage (`vaerepro
check`, the DVC pipeline's first stage) starts in seconds; the strategy name is checked with the rest of
the config (config.TrainerConfig)."""

from __future__ import annotations

import os
import platform

import torch

from vaerepro.config import ConfigError, TrainerConfig


def check_trainer(t: TrainerConfig) -> None:
    """Refuse (ConfigError naming the key) a trainer section this machine cannot run as written, before
    anything is touched: Lightning refuses a missing GPU only when the Trainer is built, with a traceback,
    and silently trains float16 mixed precision on the CPU as bfloat16, which the run's params would then
    mislabel. Here, not in config.py, whose validation is the same on every machine."""
    if t.accelerator in ("gpu", "cuda"):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have == 0:
            # under DDP, the README's CPU processes (trainer=ddp trainer.accelerator=cpu) are the other way
            ddp = (
                ", or trainer.accelerator=cpu for DDP in CPU processes" if "ddp" in t.strategy.lower() else ""
            )
            raise ConfigError(
                f"trainer.accelerator={t.accelerator}: this machine has no CUDA device; use trainer=cpu{ddp}"
            )
        if isinstance(t.devices, int) and t.devices > have:
            raise ConfigError(f"trainer.devices={t.devices}: this machine has {have} CUDA device(s)")
    elif t.accelerator == "mps" and not torch.backends.mps.is_available():  # Lightning's traceback
        raise ConfigError(
            "trainer.accelerator=mps: this machine has no MPS device (Apple silicon); use trainer=cpu"
        )
    elif t.accelerator == "cpu" and t.precision == "16-mixed":
        raise ConfigError(
            "trainer.precision=16-mixed: float16 mixed precision runs on CUDA devices only (Lightning would "
            "train bfloat16 instead on the CPU); use trainer.precision=bf16-mixed or 32-true"
        )


def device_text(device: torch.device, processes: int = 1) -> str:
    """The device a stage ran on, as train.json and eval.json record it (`device`): "cpu (x86_64, 2 cores)" or
    "cuda:0 (NVIDIA H200)", with ", 4 processes" when it was one of several (DDP, torchrun). Importance
    sampling draws its noise on its device, so a CPU and a CUDA evaluation of one model draw other samples:
    equally valid estimates, not the same digits."""
    if device.type == "cuda":
        name = f"{device} ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        name = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    else:
        name = str(device)
    return name + (f", {processes} processes" if processes > 1 else "")
