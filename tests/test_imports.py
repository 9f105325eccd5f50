"""The shape of src/: imports go one way, core <- stages <- edges, with no cycle and no private names.

The graph is read from the source (ast), imports inside functions included: a function-level import is
still a dependency, only a later one. docs/design.md draws the same graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Each module of the package in its layer. A module may import its own layer and the layers before it.
LAYERS: dict[str, tuple[str, ...]] = {
    # the science and the data: no Lightning, MLflow, Optuna or Hydra
    "core": (
        "vaerepro",
        "vaerepro.errors",
        "vaerepro.files",
        "vaerepro.versions",
        "vaerepro.signals",
        "vaerepro.quick_exit",
        "vaerepro.likelihoods",
        "vaerepro.model",
        "vaerepro.estimators",
        "vaerepro.compare",
        "vaerepro.checkpoints",
        "vaerepro.formats",
        "vaerepro.sources",
        "vaerepro.data",
        "vaerepro.config",
        "vaerepro.baseline",
        "vaerepro.document",
    ),
    # the pipeline's stages: each reads files and writes files
    "stages": (
        "vaerepro.cudagraph",
        "vaerepro.devices",
        "vaerepro.trainer",
        "vaerepro.stepsize",
        "vaerepro.train_resume",
        "vaerepro.datamodule",
        "vaerepro.train",
        "vaerepro.evaluate",
        "vaerepro.report_comparison",
        "vaerepro.report",
    ),
    # what starts stages and records them: MLflow, Optuna, the command lines, Hydra's plugin
    "edges": (
        "vaerepro.__main__",
        "vaerepro.tracking",
        "vaerepro.sweep",
        "vaerepro.reproductions",
        "vaerepro.run_dirs",
        "vaerepro.run_overrides",
        "vaerepro.params_file",
        "vaerepro.cli",
    ),
}
ORDER = list(LAYERS)
# Third-party frameworks and the only places that may import them.
FRAMEWORKS = {
    "mlflow": ("vaerepro.tracking",),  # MLflow in one place
    "optuna": ("vaerepro.sweep", "hydra_plugins"),
    "hydra": (
        "vaerepro.cli",
        "vaerepro.run_dirs",
        "vaerepro.run_overrides",
        "vaerepro.config",
        "vaerepro.sweep",
        "hydra_plugins",
    ),
    "lightning": (
        "vaerepro.trainer",
        "vaerepro.stepsize",
        "vaerepro.datamodule",
        "vaerepro.train",
        "vaerepro.train_resume",
        "vaerepro.tracking.training",
        "vaerepro.sweep.pruning",
    ),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts and parts[0] in ("vaerepro", "hydra_plugins"):
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            for a in node.names:
                sub = f"{base}.{a.name}"
                # `from pkg import submodule` depends on the submodule; `from mod import name` on mod
                found.append((sub if sub in MODULES else base, a.name, node.lineno))
    return found


def _edges() -> dict[str, set[str]]:
    return {
        name: {m for m, _, _ in _imports(name, path) if m in MODULES and m != name}
        for name, path in MODULES.items()
    }


def _layer(module: str) -> str | None:
    best = None
    for layer, members in LAYERS.items():
        for m in members:
            if (module == m or module.startswith(m + ".")) and (best is None or len(m) > len(best[1])):
                best = (layer, m)
    if module.startswith("hydra_plugins"):
        return "edges"
    return best[0] if best else None


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) is None] == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (a path ending where it began), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(_edges())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_go_from_edges_to_stages_to_core():
    wrong = [
        f"{m} ({_layer(m)}) imports {n} ({_layer(n)})"
        for m, targets in _edges().items()
        for n in targets
        if ORDER.index(_layer(n)) > ORDER.index(_layer(m))
    ]
    assert wrong == []


def test_frameworks_only_where_they_belong():
    wrong = []
    for name, path in MODULES.items():
        for module, _, line in _imports(name, path):
            top = module.split(".")[0]
            allowed = FRAMEWORKS.get(top)
            if allowed and not any(name == a or name.startswith(a + ".") for a in allowed):
                wrong.append(f"{path.relative_to(SRC)}:{line} imports {module}")
    assert wrong == []


def test_no_private_names_of_other_modules():
    wrong = [
        f"{path.relative_to(SRC)}:{line} imports {imported} from {module}"
        for name, path in MODULES.items()
        for module, imported, line in _imports(name, path)
        if imported.startswith("_") and module != name
    ]
    assert wrong == []


def test_the_checks_see_a_cycle_and_a_function_level_import(tmp_path):
    """The checks on made-up input: a three-module cycle is found; an import inside a function counts, with
    the private name it takes."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None
    f = tmp_path / "a.py"
    f.write_text("def f():\n    from vaerepro import cli\n    from vaerepro.train import _x\n")
    found = _imports("vaerepro.thing", f)
    assert ("vaerepro.cli", "cli", 2) in found and ("vaerepro.train", "_x", 3) in found
    assert _layer("vaerepro.tracking.store") == "edges" and _layer("vaerepro.model") == "core"


def _absent_names(path: Path) -> list[str]:
    """'file:line: vaerepro.x has no y' for each name of vaerepro that `path` uses and is not there: taken
    with `from vaerepro.x import y` (at any depth), read as `x.y` where `x` names a module imported so in that
    scope or an enclosing one (and not assigned there), or patched by name (`setattr("vaerepro.x.y", ...)`,
    `setattr(x, "y", ...)`)."""
    import importlib

    where = path.relative_to(SRC.parent)
    tree = ast.parse(path.read_text(), str(path))
    parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def scope(node: ast.AST) -> ast.AST | None:
        node = parent.get(node)
        while node is not None and not isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef)):
            node = parent.get(node)
        return node

    # per scope: a name -> the vaerepro module an import there binds it to, or None where the scope assigns it
    binds: dict[ast.AST, dict[str, str | None]] = {}
    used: list[tuple[str, str, int]] = []  # (module, name, line)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("vaerepro"):
            for a in node.names:
                if f"{node.module}.{a.name}" in MODULES:
                    binds.setdefault(scope(node), {})[a.asname or a.name] = f"{node.module}.{a.name}"
                else:
                    used.append((node.module, a.name, node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and a.name in MODULES:
                    binds.setdefault(scope(node), {})[a.asname] = a.name
    for node in ast.walk(tree):
        name = node.id if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) else None
        name = node.arg if isinstance(node, ast.arg) else name
        if name is not None:
            binds.setdefault(scope(node), {})[name] = None

    def module_of(node: ast.AST, name: str) -> str | None:
        s = scope(node)
        while s is not None:
            if name in binds.get(s, {}):
                return binds[s][name]
            s = scope(s)
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (module := module_of(node, node.value.id)) is not None:
                used.append((module, node.attr, node.lineno))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("setattr", "delattr"):
            first, second = [*node.args, None, None][:2]
            if isinstance(first, ast.Name) and isinstance(second, ast.Constant):
                if (module := module_of(node, first.id)) is not None:
                    used.append((module, second.value, node.lineno))
            elif isinstance(first, ast.Constant) and str(first.value).startswith("vaerepro."):
                module, _, name = str(first.value).rpartition(".")
                used.append((module, name, node.lineno))
    wrong = []
    for module, name, line in sorted(used, key=lambda u: u[2]):
        if f"{module}.{name}" in MODULES:
            continue
        if module not in MODULES:
            wrong.append(f"{where}:{line}: no module {module}")
        elif not hasattr(importlib.import_module(module), name):
            wrong.append(f"{where}:{line}: {module} has no {name}")
    return wrong


@pytest.mark.slow
def test_every_name_taken_from_vaerepro_is_there():
    """Code that CPU CI never runs still names what exists: tests that skip without a GPU (tests/test_gpu.py,
    imports inside them included), the benchmarks, and code paths only a GPU takes. A module split or a
    rename that left one of them behind failed only on the next GPU machine, in its short lease."""
    files = [*MODULES.values(), *sorted((SRC.parent / "tests").glob("*.py"))]
    files += sorted((SRC.parent / "benchmarks").glob("*.py"))
    assert [w for f in files for w in _absent_names(f)] == []


def test_the_name_check_sees_a_name_that_is_gone(tmp_path):
    f = SRC.parent / "tests" / "made_up_for_the_check.py"
    text = (
        "from vaerepro import train\n"
        "def f(monkeypatch):\n"
        "    from vaerepro.train import hold, gone_a\n"
        "    train.gone_b\n"
        "    monkeypatch.setattr(train, 'gone_c', 1)\n"
        "    monkeypatch.setattr('vaerepro.train.gone_d', 1)\n"
        "    monkeypatch.setattr('vaerepro.gone_e.x', 1)\n"
        "    train.hold, train.VAEModule\n"
    )
    f.write_text(text)
    try:
        found = _absent_names(f)
    finally:
        f.unlink()
    where = "tests/made_up_for_the_check.py"
    assert found == [
        f"{where}:3: vaerepro.train has no gone_a",
        f"{where}:4: vaerepro.train has no gone_b",
        f"{where}:5: vaerepro.train has no gone_c",
        f"{where}:6: vaerepro.train has no gone_d",
        f"{where}:7: no module vaerepro.gone_e",
    ]


DESIGN = SRC.parent / "docs" / "design.md"
GRAPH_START, GRAPH_END = "<!-- module graph: start -->", "<!-- module graph: end -->"


def render_graph() -> str:
    """The module graph as docs/design.md shows it: by layer, each module and what it imports of the
    package (`vaerepro.` left off; the Hydra plugin's files as one node, hydra_plugins)."""

    def short(m: str) -> str:
        return "hydra_plugins" if m.startswith("hydra_plugins") else m.removeprefix("vaerepro.")

    layer_of: dict[str, str] = {}
    deps: dict[str, set[str]] = {}
    for m, targets in _edges().items():
        if m == "vaerepro":  # the package's __init__: a version string
            continue
        layer_of[short(m)] = _layer(m)
        deps.setdefault(short(m), set()).update(short(n) for n in targets)
    lines, width = [], max(map(len, layer_of)) + 1
    for layer in ORDER:
        lines.append(f"{layer}:")
        for m in sorted(k for k, v in layer_of.items() if v == layer):
            imported = sorted(deps[m] - {m, "vaerepro"})
            lines.append(f"  {m:<{width}} <- {', '.join(imported) if imported else '(nothing of vaerepro)'}")
    return "\n".join(lines)


def test_design_doc_shows_the_real_module_graph():
    text = DESIGN.read_text()
    assert GRAPH_START in text and GRAPH_END in text, f"{DESIGN}: no module graph block"
    shown = (
        text.split(GRAPH_START, 1)[1].split(GRAPH_END, 1)[0].strip().removeprefix("```").removesuffix("```")
    )
    assert shown.strip() == render_graph(), (
        "docs/design.md's module graph differs from the source; paste this between the markers:\n"
        + render_graph()
    )


# --- dvc.yaml: each stage depends on the code it runs --------------------------------------------------
# The stages in pipeline order, and the module each runs (`vaerepro <stage>` calls it); check's output is
# the same text whatever its code, so it runs none that matters here. Modules that cannot change a stage's
# outputs are not required: errors (messages) and signals (when a stop is honoured).
STAGE_MODULES = {
    "check": None,
    "prepare": "data",
    "train": "train",
    "evaluate": "evaluate",
    "report": "report",
}
NO_OUTPUTS = {"vaerepro.errors", "vaerepro.signals"}
# Per stage, modules it imports whose effect reaches it through a dependency instead: reading and fetching
# raw files (sources, formats) through prepared/; the learning-rate schedule (config imports its names)
# through models/
RAW_FILES = {"vaerepro.sources", "vaerepro.formats"}
THROUGH_DEPS = {"train": RAW_FILES, "evaluate": RAW_FILES | {"vaerepro.schedules"}}


def _closure(module: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = {module}, [module]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_each_dvc_stage_depends_on_the_code_it_runs():
    """A stage whose code changed must run again (`dvc repro`), or its outputs describe other code: every
    module a stage imports, however indirectly, is a dependency of that stage itself. A dependency of an
    earlier stage is not enough: that stage runs again, and when its outputs come out the same (data.py's
    test-set draw changed, prepared/ did not) DVC skips the stages after it, leaving their numbers as if
    current."""
    import yaml

    stages = yaml.safe_load((SRC.parent / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGE_MODULES)
    graph, missing = _edges(), {}
    for stage, module in STAGE_MODULES.items():
        if module is None:
            continue
        deps = {d if isinstance(d, str) else next(iter(d)) for d in stages[stage]["deps"]}
        listed = {f"vaerepro.{Path(d).stem}" for d in deps if d.startswith("src/vaerepro/")}
        lacking = _closure(f"vaerepro.{module}", graph) - listed - NO_OUTPUTS - THROUGH_DEPS.get(stage, set())
        if lacking:
            missing[stage] = sorted(lacking)
    assert not missing, f"dvc.yaml deps lack the code these stages run: {missing}"


# Run in a fresh interpreter in which importing these packages fails, as on a machine that lacks them.
_WITHOUT = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"mlflow", "optuna", "dvc"}:
            raise ModuleNotFoundError(f"No module named {name!r} (absent in this test)")
sys.meta_path.insert(0, Absent())
"""


@pytest.mark.slow
def test_an_untracked_pipeline_needs_neither_mlflow_nor_optuna_nor_dvc(tmp_path):
    """`vaerepro run tracking.enabled=false` (the GPU machine's check, which carries only the training's
    packages): every stage runs, and writes its numbers, in a process where MLflow, Optuna and DVC cannot be
    imported. (A module-level `import optuna` in the sweep's pruning callback once stopped it.)"""
    import json
    import os
    import subprocess
    import sys

    script = _WITHOUT + (
        "from pathlib import Path\n"
        "from conftest import ROOT, tiny_config\n"
        "from vaerepro import cli\n"
        f"out = Path({str(tmp_path)!r})\n"
        "cli.run_pipeline(tiny_config(raw_dir=out / 'raw'), out / 'run', ROOT, progress=False)\n"
        "import mlflow\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{SRC}:{Path(__file__).parent}"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    # the last line proves the blocking works: the pipeline got through, then `import mlflow` failed
    assert "No module named 'mlflow' (absent in this test)" in done.stderr, done.stderr[-3000:]
    assert done.stderr.count("Traceback") == 1 and "cli.run_pipeline" not in done.stderr.split("Traceback")[1]
    metrics = json.loads((tmp_path / "run" / "metrics" / "eval.json").read_text())
    assert metrics["log_px"] >= metrics["elbo"] - 3 * metrics["log_px_se"]
    assert (tmp_path / "run" / "reports" / "report.html").is_file()
