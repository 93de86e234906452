"""The import layers tell the story: prune -> distill -> search -> export -> evaluate -> report.

Foundation modules (settings, recipes, the command-line machinery) import only each other; the
shared pieces (models, data, kernels, scoring, formats, ...) import the foundation and each other;
a stage imports those and the stages before it, never a later one. Imports inside functions count
too: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minitron"
FOUNDATION = {"common", "cpu", "precision", "config", "recipe", "cli"}
SHARED = {"models", "corpus", "shards", "data", "measure", "memory_plan", "distributed",
          "checkpoint", "kernels", "calibration", "scoring", "onnx_graph", "onnx_lm", "gguf_vocab",
          "to_gguf", "gguf_quant", "quantize", "gptq", "compressed", "tasks", "teacher_cache",
          "task_data"}
STAGES = ["importance", "prune", "distill", "search", "export", "evaluate", "report", "pipeline",
          "sweep", "run"]
# Imports that still go up the layers, each with what removes it.
KNOWN = {("prune", "search"): "#27: the prune command's --search still runs the search from prune"}


def _unit(path: Path) -> str:
    """The top-level part of minitron a file belongs to (a module, or a package's name)."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """The top-level minitron parts a file imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = ([f"minitron.{a.name}" for a in node.names] if node.module == "minitron"
                     else [node.module])
        else:
            continue
        out |= {n.split(".")[1] for n in names if n.startswith("minitron.")}
    return out


def _allowed(unit: str) -> set[str]:
    if unit in FOUNDATION:
        return FOUNDATION
    if unit in SHARED:
        return FOUNDATION | SHARED
    return FOUNDATION | SHARED | set(STAGES[:STAGES.index(unit) + 1])


def test_every_module_has_a_layer():
    units = {_unit(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert not units - FOUNDATION - SHARED - set(STAGES), "place the new module in a layer"


def test_no_module_imports_a_later_layer():
    upward = {}
    for path in PACKAGE.rglob("*.py"):
        unit = _unit(path)
        if unit == "__init__":
            continue
        for target in _imports(path) - _allowed(unit):
            upward.setdefault((unit, target), []).append(path.relative_to(PACKAGE).as_posix())
    assert set(upward) - set(KNOWN) == set(), {k: v for k, v in upward.items() if k not in KNOWN}
    assert set(KNOWN) <= set(upward), "a known exception is gone: remove it from KNOWN"
