"""Benchmark: training throughput of the harness against a minimal PyTorch loop, and evaluation throughput.

    python benchmarks/bench.py [--epochs 11] [--repeats 2] [--num-samples 1000] [--mnist-size]

All trainings use the AEVB model (784-500-Z-500-784, tanh), the embedded MNIST train split (3,500
digits, 35 steps an epoch; with --mnist-size the embedded digits tiled to full MNIST's 50,000 training and
10,000 validation images, 500 steps an epoch), batch 100, Adam, one validation pass per epoch. The harness
runs with its normal logging on (MLflow to a temporary sqlite store, Lightning's progress bar, best and
last checkpoints) and its default fused Adam. It is compared with a minimal hand-written loop twice: with
torch.optim.Adam as a user writes it (the target's reference) and with the fused Adam kernel (like for
like), and with the harness's own objective in a plain loop ("by hand", which splits the overhead into
objective and Lightning + tracking). On a GPU (--trainer gpu) also with the hand-written limit, the whole
step as one captured CUDA graph (`baseline.MinimalLoop(cuda_graph=True)`): `train ratio harness/cuda-graph`;
`--override trainer.cuda_graph=true` runs the harness with its whole step as one CUDA graph (cudagraph.py),
`--override trainer.compile=reduce-overhead` with its objective's forward and backward in CUDA graphs.

The loops are interleaved epoch by epoch: after each harness epoch, one epoch of each other loop runs (from
a callback, outside the harness's timing). On a shared 2-core machine one loop's speed drifts by 10-20 %
within a minute; paired epochs see the same drift, so the ratio is taken per epoch pair, then the median.
A harness epoch is timed from one epoch start to the next: steps, validation, checkpoints, logging and
Lightning's epoch bookkeeping all count. The first epoch of every loop is a warm-up and not counted.

Evaluation: importance-sampled log p(x) on the 1,000 test digits, throughput in (example, sample)
pairs per second, and the peak resident memory it added, for two K at the same chunk size (memory must not
grow with K). Then the harness's evaluation against a hand-written batched importance-sampling loop on the
same model, digits, K, batch and chunk size (`hand_written_log_px`), the two taking turns batch by batch
(`paired_eval`): the median of the turns' time ratios harness / hand-written (target on 2 CPU cores <= 1.11,
the harness at >= 90 % of the hand-written pairs/s; its keyed block noise, ladder and one-sample ELBO
should cost little over plain randn).
With --full-eval, the scale a reproduction evaluates at (with --mnist-size, 10,000 test digits x K=5,000):
the harness at each eval.precision (float32; TF32 on CUDA; bfloat16), each log p(x) beside its time, then
the hand-written loop in float32.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.nn import functional as F

from vaerepro import config as config_mod
from vaerepro import data, estimators
from vaerepro.baseline import MinimalLoop
from vaerepro.datamodule import VAL_SEED_OFFSET, VAEData
from vaerepro.evaluate import (
    AUTO_BATCH_MIN,
    TEST_SEED_OFFSET,
    load_vae,
    matmul_precision,
    per_example,
    resolve_batch_size,
    resolve_chunk_size,
)
from vaerepro.tracking.training import TrainingRun
from vaerepro.train import build_module, train, uses_cuda_graph

ROOT = Path(__file__).resolve().parents[1]


class Interleave(pl.Callback):
    """Times the harness's epochs from one epoch start to the next (everything Lightning does in between
    counts) and runs one epoch of every other loop between them, outside that timing. Also keeps the
    harness's call times (batch start to batch end: a call of training_step, trainer.steps_per_call
    optimiser steps, and Lightning's work around it; on a GPU the host's time, the device running behind,
    except the epoch's last call, which waits for it) and the optimiser steps each call took; and, per epoch,
    where its time outside the calls goes (`parts`)."""

    # An epoch's time outside its calls of training_step, in three parts that add up to it: Lightning's
    # training loop (epoch start to the first call, between calls, the last call to validation: fetching,
    # hooks, the progress bar, logging), the validation pass (its start to its end, the means included),
    # and what follows it (checkpoints, epoch-end logging and bookkeeping, to the next epoch's start)
    PARTS = ("training loop between calls", "validation", "after validation (checkpoints, epoch end)")

    def __init__(self, others: dict):
        self.others = others  # name -> object with .epoch() -> seconds
        self.times: list[float] = []
        self.steps: list[float] = []  # seconds per call
        self.counts: list[int] = []  # optimiser steps per call
        self.parts: list[dict[str, float]] = []  # per epoch: PARTS -> seconds
        self._start: float | None = None
        self._loop = 0.0  # this epoch's seconds in the training loop outside its calls, so far
        self._mark = 0.0  # when the last call (or the epoch) ended
        self._val: tuple[float, float] | None = None  # this epoch's validation start and end, if it ran

    def _close_epoch(self) -> None:
        if self._start is not None:
            now = time.perf_counter()
            self.times.append(now - self._start)
            (v0, v1), names = self._val or (self._mark, self._mark), self.PARTS
            self.parts.append({names[0]: self._loop + v0 - self._mark, names[1]: v1 - v0, names[2]: now - v1})

    def on_train_epoch_start(self, trainer, module):
        self._close_epoch()
        for loop in self.others.values():
            loop.epoch()
        self._start = self._mark = time.perf_counter()
        self._loop, self._val = 0.0, None

    def on_validation_start(self, trainer, module):
        if not trainer.sanity_checking:  # Lightning's check before the first epoch is not an epoch's
            self._val = (time.perf_counter(), 0.0)

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self._val = (self._val[0], time.perf_counter())

    def on_train_end(self, trainer, module):
        self._close_epoch()  # the last epoch; its final checkpoint and logging count, like every other's
        self._start = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._s = time.perf_counter()
        self._loop += self._s - self._mark

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if module.device.type == "cuda" and batch_idx == trainer.num_training_batches - 1:
            # On a GPU the steps are queued (no synchronisation a step, as training runs); the last step of
            # the epoch waits for them, so the steps' times add up to the steps' work and what the epoch
            # spends outside them is validation, checkpoints and logging, not the queue draining
            torch.cuda.synchronize(module.device)
        self._mark = time.perf_counter()
        self.steps.append(self._mark - self._s)
        self.counts.append(math.ceil(len(batch) / (module.train_cfg["batch_size"] * trainer.world_size)))


class ObjectiveByHand:
    """The harness's own training step (`VAEModule.shard_loss`: the seeded per-batch data draw and noise, the
    torch.distributions objective) and optimiser in a plain loop with a validation pass: separates what the
    objective costs from what Lightning and tracking cost. One epoch per ``epoch()`` call."""

    def __init__(self, cfg, prepared: Path, x_val: torch.Tensor, device: str):
        torch.manual_seed(cfg.seed)
        data = VAEData(
            prepared, cfg.data_space, cfg.train.batch_size, cfg.seed, latent_dim=cfg.model.latent_dim
        )
        data.setup()
        self.module = build_module(cfg, data).to(device)
        self.opt = self.module.configure_optimizers()
        self.x_train, self.x_val = data.x_train.to(device), x_val.to(device)
        self.batch_size, self.device, self.n = cfg.train.batch_size, device, 0
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.epoch_times: list[float] = []
        self.step_times: list[float] = []

    def epoch(self) -> float:
        start = time.perf_counter()
        order = torch.randperm(len(self.x_train), generator=torch.Generator().manual_seed(self.n))
        for i, idx in enumerate(order.split(self.batch_size)):
            t0 = time.perf_counter()
            loss, _ = self.module.shard_loss(self.x_train[idx.to(self.device)], self.n, i, 0, 1)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sync()
            self.step_times.append(time.perf_counter() - t0)
        with torch.no_grad():
            vae = self.module.vae
            float(sum(estimators.elbo(vae, v, 1, "B").sum() for v in self.x_val.split(self.batch_size)))
        self.n += 1
        self.epoch_times.append(time.perf_counter() - start)
        return self.epoch_times[-1]


@torch.no_grad()
def hand_written_log_px(
    vae, x: torch.Tensor, num_samples: int, batch_size: int, chunk_size: int, device: str
):
    """Importance-sampled log p(x) (N,), nats, as a user writes it for a Bernoulli VAE: per batch the encoder
    once; per chunk all k samples' noise in one torch.randn (k, B, Z), the decoder on (k B, Z), log w written
    out (-BCE with logits + log N(z; 0, I) - log q(z|x)), logsumexp merged with logaddexp. No bookkeeping for
    chunk- or batch-independent draws: the reference for the harness's `per_example` throughput."""
    assert vae.config["likelihood"]["name"] == "bernoulli", vae.config["likelihood"]
    vae = copy.deepcopy(vae).to(device)  # as per_example does
    log_2pi = math.log(2 * math.pi)
    out = []
    for xb in x.split(batch_size):
        xb = xb.to(device)  # (B, D)
        mu, logvar = vae.encoder(xb).chunk(2, dim=-1)  # (B, Z) each
        std, (b, z_dim) = torch.exp(0.5 * logvar), mu.shape
        log_norm_q = -0.5 * (logvar.sum(-1) + z_dim * log_2pi)  # (B,) log q's normaliser
        lse = torch.full((b,), -math.inf, device=device)
        done = 0
        while done < num_samples:
            k = min(chunk_size, num_samples - done)
            eps = torch.randn(k, b, z_dim, device=device)  # (k, B, Z)
            z = mu + std * eps
            logits = vae.decoder(z.reshape(-1, z_dim)).reshape(k, b, -1)  # (k, B, D)
            log_px_z = -F.binary_cross_entropy_with_logits(
                logits, xb.expand_as(logits), reduction="none"
            ).sum(-1)
            log_pz = -0.5 * (z.pow(2).sum(-1) + z_dim * log_2pi)  # (k, B)
            log_qz = log_norm_q - 0.5 * eps.pow(2).sum(-1)  # (k, B)
            lse = torch.logaddexp(lse, torch.logsumexp(log_px_z + log_pz - log_qz, dim=0))
            done += k
        out.append((lse - math.log(num_samples)).cpu())
    return torch.cat(out)


def outside_steps(
    epoch_times: list[float], step_times: list[float], per_epoch: int, first: int, last: int | None = None
) -> list[float]:
    """For each epoch in epoch_times[first:last]: its time less the sum of its per_epoch step times
    (step_times holds every epoch's steps in order), seconds."""
    index = range(len(epoch_times))[first:last]
    return [epoch_times[e] - sum(step_times[e * per_epoch : (e + 1) * per_epoch]) for e in index]


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


def prepare_data(work: Path, mnist_size: bool) -> list[str]:
    """The benchmark's data in work/prepared (the embedded digits, or with `mnist_size` tiled to full MNIST's
    length) and the data overrides that describe it to the harness's config."""
    data.fetch("mnist5k", work / "raw")
    if mnist_size:
        # the 5,000 digits 14 times over, split as AEVB's MNIST (50,000 / 10,000 / 10,000): epochs of full
        # MNIST's length, which cannot be downloaded here; repeated images change no arithmetic
        tiled = np.tile(data.load_raw("mnist5k", work / "raw").x, (14, 1, 1))
        np.savez(work / "tiled.npz", x=tiled)
        data.prepare(
            "npz",
            work / "raw",
            work / "prepared",
            path=work / "tiled.npz",
            val_fraction=1 / 7,
            test_fraction=1 / 7,
            seed=0,
        )
        # the harness's config says so: train refuses a prepared/ of another source or other split settings
        return [
            "data=npz",
            f"data.path={work / 'tiled.npz'}",
            f"data.val_fraction={1 / 7!r}",
            f"data.test_fraction={1 / 7!r}",
        ]
    data.prepare("mnist5k", work / "raw", work / "prepared", seed=0)
    return []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (sys.argv's without `argv`); test_bench checks gpu_check.sh's bench lines with it."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=11)
    ap.add_argument("--latent-dim", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--no-tracking", action="store_true", help="the harness without MLflow")
    ap.add_argument(
        "--trainer", default="cpu", help="conf/trainer preset: cpu or gpu (then every loop uses CUDA)"
    )
    ap.add_argument(
        "--override", action="append", default=[], help="extra Hydra override for the harness (repeatable)"
    )
    ap.add_argument(
        "--mnist-size",
        action="store_true",
        help="epochs as long as full MNIST's (the embedded digits tiled to 50,000 train, 10,000 validation)",
    )
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument(
        "--full-eval",
        action="store_true",
        help="also evaluate the whole test split (10,000 digits with --mnist-size) at K = 5 x --num-samples, "
        "the harness at each eval.precision the device has and the hand-written loop",
    )
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of all the loops")
    args = ap.parse_args(argv)
    # every loop's first epoch is a warm-up, and the harness's last epoch pairs with no other loop's epoch
    # (the callback runs them after each harness epoch): 3 epochs give one timed pair
    if args.epochs < 3:
        ap.error(f"--epochs {args.epochs}: at least 3 (the first is a warm-up, the last has no pair)")
    return args


def harness_config(args: argparse.Namespace, work: Path, data_overrides: list[str]) -> config_mod.Config:
    """The harness's resolved config: the command line's model, batch, trainer preset and overrides."""
    raw = config_mod.compose(
        [
            f"train.max_epochs={args.epochs}",
            f"model.latent_dim={args.latent_dim}",
            f"train.batch_size={args.batch_size}",
            f"trainer={args.trainer}",
            f"tracking.enabled={str(not args.no_tracking).lower()}",
            f"data.raw_dir={work / 'raw'}",
            *data_overrides,
            *args.override,
        ],
        config_dir=ROOT / "conf",
    )
    return config_mod.validate(raw)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")

    work = Path(tempfile.mkdtemp(prefix="vaerepro-bench-"))
    data_overrides = prepare_data(work, args.mnist_size)
    splits = data.load_prepared(work / "prepared")
    n_train = len(splits.train)

    # --- training: harness (logging on) vs minimal loop ------------------------------------------------
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    cfg = harness_config(args, work, data_overrides)
    device = "cuda" if cfg.trainer.accelerator == "gpu" else "cpu"
    x_val = data.fixed_space(splits.val, "binary", quantized=True, seed=cfg.seed + VAL_SEED_OFFSET)
    x_test = data.fixed_space(splits.test, "binary", quantized=True, seed=cfg.seed + TEST_SEED_OFFSET)
    # on CUDA also the hand-written limit: the whole step as one captured CUDA graph (baseline.MinimalLoop)
    names = ("minimal", "minimal fused", "by hand", *(("cuda graph",) if device == "cuda" else ()))
    epochs: dict[str, list[float]] = {k: [] for k in ("harness", *names)}
    steps: dict[str, list[float]] = {k: [] for k in ("harness", *names)}
    # per timed epoch: its time less the sum of its steps' (validation, checkpoints, logging, the loop's own
    # work between steps), seconds; the sum, not steps x the median step, as step times are skewed
    outside: dict[str, list[float]] = {k: [] for k in ("harness", *names)}
    parts: dict[str, list[float]] = {k: [] for k in Interleave.PARTS}  # the harness's outside, split
    for r in range(args.repeats):
        others = {
            name: MinimalLoop(
                torch.from_numpy(splits.train),
                x_val,
                latent_dim=args.latent_dim,
                hidden=500,
                batch_size=args.batch_size,
                seed=cfg.seed,
                device=device,
                fused=name == "minimal fused",
                cuda_graph=name == "cuda graph",
            )
            for name in names
            if name != "by hand"
        }
        others["by hand"] = ObjectiveByHand(cfg, work / "prepared", x_val, device)
        timer, run = Interleave(others), work / f"run{r}"
        run.mkdir()
        (run / "prepared").symlink_to(work / "prepared")
        # train() takes its MLflow run as a tracker since #17 (it had a root= argument before)
        tracker = TrainingRun(cfg, work, run / "models")
        train(cfg, run, callbacks=[timer], enable_progress_bar=True, tracker=tracker)
        per_epoch = math.ceil(n_train / args.batch_size)  # optimiser steps an epoch
        calls = len(timer.steps) // args.epochs  # of training_step an epoch: trainer.steps_per_call each
        # the harness's epoch e is paired with the other loops' epoch e + 1 (they run before it starts);
        # warm-ups dropped: the harness's epoch 0 and the others' epochs 0 and 1
        epochs["harness"] += timer.times[1:-1]
        steps["harness"] += [t / c for t, c in zip(timer.steps[calls:], timer.counts[calls:], strict=True)]
        outside["harness"] += outside_steps(timer.times, timer.steps, calls, first=1, last=-1)
        for epoch in timer.parts[1:-1]:
            for k, v in epoch.items():
                parts[k].append(v)
        for name, loop in others.items():
            epochs[name] += loop.epoch_times[2:]
            steps[name] += loop.step_times[2 * per_epoch :]
            outside[name] += outside_steps(loop.epoch_times, loop.step_times, per_epoch, first=2)
        print(
            f"run {r + 1}: "
            + ", ".join(f"{k} {statistics.median(v) * 1000:.1f}" for k, v in epochs.items())
            + " ms/epoch (median so far)",
            flush=True,
        )

    def paired(name: str) -> list[float]:
        return [h / o for h, o in zip(epochs["harness"], epochs[name], strict=True)]

    med = {k: statistics.median(v) for k, v in epochs.items()}
    n_pairs = len(epochs["harness"])
    print(f"\n== training: {n_pairs} interleaved epochs of each loop after warm-up ({args.repeats} runs) ==")
    # what the harness ran, resolved: trainer.cuda_graph=auto graphs the step where nothing conflicts
    steps_as = "the step one CUDA graph" if uses_cuda_graph(cfg) else "eager steps"
    what = {
        "harness": f"Lightning; {'' if args.no_tracking else 'MLflow, '}bar, checkpoints; fused Adam; "
        f"{steps_as}, {cfg.trainer.steps_per_call} a call",
        "minimal": "hand-written loop, torch.optim.Adam as a user writes it",
        "minimal fused": "the same loop with fused Adam, as the harness",
        "by hand": "the harness's objective, data draw and fused Adam in a plain loop",
        "cuda graph": "hand-written, the whole step one captured CUDA graph, capturable Adam",
    }
    for k, v in med.items():
        print(f"{k:14s}: {v * 1000:8.1f} ms/epoch  {n_train / v:9.0f} images/s  ({what[k]})")
    for name, target in (("minimal", "target <= 1.10"), ("minimal fused", "like for like")):
        r = sorted(paired(name))
        print(
            f"ratio harness/{name} time: {statistics.median(r):.3f}  ({target}; median of the {n_pairs} "
            f"epoch pairs, quartiles {r[len(r) // 4]:.3f}-{r[(3 * len(r)) // 4]:.3f})"
        )
    objective = statistics.median(
        o / m for o, m in zip(epochs["by hand"], epochs["minimal fused"], strict=True)
    )
    lightning = statistics.median(paired("by hand"))
    print(f"  like for like = objective {objective:.3f} x Lightning + tracking {lightning:.3f}")
    if "cuda graph" in epochs:
        r = sorted(paired("cuda graph"))
        print(
            f"train ratio harness/cuda-graph: {statistics.median(r):.3f}  (target <= 2; per epoch harness "
            f"{med['harness'] * 1000:.1f} ms, cuda graph {med['cuda graph'] * 1000:.1f} ms; quartiles "
            f"{r[len(r) // 4]:.3f}-{r[(3 * len(r)) // 4]:.3f}; harness {steps_as}, "
            f"trainer.compile={cfg.trainer.compile}, trainer.cuda_graph={cfg.trainer.cuda_graph}, "
            f"trainer.steps_per_call={cfg.trainer.steps_per_call})"
        )
    h_step, b_step = statistics.median(steps["harness"]), statistics.median(steps["minimal fused"])
    print(
        f"per step : harness {h_step * 1000:.2f} ms, minimal fused {b_step * 1000:.2f} ms, minimal "
        f"{statistics.median(steps['minimal']) * 1000:.2f} ms, by hand "
        f"{statistics.median(steps['by hand']) * 1000:.2f} ms (medians)"
    )
    print(
        f"per epoch outside the {per_epoch} steps (epoch less its steps: validation, checkpoints, logging, "
        "the loop's work between steps; median): "
        + ", ".join(
            f"{k} {statistics.median(v) * 1000:.1f} ms ({100 * statistics.median(v) / med[k]:.1f} %)"
            for k, v in outside.items()
            if k in ("harness", "minimal fused", "cuda graph")
        )
        + " of the epoch (target for the harness on a GPU: <= 10 %)"
    )
    print(
        "  the harness's, by part (medians): "
        + ", ".join(f"{k} {statistics.median(v) * 1000:.1f} ms" for k, v in parts.items())
    )

    # --- evaluation: throughput and memory for two K at one chunk size -----------------------------------
    vae = load_vae(work / "run0" / "models" / "best.ckpt")
    print("\n== evaluation: importance-sampled log p(x), 1,000 test digits ==")
    for k in (args.num_samples, 5 * args.num_samples):
        x = x_test[:1000] if k == args.num_samples else x_test[:200]
        # eval.batch_size and eval.chunk_size as the evaluate stage resolves them for this x and K
        batch, chunk = sizes(vae, cfg, len(x), k, device)

        def run(x=x, k=k, batch=batch, chunk=chunk):
            return per_example(
                vae, x, num_samples=k, batch_size=batch, chunk_size=chunk, seed=cfg.eval.seed, device=device
            )

        # untimed, one batch at the same K and chunks: the first call's one-off costs (CUDA's libraries
        # loading their kernels for these shapes) would otherwise count as sampling time
        run(x=x[:batch])
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
            f"(chunk {chunk} x batch {batch})"
        )

    # --- evaluation: the harness against a hand-written batched importance-sampling loop ------------------
    k, x = args.num_samples, x_test[:1000]
    batch, chunk = sizes(vae, cfg, len(x), k, device)
    with matmul_precision("32"):  # float32 matmuls, as the harness's default eval.precision=32 uses
        hand_written_log_px(vae, x[:batch], k, batch, chunk, device)  # warm-up
        turns = paired_eval(vae, x, k, batch, chunk, cfg.eval.seed, device)
    ratios = sorted(t.harness_secs / t.hand_secs for t in turns)
    harness_secs, ref_secs = (sum(getattr(t, f) for t in turns) for f in ("harness_secs", "hand_secs"))
    pairs = sum(t.pairs for t in turns)
    # every digit's estimate, from the turns that covered it (the last, where the turns repeat the split)
    harness_log_px, ref = torch.full((len(x),), math.nan, dtype=torch.float64), torch.empty(len(x))
    for t in turns:
        harness_log_px[t.rows], ref[t.rows] = t.harness_log_px, t.hand_log_px
    low, high = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    print(
        f"eval ratio harness/hand-written: {statistics.median(ratios):.3f}  (time; median of {len(turns)} "
        f"turns, quartiles {low:.3f}-{high:.3f}; "
        f"harness {pairs / harness_secs:.0f} pairs/s, hand-written {pairs / ref_secs:.0f} pairs/s; K={k}, "
        f"{len(x)} digits, chunk {chunk} x batch {batch}; log p(x) {float(harness_log_px.mean()):.2f} vs "
        f"{float(ref.mean()):.2f} nats)"
    )
    if args.full_eval:
        full_eval(vae, x_test, 5 * args.num_samples, cfg, device)
    sys.stdout.flush()


# turns of the harness's and the hand-written evaluation that the eval ratio takes its median over
EVAL_TURNS = 5


@dataclass
class EvalTurn:
    rows: slice  # the test digits this turn evaluated
    pairs: int  # (example, sample) pairs: digits x K
    harness_secs: float
    hand_secs: float
    harness_log_px: torch.Tensor  # (rows,) nats
    hand_log_px: torch.Tensor  # (rows,) nats


def paired_eval(
    vae, x: torch.Tensor, k: int, batch: int, chunk: int, seed: int, device: str, turns: int = EVAL_TURNS
) -> list[EvalTurn]:
    """The harness's `per_example` and `hand_written_log_px` on the same digits x (N, D), K = k, batch and
    chunk sizes, taking turns: one test batch each turn when x holds at least `turns` batches, otherwise
    the whole of x `turns` times over; the two run back to back within a turn, in alternating order. On a
    shared 2-core machine one loop's speed drifts by 10-20 % within a minute: the turns' time ratios see
    the same drift in both loops, and their median is the figure (as the training's epoch pairs)."""
    n_batches = math.ceil(len(x) / batch)
    groups = [range(b, b + 1) for b in range(n_batches)] if n_batches >= turns else [range(n_batches)] * turns
    out = []
    for i, group in enumerate(groups):
        rows = slice(group.start * batch, min(len(x), group.stop * batch))

        def harness(group=group):
            return per_example(
                vae, x, num_samples=k, batch_size=batch, chunk_size=chunk, seed=seed, batches=group,
                device=device,
            )["log_px"]  # fmt: skip

        def hand(rows=rows):
            return hand_written_log_px(vae, x[rows], k, batch, chunk, device)

        timed = {}
        for name, fn in (("harness", harness), ("hand", hand))[:: 1 if i % 2 == 0 else -1]:
            start = time.perf_counter()
            result = fn()  # both return their estimates on the CPU: the device's work is done
            timed[name] = (time.perf_counter() - start, result)
        out.append(
            EvalTurn(
                rows=rows,
                pairs=(rows.stop - rows.start) * k,
                harness_secs=timed["harness"][0],
                hand_secs=timed["hand"][0],
                harness_log_px=timed["harness"][1][rows],
                hand_log_px=timed["hand"][1],
            )
        )
    return out


def sizes(vae, cfg, num_examples: int, k: int, device: str) -> tuple[int, int]:
    """(test examples per batch, samples per chunk) as the evaluate stage resolves eval.batch_size and
    eval.chunk_size for num_examples examples at K = k, so the hand-written loop runs the same shapes."""
    batch = resolve_batch_size(vae, cfg.eval.batch_size, num_examples, k, device)
    return batch, resolve_chunk_size(vae, cfg.eval.chunk_size, batch, k, device)


def full_eval(vae, x_test: torch.Tensor, k: int, cfg, device: str) -> None:
    """The whole test split (10,000 digits with --mnist-size) at K = k, as a reproduction evaluates it: the
    harness's `per_example` at every eval.precision the device has (float32, TF32 on CUDA, bfloat16), then
    the hand-written batched loop in float32; seconds of sampling, pairs/s, and each log p(x) mean, so that a
    reduced precision's speed and its shift in nats are read from one run."""
    pairs = len(x_test) * k
    size = f"{len(x_test)} digits x K={k} ({pairs / 1e6:.1f} M pairs)"
    print(f"\n== evaluation: the whole test split, {size} ==")
    batch, chunk = sizes(vae, cfg, len(x_test), k, device)
    secs = {}
    for precision in ("32", "tf32", "bf16") if device == "cuda" else ("32", "bf16"):
        start = time.perf_counter()
        res = per_example(
            vae,
            x_test,
            num_samples=k,
            batch_size=batch,
            chunk_size=chunk,
            seed=cfg.eval.seed,
            device=device,
            precision=precision,
        )  # the estimates come back to the CPU: the device's work is done when this returns
        secs[precision] = time.perf_counter() - start
        print(
            f"harness eval.precision={precision:4s}: {secs[precision]:7.2f} s  "
            f"{pairs / secs[precision]:11.0f} pairs/s  log p(x) = {float(res['log_px'].mean()):.4f} nats "
            f"(chunk {chunk} x batch {batch})"
        )
    if batch != AUTO_BATCH_MIN:
        # float32 at the smallest batch eval.batch_size=auto takes (and its auto chunk): what the larger
        # batch gains, from the same run
        small_chunk = resolve_chunk_size(vae, "auto", AUTO_BATCH_MIN, k, device)
        start = time.perf_counter()
        res = per_example(
            vae, x_test, num_samples=k, batch_size=AUTO_BATCH_MIN, chunk_size=small_chunk, seed=cfg.eval.seed,
            device=device,
        )  # fmt: skip
        small, log_px = time.perf_counter() - start, float(res["log_px"].mean())
        print(
            f"harness float32, batch {AUTO_BATCH_MIN}: {small:7.2f} s  {pairs / small:11.0f} pairs/s  "
            f"log p(x) = {log_px:.4f} nats (chunk {small_chunk} x batch {AUTO_BATCH_MIN})"
        )
    with matmul_precision("32"):
        start = time.perf_counter()
        ref = hand_written_log_px(vae, x_test, k, batch, chunk, device)
        ref_secs = time.perf_counter() - start
    print(
        f"hand-written float32   : {ref_secs:7.2f} s  {pairs / ref_secs:11.0f} pairs/s  log p(x) = "
        f"{float(ref.mean()):.4f} nats"
    )
    print(
        f"eval ratio harness/hand-written, whole test split: {secs['32'] / ref_secs:.3f}  (float32; target "
        "on a GPU: 10,000 digits x K=5,000 in <= 3 s, >= 16 M pairs/s on an H200-class GPU)"
    )


if __name__ == "__main__":
    main()
