"""Where a training's host time goes: cProfile of `vaerepro.train.train` at full-MNIST epoch length.

    python benchmarks/profile_train.py [--epochs 3] [--override KEY=VALUE ...]

The AEVB model on the embedded digits tiled to 50,000 training images (bench.prepare_data, 500 steps an
epoch), without tracking. On a GPU (`--override trainer=gpu`) the host's Python is what bounds a small
model's training, so the host time per call is the time: printed per training step and per epoch for the
functions that take the most of it, cumulative (a function's callees included) and own (tottime). cProfile
slows the Python it measures, by about as much everywhere, so read the shares, not the absolute times.
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

from vaerepro import config as config_mod
from vaerepro.train import train

ROOT = bench.ROOT  # the repository


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--override", action="append", default=[], help="Hydra override (repeatable)")
    ap.add_argument("--top", type=int, default=40, help="functions to print")
    args = ap.parse_args()
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
    profile = cProfile.Profile()
    profile.enable()
    train(cfg, work / "run", enable_progress_bar=False)
    profile.disable()
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (primitive calls, calls, own s, cum s, _)
    epochs, steps = args.epochs, args.epochs * 500
    per_call = cfg.trainer.steps_per_call  # optimiser steps per call of training_step (Lightning's loop)
    calls = epochs * math.ceil(500 / per_call)
    print(
        f"{epochs} epochs of 500 steps, {per_call} a call of training_step, "
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
