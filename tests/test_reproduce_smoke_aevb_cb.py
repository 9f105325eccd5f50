"""`vaerepro reproduce NAME --smoke` end to end for every AEVB and continuous-Bernoulli preset (the IWAE
presets: test_reproduce_smoke_iwae.py), and a failed seed failing the reproduction."""

from __future__ import annotations

import shlex

import pytest

from smoke_reproduction import check_smoke
from vaerepro.reproductions import presets as P

NAMES = sorted(n for n in P.PRESETS if not n.startswith("iwae-"))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_smoke_runs_every_step_and_is_not_comparable(
    name, store, raw_dir, tmp_path, monkeypatch, capsys, forked
):
    check_smoke(name, store, raw_dir, tmp_path, monkeypatch, capsys, forked)


@pytest.mark.slow
def test_a_failed_seed_fails_the_reproduction_with_its_status(store, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    # a raw-data directory that cannot be made: the seed's `vaerepro run` refuses it (exit 2)
    bad = "data.raw_dir=/proc/no-such-dir"
    argv = ["aevb-mnist-z5", "--smoke", "--out", str(tmp_path), bad]
    assert P.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    out = shlex.quote(str(tmp_path))
    resume = f"vaerepro reproduce aevb-mnist-z5 {bad} --seeds 1 --smoke --out {out} --resume"
    failed = "vaerepro reproduce: seed 0: `vaerepro run` ended with status 2; its message is above"
    # a refusal (status 2) meets the same refusal when resumed as it is: mend it first
    assert err[-1] == f"{failed}; resume once what it refused is mended, with: {resume}"
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("vaerepro-smoke")
    # this one among the module's reproductions of aevb-mnist-z5: the one with the bad override
    where = f"tags.`vaerepro.preset` = 'aevb-mnist-z5' and params.user_overrides = '{bad}'"
    (parent,) = client.search_runs([exp.experiment_id], where)
    assert parent.info.status == "FAILED" and "seed 0" in parent.data.tags["vaerepro.failure"]
    assert not (tmp_path / "reports").exists()  # no card for a reproduction that did not run
