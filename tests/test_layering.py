"""Boundaries: the compiler (``snl_fx.passes``) imports nothing of the library above it; the
library never imports its application layer, ``snl_fx.app``, at import time; the ONNX inspector
never imports torch; examples and benchmarks use only public names of ``snl_fx``."""

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


PASSES = sorted((ROOT / "snl_fx" / "passes").glob("*.py"))


@pytest.mark.parametrize("path", PASSES, ids=lambda p: p.name)
def test_no_pass_imports_the_library_above_it(path):
    """The compiler imports nothing of snl_fx but its own modules, the error class, the ReLU rule
    (``relu_rule``) and the kinds of each family (``family_kinds``), both shared with the torch-free
    ONNX inspector; all three import nothing."""
    tree = ast.parse(path.read_text(), str(path))
    absolute = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    absolute += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
    assert [m for m in absolute if _is_snl_fx(m)] == []
    upward = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 1]
    assert set(upward) <= {"errors", "relu_rule", "family_kinds"}


def _modules_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint(sorted(sys.modules))"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_importing_the_passes_loads_nothing_of_the_library():
    loaded = [m for m in _modules_after("import snl_fx.passes") if _is_snl_fx(m)]
    assert sorted(m for m in loaded if not m.startswith("snl_fx.passes")) == ["snl_fx", "snl_fx.errors", "snl_fx.family_kinds",
                                                                                   "snl_fx.relu_rule"]


def test_the_old_passes_name_gives_the_same_modules():
    import passes.gate

    import passes
    from snl_fx.passes import gate, merge_linear

    assert passes.gate is gate and passes.merge_linear is merge_linear


def test_the_onnx_inspector_imports_no_torch(tmp_path):
    """relu_count and pi_cost of an ONNX file, as the relu-count CLI runs them, never load torch."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 3])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), str(path))
    code = (f"import snl_fx\nassert snl_fx.relu_count({str(path)!r}).total == 36\n"
            f"snl_fx.pi_cost({str(path)!r}, protocol='spu-cheetah')")
    assert "torch" not in _modules_after(code)
    cli = f"from snl_fx.app.cli import relu_count_main\nrelu_count_main([{str(path)!r}, '--json'])"
    assert "torch" not in _modules_after(cli)


LIBRARY = sorted(p for p in (ROOT / "snl_fx").rglob("*.py") if "app" not in p.relative_to(ROOT / "snl_fx").parts)


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


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
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
    modules = ", ".join(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in LIBRARY if p.stem != "__init__")
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


BUDGET_KINDS = {"Cost", "Relus", "CostPlan", "CountPlan"}


def budget_kind_branches(source: str) -> list[str]:
    """``isinstance(x, Cost)`` and the like, and ``plan is None`` / ``objective is None`` tests."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            names = {getattr(k, "id", None) or getattr(k, "attr", None) for k in kinds}
            found += [f"isinstance(..., {n})" for n in sorted(names & BUDGET_KINDS)]
        elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id in ("plan", "objective"):
            if any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
                found.append(f"{node.left.id} is (not) None")
    return found


def test_the_branch_check_finds_branches():
    source = "isinstance(b, Cost)\nisinstance(b, (int, snl_fx.Cost))\nif plan is None: pass\nobjective is not None\n"
    assert budget_kind_branches(source) == ["isinstance(..., Cost)", "isinstance(..., Cost)", "plan is (not) None",
                                            "objective is (not) None"]


@pytest.mark.parametrize(
    "path",
    [p for p in sorted((ROOT / "snl_fx").rglob("*.py")) if p.name != "budget.py"]
    + _python_files("examples") + _python_files("benchmarks"),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_module_outside_budget_branches_on_a_budget_kind(path):
    """Budgets are objects that plan: only snl_fx/budget.py may ask which kind it holds."""
    assert budget_kind_branches(path.read_text()) == []


def test_the_top_level_is_small_and_every_older_name_still_resolves():
    assert len(snl_fx.__all__) <= 17
    for name in [*snl_fx.__all__, *snl_fx._MOVED]:
        assert getattr(snl_fx, name) is not None, name
    assert snl_fx.LambdaSchedule is snl_fx.train.LambdaSchedule and snl_fx.plan_cost is snl_fx.budget.plan_cost
