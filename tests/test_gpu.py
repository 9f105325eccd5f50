"""Training and evaluation on a CUDA device: skipped where there is none (CPU CI), run on GPU machines.

The estimator and likelihood known-answer tests also run on the GPU there (their `device` parameters).
"""

from __future__ import annotations

import json
import math
import time

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning_utilities.core.apply_func import apply_to_collection

from conftest import ROOT, copy_prepared, curve, tiny_config
from vaerepro import cli
from vaerepro.evaluate import evaluate, load_vae, per_example
from vaerepro.train import train
from vaerepro.trainer import AtomicCheckpointIO, fused_adagrad_runs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gpu_training_and_evaluation_agree_with_the_cpu(prepared_tiny, tmp_path, precision):
    """trainer=gpu as it comes: under 32-true its steps are one CUDA graph (trainer.cuda_graph=auto), under
    bf16-mixed eager."""
    gpu_cfg = tiny_config("trainer=gpu", f"trainer.precision={precision}")
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    counts = GraphCounts()
    metrics = train(gpu_cfg, out, enable_progress_bar=False, callbacks=[counts])
    assert (counts.replays > 0) == (precision == "32-true")
    assert -450 < metrics["val_elbo"] < -150  # the band of the CPU test of the same config
    vae = load_vae(out / "models" / "best.ckpt")  # a GPU checkpoint loads on the CPU, without Lightning
    assert next(vae.parameters()).device.type == "cpu"

    per_ex = {}
    for device in ("cuda", "cpu"):
        m = evaluate(tiny_config("trainer=gpu", f"eval.device={device}"), out, progress=False)
        assert math.isfinite(m["log_px"]) and m["log_px"] >= m["elbo"] - 3 * m["log_px_se"]
        per_ex[device] = np.load(out / "artifacts" / "per_example.npz")["log_px"]
    # the same estimator on the same examples, two independent draws: paired differences are Monte Carlo
    # noise only (K = 50), far smaller than the spread across examples
    d = per_ex["cuda"] - per_ex["cpu"]
    se = d.std(ddof=1) / math.sqrt(len(d))
    assert abs(d.mean()) < max(4 * se, 0.05), (d.mean(), se)
    assert abs(d.mean()) < 1.0


def test_gpu_pipeline_end_to_end(tmp_path):
    """`vaerepro run trainer=gpu` without tracking: every stage, files and numbers."""
    cfg = tiny_config("trainer=gpu", raw_dir=tmp_path / "raw")
    metrics = cli.run_pipeline(cfg, tmp_path / "run", ROOT, progress=False)
    written = json.loads((tmp_path / "run" / "metrics" / "eval.json").read_text())
    assert written["log_px"] == metrics["log_px"] and math.isfinite(written["log_px"])
    assert written["log_px"] >= written["elbo"] - 3 * written["log_px_se"]
    assert (tmp_path / "run" / "reports" / "report.html").stat().st_size > 10_000
    # both stages name the GPU they ran on (eval.device=auto takes the CUDA device)
    trained = json.loads((tmp_path / "run" / "metrics" / "train.json").read_text())
    gpu = f"cuda:0 ({torch.cuda.get_device_name(0)})"
    assert trained["device"] == written["device"] == gpu
    assert torch.load(tmp_path / "run" / "models" / "last.ckpt", map_location="cpu", weights_only=True)[
        "optimizer_states"
    ]


def _trained(prepared_tiny, out, *overrides) -> tuple[dict, list[dict]]:
    """Train the tiny config on the GPU in out; its last.ckpt and its curve."""
    cfg = tiny_config("trainer=gpu", *overrides)
    train(cfg, copy_prepared(prepared_tiny, out), enable_progress_bar=False)
    return torch.load(out / "models" / "last.ckpt", map_location="cpu", weights_only=True), curve(out)


def test_cuda_graph_training_ends_where_eager_training_does(prepared_tiny, tmp_path):
    """trainer.compile=reduce-overhead (the objective's forward and backward as CUDA graphs) against eager,
    float32 matmuls in both; the tolerances of tests/test_compile.py."""
    fp32 = "trainer.matmul_precision=highest"
    eager, curve_eager = _trained(prepared_tiny, tmp_path / "eager", fp32, "trainer.cuda_graph=false")
    graphs, curve_graphs = _trained(
        prepared_tiny, tmp_path / "graphs", fp32, "trainer.compile=reduce-overhead"
    )
    assert eager["global_step"] == graphs["global_step"] > 0
    assert eager["state_dict"].keys() == graphs["state_dict"].keys()
    diff = max(
        (eager["state_dict"][k] - graphs["state_dict"][k]).abs().max().item() for k in eager["state_dict"]
    )
    assert diff < 1e-2, diff
    for a, b in zip(curve_eager, curve_graphs, strict=True):
        for key in ("train_elbo", "val_elbo"):
            assert abs(a[key] - b[key]) < 1e-2, (key, a, b)


def test_cuda_graph_training_with_dropout_resumes_where_it_stopped(prepared_tiny, tmp_path):
    """Dropout's masks inside the graphs are drawn from the per-batch seeds train.VAEModule sets: a training
    stopped after 2 epochs and resumed for a third ends where 3 uninterrupted epochs do."""
    mode = ("trainer.compile=reduce-overhead", "model.dropout=0.1", "trainer.matmul_precision=highest")
    whole, _ = _trained(prepared_tiny, tmp_path / "whole", *mode)
    out = tmp_path / "resumed"
    _trained(prepared_tiny, out, *mode, "train.max_epochs=2")
    train(tiny_config("trainer=gpu", *mode, "train.resume=true"), out, enable_progress_bar=False)
    resumed = torch.load(out / "models" / "last.ckpt", map_location="cpu", weights_only=True)
    assert whole["global_step"] == resumed["global_step"]
    diff = max(
        (whole["state_dict"][k] - resumed["state_dict"][k]).abs().max().item() for k in whole["state_dict"]
    )
    assert diff < 1e-5, diff


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_gpu_reduced_precision_evaluation_is_measured_against_float32(prepared_tiny, tmp_path, precision):
    """eval.precision on CUDA: the matmul precision is TF32 ("high") only while sampling under tf32 and put
    back after; the recorded difference is the two stages' paired per-example difference (same device, same
    noise), within 0.1 nats/example (estimators.LADDER_GAIN_TOL_NATS) of float32."""
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    train(tiny_config("train.max_epochs=1"), out, enable_progress_bar=False)
    seen = []
    vae = load_vae(out / "models" / "best.ckpt")
    vae.decoder.register_forward_hook(lambda *a: seen.append(torch.get_float32_matmul_precision()))
    x = torch.bernoulli(torch.full((8, vae.data_dim), 0.3))
    per_example(
        vae, x, num_samples=10, batch_size=8, chunk_size=5, seed=0, device="cuda", precision=precision
    )
    assert set(seen) == {"high" if precision == "tf32" else "highest"}  # the hook runs in per_example's copy

    before = torch.get_float32_matmul_precision()
    runs = {}
    for p in ("32", precision):
        cfg = tiny_config("train.max_epochs=1", "eval.device=cuda", f"eval.precision={p}")
        runs[p] = evaluate(cfg, out, progress=False), np.load(out / "artifacts" / "per_example.npz")["log_px"]
    assert torch.get_float32_matmul_precision() == before
    (m32, full), (m, reduced) = runs["32"], runs[precision]
    d = reduced - full
    rec = m["precision"]
    assert rec["name"] == precision and rec["examples"] == len(full) and m32["precision"] == {"name": "32"}
    assert rec["log_px_diff"] == pytest.approx(d.mean(), abs=1e-6)
    assert rec["log_px_diff_max_abs"] == pytest.approx(np.abs(d).max(), abs=1e-6)
    assert abs(rec["log_px_diff"]) < 0.1 and abs(m["log_px"] - m32["log_px"]) < 0.1
    if precision == "bf16":
        assert rec["log_px_diff_max_abs"] > 0  # bfloat16 rounds the networks' outputs


def test_training_batches_are_gathered_on_the_device(prepared_tiny):
    """The training split sits on the GPU (datamodule.resident) and each batch is gathered there, the same
    rows as the host path's."""
    from vaerepro.datamodule import EpochBatches, TensorBatches, VAEData, resident

    data = VAEData(prepared_tiny / "prepared", "binary", 50, 0, latent_dim=4)
    data.setup()
    (x,) = resident(torch.device("cuda"), data.x_train)
    assert x.device.type == "cuda"
    on_gpu = list(TensorBatches(EpochBatches(len(x), 50, shuffle=True, seed=3, device=x.device), x))
    on_host = list(TensorBatches(EpochBatches(len(x), 50, shuffle=True, seed=3), data.x_train))
    assert all(b.device.type == "cuda" for b in on_gpu) and len(on_gpu) == len(on_host) > 1
    assert all(torch.equal(a.cpu(), b) for a, b in zip(on_gpu, on_host, strict=True))


@pytest.mark.parametrize(
    "mode", ["null", "reduce-overhead", "cuda-graph", "cuda-graph-1-step-a-call", "cuda-graph-adagrad"]
)
def test_training_steps_do_not_synchronise_with_the_host(prepared_tiny, tmp_path, mode):
    """No step of training waits for the GPU: from the second epoch on (the first compiles and records the
    graphs), every training step, batch start to batch end, runs under torch.cuda.set_sync_debug_mode
    ("error"), which raises at any call that synchronises the host with the device (.item(), a copy to
    the host, a blocking copy from pageable memory). Epoch ends synchronise once, for the logged means."""

    class NoSync(pl.Callback):
        def __init__(self):
            self.steps = 0  # steps run under the sync check

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch >= 1:
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if torch.cuda.get_sync_debug_mode():
                self.steps += 1
            torch.cuda.set_sync_debug_mode(0)

    out = copy_prepared(prepared_tiny, tmp_path / "run")
    # trainer=gpu's default trainer.cuda_graph=auto is the graph; compile=null with it false is eager
    switch = "trainer.cuda_graph=true" if mode.startswith("cuda-graph") else f"trainer.compile={mode}"
    switch = (switch, "trainer.cuda_graph=false") if mode == "null" else (switch,)
    switch += ("trainer.steps_per_call=1",) if mode.endswith("a-call") else ()  # trainer=gpu's: 500
    if mode.endswith("adagrad"):
        needs_fused_cuda_adagrad()
        switch += ADAGRAD
    cfg = tiny_config("trainer=gpu", *switch)
    checked = NoSync()
    try:
        train(cfg, out, enable_progress_bar=False, callbacks=[checked])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert checked.steps > 0


class GraphCounts(pl.Callback):
    """The module's StepGraph counters at the end of training (trainer.cuda_graph)."""

    def on_train_end(self, trainer, module):
        graph = module.step_graph
        self.captures, self.replays = (graph.captures, graph.replays) if graph is not None else (0, 0)


# AEVB's optimiser (the paper presets'): torch's fused Adagrad, in the graph as eagerly (CapturableAdagrad)
ADAGRAD = ("train.optimizer=adagrad", "train.lr=0.02")


def needs_fused_cuda_adagrad() -> None:
    """Skip a test of Adagrad's update inside the graph where this torch has no fused Adagrad kernel for CUDA
    (torch 2.11): training then takes eager steps on foreach kernels, which
    test_adagrad_trains_on_the_gpu_with_the_kernels_this_torch_has checks."""
    if not fused_adagrad_runs("cuda"):
        pytest.skip(f"torch {torch.__version__} has no fused Adagrad kernel for CUDA (the graph's update)")


def test_adagrad_trains_on_the_gpu_with_the_kernels_this_torch_has(prepared_tiny, tmp_path, caplog):
    """AEVB's optimiser on trainer=gpu asking for the graph: where torch has a fused Adagrad kernel for CUDA
    the steps replay the graph; where it has none (torch 2.11, whose first fused step raised a RuntimeError
    on an H200), the steps run eagerly on foreach kernels, and the log says both. Either way it trains:
    the validation ELBO rises every epoch, inside the band of the CPU test's Adam training."""
    counts = GraphCounts()
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    cfg = tiny_config("trainer=gpu", *ADAGRAD, "trainer.cuda_graph=true")
    with caplog.at_level("WARNING", logger="vaerepro"):
        metrics = train(cfg, out, enable_progress_bar=False, callbacks=[counts])
    val = [row["val_elbo"] for row in curve(out)]
    assert -450 < metrics["val_elbo"] < -150 and all(val[i + 1] > val[i] for i in range(len(val) - 1)), val
    if fused_adagrad_runs("cuda"):
        assert counts.replays > 0 and "no fused Adagrad kernel" not in caplog.text
    else:
        assert counts.replays == 0
        assert "train.optimizer=adagrad: torch" in caplog.text and "the steps run eagerly" in caplog.text
        assert "train.fused: torch" in caplog.text and "runs its foreach kernels" in caplog.text


# (overrides, captures in 3 epochs): a constant rate, one graph; IWAE's schedule changes the rate after
# epoch 0 (stage 0 -> 1), so a second capture; clipping inside the graph; Adagrad's update in it
GRAPH_CASES = {
    "constant": ((), 1),
    "iwae-schedule-and-clipping": (("train.lr_schedule=iwae", "train.grad_clip_value=0.5"), 2),
    "adagrad": (ADAGRAD, 1),
}


@pytest.mark.parametrize("case", GRAPH_CASES)
def test_whole_step_cuda_graph_training_ends_where_eager_training_does(prepared_tiny, tmp_path, case):
    """trainer.cuda_graph=true (forward, backward, clipping and Adam's update as one replayed CUDA graph;
    cudagraph.py) against eager training on the same seed, float32 matmuls in both: the same number of
    optimiser steps (Lightning counts the graph's), weights and curves within the tolerances of the
    reduce-overhead test (Adam's foreach kernels against the eager training's fused ones), and the steps
    of full batches were graph replays."""
    overrides, captures = GRAPH_CASES[case]
    if case == "adagrad":
        needs_fused_cuda_adagrad()
    fp32 = ("trainer.matmul_precision=highest", *overrides)
    eager, curve_eager = _trained(prepared_tiny, tmp_path / "eager", *fp32, "trainer.cuda_graph=false")
    counts = GraphCounts()
    cfg = tiny_config("trainer=gpu", *fp32, "trainer.cuda_graph=true")
    out = copy_prepared(prepared_tiny, tmp_path / "graph")
    train(cfg, out, enable_progress_bar=False, callbacks=[counts])
    graph = torch.load(out / "models" / "last.ckpt", map_location="cpu", weights_only=True)
    assert eager["global_step"] == graph["global_step"] > 0
    full_batches = 3 * (json.loads((out / "prepared" / "meta.json").read_text())["sizes"]["train"] // 50)
    assert counts.captures == captures and counts.replays == full_batches - 3  # 3 eager warm-up steps
    diff = max(
        (eager["state_dict"][k] - graph["state_dict"][k]).abs().max().item() for k in eager["state_dict"]
    )
    assert diff < 1e-2, diff
    for a, b in zip(curve_eager, curve(out), strict=True):
        for key in ("train_elbo", "val_elbo"):
            assert abs(a[key] - b[key]) < 1e-2, (key, a, b)


def test_background_checkpoint_writes_touch_no_cuda_tensor_while_the_graph_is_captured_again(
    prepared_tiny, tmp_path, monkeypatch
):
    """trainer.BackgroundCheckpointIO's thread writes host copies of the tensors: a copy from the device made
    by that thread during a capture on the training's thread would make the capture fail. Here every write
    takes 0.3 s, so the epoch-0 checkpoints are still being written when the IWAE schedule's new rate is
    captured at epoch 1's start: the training ends with its two captures, its three epochs on the curve and
    last.ckpt from the third epoch's end."""
    devices, atomic_save = [], AtomicCheckpointIO.save_checkpoint

    def slow_save(self, checkpoint, path, storage_options=None):
        apply_to_collection(checkpoint, torch.Tensor, lambda t: devices.append(t.device.type))
        time.sleep(0.3)
        atomic_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", slow_save)
    counts, out = GraphCounts(), copy_prepared(prepared_tiny, tmp_path / "run")
    cfg = tiny_config(
        "trainer=gpu", "trainer.cuda_graph=true", "train.lr_schedule=iwae", "train.checkpoint_every_s=0"
    )
    train(cfg, out, enable_progress_bar=False, callbacks=[counts])
    assert counts.captures == 2 and counts.replays > 0
    assert devices and set(devices) == {"cpu"}
    last = torch.load(out / "models" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2 and len(curve(out)) == 3  # written at the third epoch's end (from 0: 2)


@pytest.mark.parametrize("optimiser", ["adam", "adagrad"])
def test_whole_step_cuda_graph_training_resumes_where_it_stopped(prepared_tiny, tmp_path, optimiser):
    """A graph training stopped after 2 epochs and resumed for a third ends where 3 uninterrupted epochs do
    (the resumed process warms up eagerly and captures again: the same kernels); and one resumed from an
    eager training's checkpoint (fused Adam's or Adagrad's state; Adagrad's also unfused, its step counts on
    the host) trains on in the graph."""
    mode = ("trainer.cuda_graph=true", "trainer.matmul_precision=highest")
    if optimiser == "adagrad":
        needs_fused_cuda_adagrad()
        mode += ADAGRAD
    whole, _ = _trained(prepared_tiny, tmp_path / "whole", *mode)
    eager = ("trainer.cuda_graph=false", *mode[1:])
    # Adagrad: from its eager states (a graph's own state is Adam's case: the same mechanism)
    firsts = [("graph", mode), ("eager", eager)] if optimiser == "adam" else [("eager", eager)]
    firsts += [("eager-unfused", (*eager, "train.fused=false"))] * (optimiser == "adagrad")
    for name, first in firsts:
        out = tmp_path / name
        _trained(prepared_tiny, out, *first, "train.max_epochs=2")
        counts = GraphCounts()
        # train.fused is the training's to keep (a resume refuses a change); the graph's Adagrad is fused
        kept = [o for o in first if o.startswith("train.fused")]
        cfg = tiny_config("trainer=gpu", *mode, *kept, "train.resume=true")
        train(cfg, out, enable_progress_bar=False, callbacks=[counts])
        resumed = torch.load(out / "models" / "last.ckpt", map_location="cpu", weights_only=True)
        assert whole["global_step"] == resumed["global_step"] and counts.replays > 0
        diff = max(
            (whole["state_dict"][k] - resumed["state_dict"][k]).abs().max().item()
            for k in whole["state_dict"]
        )
        assert diff < (1e-4 if name == "graph" else 1e-2), (name, diff)


def test_several_graph_steps_per_call_train_as_one_step_per_call(prepared_tiny, tmp_path):
    """trainer.steps_per_call=4 with the step as one CUDA graph: each minibatch of a call still replays the
    graph (or, the last short one, runs eagerly), on the same draws as one step per call; the weights end
    within the resume test's 1e-4 (the same kernels on the same inputs). That its steps never wait for the
    device: test_training_steps_do_not_synchronise_with_the_host."""
    mode = ("trainer.cuda_graph=true", "trainer.matmul_precision=highest")
    one, curve_one = _trained(prepared_tiny, tmp_path / "one", *mode, "trainer.steps_per_call=1")
    counts = GraphCounts()
    cfg = tiny_config("trainer=gpu", *mode, "trainer.steps_per_call=4")
    out = copy_prepared(prepared_tiny, tmp_path / "four")
    train(cfg, out, enable_progress_bar=False, callbacks=[counts])
    four = torch.load(out / "models" / "last.ckpt", map_location="cpu", weights_only=True)
    full_batches = 3 * (json.loads((out / "prepared" / "meta.json").read_text())["sizes"]["train"] // 50)
    assert one["global_step"] == four["global_step"] and counts.replays == full_batches - 3
    diff = max((one["state_dict"][k] - four["state_dict"][k]).abs().max().item() for k in one["state_dict"])
    assert diff < 1e-4, diff
    for a, b in zip(curve_one, curve(out), strict=True):
        for key in ("train_elbo", "val_elbo"):
            assert abs(a[key] - b[key]) < 1e-3, (key, a, b)
