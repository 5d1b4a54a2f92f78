"""The layers of DESIGN.md, pinned by parsing every module's imports (no import is executed)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    if package and package[0] == "kernels":
        package = ("dpgkit", "kernels", *package[1:])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join((*base, node.module) if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def files(*parts: str) -> list[Path]:
    return sorted((ROOT.joinpath(*parts)).rglob("*.py"))


def offenders(paths: list[Path], banned) -> list[str]:
    return [f"{p.relative_to(ROOT)}: {name}" for p in paths for name in sorted(imports_of(p)) if banned(name)]


def test_only_the_lightning_package_imports_lightning():
    outside = [p for p in files("dpgkit") if "lightning" not in p.relative_to(ROOT / "dpgkit").parts[:1]]
    outside += files("kernels")
    bad = offenders(outside, lambda n: n.split(".")[0] in ("lightning", "pytorch_lightning"))
    assert not bad, bad


def test_kernels_import_only_torch_triton_and_themselves():
    # standard library only besides torch and triton (ctypes: glibc's malloc_trim in reference.py;
    # concurrent: the thread pool drawing noise blocks in rao_blackwell.py)
    allowed_roots = {"torch", "triton", "__future__", "collections", "concurrent", "ctypes", "dataclasses",
                     "functools", "logging", "math", "os", "typing"}
    bad = offenders(files("kernels"), lambda n: n.split(".")[0] not in allowed_roots
                    and not n.startswith("dpgkit.kernels"))
    assert not bad, bad


def test_models_do_not_import_operators_solvers_or_lightning():
    bad = offenders(files("dpgkit", "models"), lambda n: n.startswith(("dpgkit.operators", "dpgkit.solvers",
                                                                        "dpgkit.lightning", "dpgkit.task")))
    assert not bad, bad


@pytest.mark.parametrize("layer", ["operators", "noise.py", "diffusion.py", "seeding.py"])
def test_lower_layers_do_not_import_upper_ones(layer):
    paths = [ROOT / "dpgkit" / layer] if layer.endswith(".py") else files("dpgkit", layer)
    upper = ("dpgkit.solvers", "dpgkit.lightning", "dpgkit.task", "dpgkit.validation", "dpgkit.models",
             "dpgkit.metrics", "dpgkit.kernels")
    bad = offenders(paths, lambda n: n.startswith(upper))
    assert not bad, bad


def test_the_parser_sees_relative_imports():
    """A guard on the guard: the resolver maps `from ..task import Task` in solvers to dpgkit.task."""
    assert "dpgkit.task.Task" in imports_of(ROOT / "dpgkit" / "solvers" / "dps.py")
    assert "dpgkit.kernels.reference" in imports_of(ROOT / "kernels" / "__init__.py")
