"""The benchmark script runs end to end and prints every figure the README and the closing notes quote."""

from __future__ import annotations

import re
import sys

import pytest

from conftest import ROOT, run


@pytest.mark.slow
def test_bench_prints_training_ratios_and_evaluation_figures(tmp_path):
    out = run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench.py"),
            "--epochs",
            "5",  # three timed epoch pairs: their median survives one stalled epoch on a busy machine
            "--repeats",
            "1",
            "--num-samples",
            "20",
        ],
        cwd=tmp_path,
        env={"TMPDIR": str(tmp_path)},
    ).stdout
    for loop in ("harness", "minimal", "minimal fused", "by hand"):
        assert re.search(rf"^{loop} +: +[\d.]+ ms/epoch +\d+ images/s", out, re.M), (loop, out)
    ratios = {
        name: float(value)
        for name, value in re.findall(r"^ratio harness/(minimal|minimal fused) time: ([\d.]+)", out, re.M)
    }
    assert set(ratios) == {"minimal", "minimal fused"} and all(0.2 < r < 5 for r in ratios.values()), out
    assert re.search(r"like for like = objective [\d.]+ x Lightning \+ tracking [\d.]+", out), out
    evals = re.findall(
        r"^K=\s*(\d+) on\s+(\d+) digits: .* ([\d.]+) samples/s .*log p\(x\) = (-[\d.]+) nats", out, re.M
    )
    assert [(int(k), int(n)) for k, n, _, _ in evals] == [(20, 1000), (100, 200)], out
    # an untrained-to-trained Bernoulli model of MNIST after 3 epochs: between -543 (784 log 2) and -80
    assert all(-543 < float(lp) < -80 for *_, lp in evals), out
