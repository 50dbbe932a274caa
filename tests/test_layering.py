"""Boundaries: ``passes`` never imports ``snl_fx``; examples and benchmarks use only public names of ``snl_fx``."""

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
        "import snl_fx, snl_fx._cost\nfrom snl_fx._count import relu_depth\nfrom snl_fx import jobs, _snl, ungated_relus\n"
        "from snl_fx.data import _read_idx\nsnl_fx._phases.train_gates\nsnl_fx.linearize\nsnl_fx.data.DATASETS\n"
    )
    assert private_uses(source) == [
        "snl_fx._cost", "snl_fx._count", "snl_fx._snl", "snl_fx.ungated_relus", "snl_fx.data._read_idx", "snl_fx._phases",
    ]


@pytest.mark.parametrize(
    "path", _python_files("examples") + _python_files("benchmarks"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_examples_and_benchmarks_use_only_public_names(path):
    assert private_uses(path.read_text()) == []
