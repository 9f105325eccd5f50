"""The software a result was computed with: Python's, vaerepro's and its libraries' versions.

A torch or Lightning release can move a log p(x) by float rounding or change a default, so metrics/train.json
and metrics/eval.json record the versions of the process that wrote them, the report prints them, the
MLflow run carries them as tags, and a reproduction card lists them; `vaerepro --version` prints the same.
Read from the installed packages' metadata, which imports none of them (mlflow or dvc in a stage would cost
seconds).
"""

from __future__ import annotations

import importlib.metadata
import platform

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


def versions_text(recorded: dict[str, str]) -> str:
    """`versions()` (or a file's record of it) on one line: "python 3.11.7, vaerepro 0.1.0, torch ..."."""
    return ", ".join(f"{name} {version}" for name, version in recorded.items())
