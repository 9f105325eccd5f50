"""Benchmark: training throughput of the harness against a minimal PyTorch loop, and evaluation throughput.

    python benchmarks/bench.py [--epochs 6] [--repeats 3] [--num-samples 1000]

Both trainings use the AEVB model (784-500-Z-500-784, tanh), the embedded MNIST train split (3,500
digits), batch 100, Adam, one validation pass per epoch; the harness runs with its normal logging on
(MLflow to a temporary sqlite store, Lightning's progress bar). Figures are per-epoch times after a warm-up
epoch. Evaluation: importance-sampled log p(x) on the 1,000 test digits, throughput in (example, sample)
pairs per second, and the peak resident memory it added, for two K at the same chunk size (memory must not
grow with K).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from vaerepro import config as config_mod
from vaerepro import data, estimators
from vaerepro.baseline import train_minimal
from vaerepro.evaluate import TEST_SEED_OFFSET, load_vae, per_example
from vaerepro.train import VAL_SEED_OFFSET, VAEData, _no_distribution_validation, build_module, train

ROOT = Path(__file__).resolve().parents[1]


class EpochTimer(pl.Callback):
    """Epoch times (training + validation) and step times (batch start to batch end, Lightning's own
    per-step work between the hooks included)."""

    def __init__(self):
        self.times: list[float] = []
        self.steps: list[float] = []

    def on_train_epoch_start(self, trainer, module):
        self._t = time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._s = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append(time.perf_counter() - self._s)

    def on_validation_epoch_end(self, trainer, module):
        # validation runs inside the training epoch; count it, as the minimal loop does
        if not trainer.sanity_checking:
            self.times.append(time.perf_counter() - self._t)


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_during(fn):
    """Run fn() while sampling resident memory every 5 ms; return (result, seconds, peak extra bytes)."""
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    done.set()
    t.join()
    return result, elapsed, max(0, peak[0] - base)


def train_objective_by_hand(cfg, prepared: Path, x_val: torch.Tensor, device: str) -> list[float]:
    """Epoch times of the harness's own training step (`VAEModule.shard_loss`: the seeded per-batch data
    draw and noise, the torch.distributions objective) in a plain loop with the same optimiser and a
    validation pass: separates what the objective costs from what Lightning and tracking cost."""
    torch.manual_seed(cfg.seed)
    data = VAEData(prepared, cfg.data_space, cfg.train.batch_size, cfg.seed)
    data.setup()
    module = build_module(cfg, data).to(device)
    opt = module.configure_optimizers()
    x_train, x_val = data.x_train.to(device), x_val.to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    with _no_distribution_validation():
        for epoch in range(cfg.train.max_epochs):
            start = time.perf_counter()
            order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch))
            for i, idx in enumerate(order.split(cfg.train.batch_size)):
                loss, _ = module.shard_loss(x_train[idx.to(device)], epoch, i, 0, 1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sync()
            with torch.no_grad():
                val = sum(
                    estimators.elbo(module.vae, v, 1, "B").sum() for v in x_val.split(cfg.train.batch_size)
                )
                float(val)
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--latent-dim", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--no-tracking", action="store_true", help="the harness without MLflow")
    ap.add_argument(
        "--trainer", default="cpu", help="conf/trainer preset: cpu or gpu (then all three loops use CUDA)"
    )
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3, help="alternating harness/minimal runs")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")

    work = Path(tempfile.mkdtemp(prefix="vaerepro-bench-"))
    data.fetch("mnist5k", work / "raw")
    data.prepare("mnist5k", work / "raw", work / "prepared", seed=0)
    splits = data.load_prepared(work / "prepared")
    n_train = len(splits.train)

    # --- training: harness (logging on) vs minimal loop ------------------------------------------------
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    raw = config_mod.compose(
        [
            f"train.max_epochs={args.epochs}",
            f"model.latent_dim={args.latent_dim}",
            f"train.batch_size={args.batch_size}",
            f"trainer={args.trainer}",
            f"tracking.enabled={str(not args.no_tracking).lower()}",
            f"data.raw_dir={work / 'raw'}",
        ],
        config_dir=ROOT / "conf",
    )
    cfg = config_mod.validate(raw)
    device = "cuda" if cfg.trainer.accelerator == "gpu" else "cpu"
    x_val = data.fixed_space(splits.val, "binary", quantized=True, seed=cfg.seed + VAL_SEED_OFFSET)
    x_test = data.fixed_space(splits.test, "binary", quantized=True, seed=cfg.seed + TEST_SEED_OFFSET)
    # Alternate the loops, `repeats` times each: on a shared 2-core machine the speed of one loop drifts by
    # 10-20 % over a minute, which one harness run followed by one minimal run would read as overhead.
    h_epochs, c_epochs, b_epochs, h_steps, b_steps, ratios = [], [], [], [], [], []
    for r in range(args.repeats):
        timer, run = EpochTimer(), work / f"run{r}"
        run.mkdir()
        (run / "prepared").symlink_to(work / "prepared")
        train(cfg, run, root=work, callbacks=[timer], enable_progress_bar=True)
        core = train_objective_by_hand(cfg, work / "prepared", x_val, device)
        base = train_minimal(
            torch.from_numpy(splits.train),
            x_val,
            x_test,
            latent_dim=args.latent_dim,
            hidden=500,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=cfg.seed,
            device=device,
        )
        per_epoch = len(timer.steps) // args.epochs
        h_epochs += timer.times[1:]  # after the warm-up epoch
        c_epochs += core[1:]
        b_epochs += base.epoch_times[1:]
        h_steps += timer.steps[per_epoch:]
        b_steps += base.step_times[per_epoch:]
        h, c, b = (statistics.median(t[1:]) for t in (timer.times, core, base.epoch_times))
        ratios.append(h / b)
        print(
            f"repeat {r + 1}: harness {h * 1000:.1f}, harness objective by hand {c * 1000:.1f}, "
            f"minimal {b * 1000:.1f} ms/epoch (ratio {h / b:.3f})",
            flush=True,
        )
    h_epoch, c_epoch, b_epoch = (statistics.median(t) for t in (h_epochs, c_epochs, b_epochs))
    print(f"\n== training (per epoch, median over {args.repeats} alternating runs after warm-up) ==")
    print(
        f"harness  : {h_epoch * 1000:8.1f} ms/epoch  {n_train / h_epoch:9.0f} images/s"
        f"  (Lightning; {'' if args.no_tracking else 'MLflow, '}progress bar, checkpoints on)"
    )
    print(
        f"by hand  : {c_epoch * 1000:8.1f} ms/epoch  {n_train / c_epoch:9.0f} images/s"
        "  (the harness's objective and data draw in a plain loop: no Lightning, no logging)"
    )
    print(f"minimal  : {b_epoch * 1000:8.1f} ms/epoch  {n_train / b_epoch:9.0f} images/s")
    print(
        f"ratio harness/minimal time: {h_epoch / b_epoch:.3f}  (target <= 1.10; per repeat "
        f"{min(ratios):.3f}-{max(ratios):.3f}); of which objective {c_epoch / b_epoch:.3f}, "
        f"Lightning + tracking {h_epoch / c_epoch:.3f}"
    )
    h_step, b_step = statistics.median(h_steps), statistics.median(b_steps)
    print(
        f"per step : harness {h_step * 1000:.2f} ms, minimal {b_step * 1000:.2f} ms "
        f"(ratio {h_step / b_step:.3f}); "
        f"per epoch outside the {per_epoch} steps: harness {(h_epoch - per_epoch * h_step) * 1000:.1f} ms, "
        f"minimal {(b_epoch - per_epoch * b_step) * 1000:.1f} ms (validation, checkpoints, logging)"
    )

    # --- evaluation: throughput and memory for two K at one chunk size -----------------------------------
    vae = load_vae(work / "run0" / "models" / "best.ckpt")
    print("\n== evaluation: importance-sampled log p(x), 1,000 test digits ==")
    for k in (args.num_samples, 5 * args.num_samples):
        x = x_test if k == args.num_samples else x_test[:200]

        def run(x=x, k=k):
            return per_example(
                vae,
                x,
                num_samples=k,
                batch_size=cfg.eval.batch_size,
                chunk_size=cfg.eval.chunk_size,
                seed=cfg.eval.seed,
                device=device,
            )

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        res, secs, extra = peak_rss_during(run)  # host memory
        gpu = ""
        if device == "cuda":
            gpu = f", GPU peak +{(torch.cuda.max_memory_allocated() - before) / 2**20:.1f} MiB"
        pairs = len(x) * k
        print(
            f"K={k:5d} on {len(x):4d} digits: {secs:7.2f} s  {pairs / secs:11.0f} samples/s  "
            f"peak +{extra / 2**20:6.1f} MiB{gpu}  log p(x) = {float(res['log_px'].mean()):.2f} nats "
            f"(chunk {cfg.eval.chunk_size} x batch {cfg.eval.batch_size})"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
