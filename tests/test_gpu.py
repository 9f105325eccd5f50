"""Training and evaluation on a CUDA device: skipped where there is none (CPU CI), run on GPU machines.

The estimator and likelihood known-answer tests also run on the GPU there (their `device` parameters).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import ROOT, copy_prepared, tiny_config
from vaerepro import cli
from vaerepro.evaluate import evaluate, load_vae
from vaerepro.train import train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gpu_training_and_evaluation_agree_with_the_cpu(prepared_tiny, tmp_path, precision):
    gpu_cfg = tiny_config("trainer=gpu", f"trainer.precision={precision}")
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    metrics = train(gpu_cfg, out, enable_progress_bar=False)
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
    assert torch.load(tmp_path / "run" / "models" / "last.ckpt", map_location="cpu", weights_only=True)[
        "optimizer_states"
    ]
