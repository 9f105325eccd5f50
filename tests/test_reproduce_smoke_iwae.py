"""`vaerepro reproduce NAME --smoke` end to end for every IWAE preset (one and two stochastic layers, the
VAE and IWAE objectives, k = 1, 5, 50); the others: test_reproduce_smoke_aevb_cb.py."""

from __future__ import annotations

import pytest

from smoke_reproduction import check_smoke
from vaerepro.reproductions import presets as P

NAMES = sorted(n for n in P.PRESETS if n.startswith("iwae-"))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_smoke_runs_every_step_and_is_not_comparable(
    name, store, raw_dir, tmp_path, monkeypatch, capsys, forked
):
    check_smoke(name, store, raw_dir, tmp_path, monkeypatch, capsys, forked)
