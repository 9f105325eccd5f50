"""Where a training's host time goes: cProfile of `vaerepro.train.train` at full-MNIST epoch length.

    python benchmarks/profile_train.py [--epochs 3] [--override KEY=VALUE ...]

The AEVB model on the embedded digits tiled to 50,000 training images (bench.prepare_data, 500 steps an
epoch), without tracking. On a GPU (`--override trainer=gpu`) the host's Python is what bounds a small
model's training, so the host time per call is the time: printed per training step and per epoch for the
functions that take the most of it, cumulative (a function's callees included) and own (tottime). cProfile
slows the Python it measures, by about as much everywhere, so read the shares, not the absolute times.
The profile runs from the second epoch's start to the end of training (`AfterWarmUp`): the first epoch's
one-offs (CUDA's start, the graph's capture, imports) and the work before and after the fit (the data's
checks, the checkpoint's digest) would otherwise count as every epoch's.
"""

from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import sys
import tempfile
from pathlib import Path

import bench
import lightning.pytorch as pl

from vaerepro import config as config_mod
from vaerepro.train import train

ROOT = bench.ROOT  # the repository


class AfterWarmUp(pl.Callback):
    """cProfile from the start of epoch 1 (the second) to the end of training, before the last.ckpt written
    then (Lightning runs Checkpoint callbacks after this one): whole epochs after the first."""

    def __init__(self):
        self.profile = cProfile.Profile()

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.profile.enable()

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.profile.disable()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3, help="the first is not profiled: at least 2")
    ap.add_argument("--override", action="append", default=[], help="Hydra override (repeatable)")
    ap.add_argument("--top", type=int, default=40, help="functions to print")
    args = ap.parse_args(argv)
    if args.epochs < 2:
        ap.error(f"--epochs {args.epochs}: at least 2 (the first is a warm-up, not profiled)")
    return args


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="vaerepro-profile-"))
    overrides = bench.prepare_data(work, mnist_size=True)
    (work / "run").mkdir()
    (work / "run" / "prepared").symlink_to(work / "prepared")
    raw = config_mod.compose(
        ["tracking.enabled=false", f"train.max_epochs={args.epochs}", f"data.raw_dir={work / 'raw'}"]
        + overrides
        + args.override,
        config_dir=ROOT / "conf",
    )
    cfg = config_mod.validate(raw)
    warm = AfterWarmUp()
    train(cfg, work / "run", enable_progress_bar=False, callbacks=[warm])
    # (file, line, name) -> (primitive calls, calls, own s, cum s, _)
    stats = pstats.Stats(warm.profile).stats
    epochs = args.epochs - 1  # profiled
    steps = epochs * 500
    per_call = cfg.trainer.steps_per_call  # optimiser steps per call of training_step (Lightning's loop)
    calls = epochs * math.ceil(500 / per_call)
    print(
        f"{epochs} epochs of 500 steps profiled (after one not), {per_call} a call of training_step, "
        f"{' '.join(args.override) or 'the cpu preset'}"
    )

    def show(title, rows, per, unit):
        print(f"\n== {title} (cumulative ms/{unit}, own ms/{unit}, calls/{unit}, function) ==")
        for (file, line, name), (_, calls, own, cum, _) in rows[: args.top]:
            where = file.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
            print(
                f"{cum * 1000 / per:8.3f} {own * 1000 / per:8.3f} {calls / per:7.2f}  {where}:{line}({name})"
            )

    by_cum = sorted(stats.items(), key=lambda kv: kv[1][3], reverse=True)
    # what every step calls (the training step, Lightning's loop around it), and what each epoch calls a few
    # times (validation, checkpoints, the epoch's logging)
    show("per step", [kv for kv in by_cum if kv[1][1] >= 0.9 * steps], steps, "step")
    if per_call > 1:  # Lightning's loop around a call of training_step, once per per_call steps
        show("per call", [kv for kv in by_cum if 0.9 * calls <= kv[1][1] < 0.9 * steps], calls, "call")
    whole = by_cum[0][1][3]  # the training's own call: the per-epoch rows leave out the loops around it all
    per_epoch = [kv for kv in by_cum if epochs <= kv[1][1] <= 20 * epochs and kv[1][3] < whole / 2]
    show("per epoch", per_epoch, epochs, "epoch")
    show("own time", sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True), steps, "step")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
