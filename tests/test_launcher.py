"""Hydra's submitit launcher: the shipped SLURM config composes, and the local executor runs a real sweep."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT, TINY, run


@pytest.mark.slow
def test_shipped_slurm_launcher_config_composes():
    proc = run(
        [
            sys.executable,
            "-m",
            "vaerepro.cli",
            "run",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "--cfg",
            "hydra",
            "--package",
            "hydra.launcher",
        ],
        ROOT,
    )
    text = proc.stdout
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in text
    assert "partition: gpu" in text and "gpus_per_node: 1" in text and "timeout_min: 240" in text


@pytest.mark.slow
def test_submitit_local_launcher_runs_each_configuration_as_a_job(raw_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    run(
        [
            "vaerepro",
            "run",
            "--multirun",
            "hydra/launcher=submitit_local",
            *TINY,
            "tracking.enabled=false",
            f"data.raw_dir={raw_dir}",
            f"hydra.sweep.dir={sweep_dir}",
            "model.latent_dim=2,3",
        ],
        ROOT,
    )
    results = sorted(sweep_dir.glob("*/metrics/eval.json"))
    assert [p.parent.parent.name for p in results] == ["0_bernoulli_z2_s0", "1_bernoulli_z3_s0"]
    assert [json.loads(p.read_text())["latent_dim"] for p in results] == [2, 3]
    assert list((sweep_dir / ".submitit").iterdir()), "the jobs ran through submitit"
