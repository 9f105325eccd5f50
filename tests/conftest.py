"""Shared fixtures: the project root, a tiny composed config, and a prepared tiny data set."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vaerepro import config as config_mod

ROOT = Path(__file__).resolve().parents[1]

# Every device this machine has, for tests parametrized by device: the CUDA cases run where a GPU exists,
# not in CPU CI (GPU kernels for log1p, expm1, tanh, sampling are not the CPU's: claims are checked on each)
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]

BIN = Path(sys.executable).parent

# A configuration small enough for CI: 600 real digits, a 64-unit MLP, 3 epochs, K=50.
TINY = [
    "data.max_examples=600",
    "model.hidden_dims=[64]",
    "model.latent_dim=4",
    "train.max_epochs=3",
    "train.batch_size=50",
    "eval.num_samples=50",
    "eval.chunk_size=20",
    "eval.batch_size=50",
    "eval.num_images=4",
]


def shrink_conf(conf_dir: Path) -> None:
    """Bake the TINY overrides into the copied conf/ so `dvc exp run -S` composes the tiny config too."""
    for override in TINY:
        key, value = override.split("=", 1)
        group, leaf = key.split(".", 1)
        path = (
            conf_dir
            / group
            / {"data": "mnist5k", "model": "mlp", "train": "default", "eval": "default"}[group]
        )
        path = path.with_suffix(".yaml")
        d = yaml.safe_load(path.read_text())
        d[leaf] = yaml.safe_load(value)
        path.write_text(yaml.safe_dump(d, sort_keys=False))


# A user's MLFLOW_TRACKING_URI must never receive test runs, and one test's must not reach the next:
# mlflow.set_tracking_uri (tracking.ensure_experiment calls it) exports the variable to the process, where
# module-scoped fixtures that start processes would pass it on.
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(autouse=True)
def _no_tracking_uri_across_tests(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def _noop() -> None:
    pass


class _SignalledWhileFinalized:
    """An object whose finalizer is where a signal's handler runs: Python prints what the handler raises
    there as "Exception ignored in ..." and drops it (SQLAlchemy's weakref callbacks, while MLflow makes a
    store)."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)
        _noop()  # Python runs the handler at the next check it makes, here in the finalizer


def drop_in_a_finalizer(signum: int) -> None:
    """Send `signum` to this process from a finalizer (vaerepro.signals keeps such a stop for its `check`)."""
    _SignalledWhileFinalized(signum)  # made and collected at once


def compose(*overrides: str) -> dict:
    return config_mod.compose(list(overrides), config_dir=ROOT / "conf")


def tiny_config(*overrides: str, tracking: bool = False, raw_dir: Path | None = None) -> config_mod.Config:
    extra = [f"tracking.enabled={str(tracking).lower()}"]
    if raw_dir is not None:
        extra.append(f"data.raw_dir={raw_dir}")
    return config_mod.validate(compose(*TINY, *extra, *overrides))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite MLflow store for a test module's runs (created once: its migration takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory) -> Path:
    """The embedded MNIST digits materialised once for the session."""
    from vaerepro import data

    d = tmp_path_factory.mktemp("raw")
    data.fetch("mnist5k", d)
    return d


@pytest.fixture(scope="session")
def prepared_tiny(tmp_path_factory, raw_dir) -> Path:
    """An out_dir whose prepared/ holds the tiny split (600 digits)."""
    from vaerepro import data

    out = tmp_path_factory.mktemp("tiny")
    data.prepare("mnist5k", raw_dir, out / "prepared", max_examples=600, seed=0)
    return out


# The sweep tests' project (test_sweep.py, test_sweep_tracking.py); test_faults.py has a `project` of its own.


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> Path:
    # one store for the module (studies have distinct names): its tables are created once
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


@pytest.fixture
def project(tmp_path, raw_dir, mlflow_db):
    """A project root (conf/ only) with a temporary MLflow store; trials read the session's raw data."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_db}",
    }
    env.pop("HYDRA_FULL_ERROR", None)
    return {"root": tmp_path, "env": env, "raw": raw_dir}


# What `vaerepro run` imports on the way through its stages, for the fork servers (tests/forked_cli.py)
RUN_IMPORTS = (
    "vaerepro.train",
    "vaerepro.tracking.training",
    "vaerepro.evaluate",
    "vaerepro.report",
    "vaerepro.report_comparison",
    "vaerepro.sweep.pruning",
    "hydra",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
)


@pytest.fixture(scope="module")
def forked(tmp_path_factory):
    """A fork server (tests/forked_cli.py), one a test module: each `vaerepro` command it runs (test_faults'
    bad inputs and project, test_cli's refused resumes, the smoke reproductions' seeds) a process of its
    own, forked from one that has imported what `vaerepro run` imports, without the ~3 s of imports the
    console script spends before it reads its command line, ~10 s where it trains."""
    from forked_cli import ForkedCli

    server = ForkedCli(BIN / "vaerepro", tmp_path_factory.mktemp("forked"), RUN_IMPORTS, timeout=1800)
    yield server
    server.close()


def copy_prepared(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "prepared", dst / "prepared")
    return dst


def run(
    cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run a command with the venv's executables first on PATH; fail with its output on error."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


class Crash(Exception):
    """Raised by tests' callbacks to stop a training part-way."""


def curve(out_dir: Path) -> list[dict[str, float]]:
    """Every epoch's row of out_dir/plots/elbo.csv: {"epoch", "train_elbo", "val_elbo"} as floats."""
    with (out_dir / "plots" / "elbo.csv").open() as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def val_curve(out_dir: Path) -> list[float]:
    """The validation ELBO of every epoch, from out_dir/plots/elbo.csv (epoch,train_elbo,val_elbo)."""
    rows = (out_dir / "plots" / "elbo.csv").read_text().splitlines()[1:]
    return [float(row.split(",")[2]) for row in rows]


def wait_for_health(url: str, what: str, timeout_s: float = 60.0) -> None:
    """Wait until the MLflow server at `url` answers /health (its first start migrates the store)."""
    import time
    import urllib.request

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{what} did not come up on 127.0.0.1")


def ctrl_c_at_a_terminal(cmd: list[str], started: Path, timeout: float = 300, **popen) -> tuple[int, str]:
    """Run `cmd` as a shell runs a job at a terminal and press Ctrl-C once the file `started` exists: the
    job's (exit status, stderr). The job has a session of its own, so the SIGINT to its process group does
    not reach pytest, and SIGINT at its default: pytest-xdist's workers ignore SIGINT, which a child would
    inherit (and then ignore Ctrl-C, as a job started in the background does)."""
    import signal
    import time

    proc = subprocess.Popen(
        cmd,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 - a test's child
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    deadline = time.monotonic() + timeout
    while not started.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C at the terminal does
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err
