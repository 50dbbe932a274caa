"""Boundaries: ``passes`` never imports ``snl_fx``; the library never imports its application layer,
``snl_fx.app``, at import time; examples and benchmarks use only public names of ``snl_fx``."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import snl_fx

ROOT = Path(__file__).resolve().parents[1]


def _python_files(folder: str) -> list[Path]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}/"
    return files


def _is_snl_fx(module: str | None) -> bool:
    return module is not None and (module == "snl_fx" or module.startswith("snl_fx."))


@pytest.mark.parametrize("path", _python_files("passes"), ids=lambda p: p.name)
def test_no_passes_module_imports_snl_fx(path):
    tree = ast.parse(path.read_text(), str(path))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
    assert not [m for m in imported if _is_snl_fx(m)]


def test_importing_passes_loads_no_snl_fx_module():
    code = "import sys, passes; print(sorted(m for m in sys.modules if m == 'snl_fx' or m.startswith('snl_fx.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


LIBRARY = sorted(p for p in (ROOT / "snl_fx").glob("*.py"))


def _imports_at_import_time(tree: ast.Module) -> list[tuple[int, str]]:
    """(level, module) of every import that runs when the module is imported: not inside a function."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            found += [(0, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(node.level, f"{node.module or ''}.{a.name}".strip(".")) for a in node.names]
        todo += list(ast.iter_child_nodes(node))
    return found


def _is_app(level: int, module: str) -> bool:
    name = module if level == 0 else "snl_fx." + module
    return name == "snl_fx.app" or name.startswith("snl_fx.app.")


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_no_library_module_imports_the_app_at_import_time(path):
    tree = ast.parse(path.read_text(), str(path))
    assert [m for level, m in _imports_at_import_time(tree) if _is_app(level, m)] == []


def test_the_app_check_finds_app_imports():
    tree = ast.parse(
        "from .app import jobs\nfrom . import app\nimport snl_fx.app.cli\nfrom snl_fx.app.pi import pi_bench\n"
        "from ._train import kd_loss\nif True:\n    from .app.data import DATASETS\ndef f():\n    from .app import pi\n"
    )
    assert sorted(m for level, m in _imports_at_import_time(tree) if _is_app(level, m)) == [
        "app", "app.data.DATASETS", "app.jobs", "snl_fx.app.cli", "snl_fx.app.pi.pi_bench",
    ]


def test_importing_the_library_loads_no_app_module():
    modules = ", ".join(f"snl_fx.{p.stem}" for p in LIBRARY if p.stem != "__init__")
    code = f"import sys, {modules}; print(sorted(m for m in sys.modules if m.startswith('snl_fx.app')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_documented_names_reach_the_app_on_use():
    from snl_fx.app import jobs, models, pi

    assert (snl_fx.pi_bench, snl_fx.PiBenchResult) == (pi.pi_bench, pi.PiBenchResult)
    assert (snl_fx.jobs, snl_fx.models) == (jobs, models)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        snl_fx.nope


def _public(name: str) -> bool:
    """A name of the snl_fx package that others may use: in ``__all__`` or a public submodule."""
    if name in snl_fx.__all__:
        return True
    return not name.startswith("_") and importlib.util.find_spec(f"snl_fx.{name}") is not None


def private_uses(source: str) -> list[str]:
    """Uses of snl_fx that are not public: private modules, private names, names left out of ``__all__``."""
    tree = ast.parse(source)
    found, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _is_snl_fx(a.name):
                    if any(part.startswith("_") for part in a.name.split(".")):
                        found.append(a.name)
                    elif a.name == "snl_fx":
                        aliases.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_snl_fx(node.module):
            if any(part.startswith("_") for part in node.module.split(".")):
                found.append(node.module)
            elif node.module == "snl_fx":
                found += [f"snl_fx.{a.name}" for a in node.names if not _public(a.name)]
            else:
                found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if not _public(node.attr):
                found.append(f"snl_fx.{node.attr}")
    return found


def test_the_check_finds_private_uses():
    source = (
        "import snl_fx, snl_fx._cost\nfrom snl_fx._count import relu_depth\nfrom snl_fx import app, _snl, ungated_relus\n"
        "from snl_fx.app.data import _read_idx\nfrom snl_fx.app import jobs\nsnl_fx._phases.train_gates\nsnl_fx.linearize\n"
        "snl_fx.app.data.DATASETS\nsnl_fx.jobs.pretrain\n"
    )
    assert private_uses(source) == [
        "snl_fx._cost", "snl_fx._count", "snl_fx._snl", "snl_fx.ungated_relus", "snl_fx.app.data._read_idx",
        "snl_fx._phases", "snl_fx.jobs",
    ]


@pytest.mark.parametrize(
    "path", _python_files("examples") + _python_files("benchmarks"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_examples_and_benchmarks_use_only_public_names(path):
    assert private_uses(path.read_text()) == []
