"""The code and the software a result was computed with: the project's git commit, and Python's, vaerepro's
and its libraries' versions.

A change to the code, or a torch or Lightning release, can move a log p(x) (a release by float rounding or a
changed default), so metrics/train.json and metrics/eval.json record the commit and the versions of the
process that wrote them, the report prints them, the MLflow run carries them as tags, and a reproduction
card lists them; `vaerepro --version` prints the same. The versions are read from the installed packages'
metadata, which imports none of them (mlflow or dvc in a stage would cost seconds).
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path

# Beside the harness: what its numbers depend on (torch, numpy, lightning), what composes and records its
# config and results (hydra-core, mlflow), what sweeps and versions its pipeline (optuna, dvc)
LIBRARIES = ("torch", "numpy", "lightning", "hydra-core", "mlflow", "optuna", "dvc")


def package_version(name: str) -> str:
    """The installed version of distribution `name` (torch's with its build, `2.13.0+cpu`), or "not
    installed"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """{"python": "3.11.7", "vaerepro": "0.1.0", "torch": "2.13.0+cpu", ...}: this process's, in the order
    of LIBRARIES after Python and vaerepro."""
    return {
        "python": platform.python_version(),
        "vaerepro": package_version("vaerepro"),
        **{name: package_version(name) for name in LIBRARIES},
    }


def versions_text(recorded: Mapping[str, str]) -> str:
    """`versions()` (or a file's record of it) on one line: "python 3.11.7, vaerepro 0.1.0, torch ..."."""
    return ", ".join(f"{name} {version}" for name, version in recorded.items())


# Files the pipeline itself writes or rewrites (dvc repro, dvc exp run -S): a change in them does not make the
# code a run used differ from its commit (the config is logged as params, the data by its digest).
PIPELINE_FILES = ("dvc.lock", "params.yaml", "data.dvc", "metrics", "plots", "reports")


def git_commit(root: Path) -> str | None:
    """The commit of the project at `root`: HEAD's, with '-dirty' when tracked files under `root` other than
    the pipeline's own differ from it; None outside a git checkout, or without git.

    Read-only: `git status` would otherwise refresh the index under .git/index.lock, and a run killed (kill
    -9, a scheduler, the timeout below) while it holds that lock leaves it behind, so the user's next git
    command, and dvc's, fails with "index.lock: File exists". --no-optional-locks (git >= 2.15) skips it."""
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            [
                "git",
                "--no-optional-locks",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                *(f":(exclude){f}" for f in PIPELINE_FILES),
            ],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return res.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
