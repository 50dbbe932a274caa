"""snl_fx: Selective Network Linearization as a torch.fx compiler pass.

``linearize`` runs the whole life cycle: ``prepare`` (trace, find the ReLU sites, gate them) ->
``train_gates`` (Algorithm 1) -> ``binarize`` -> ``finetune`` -> ``convert`` (lower to a static
graph); ``export_onnx`` writes it. A budget is a ReLU count, a fraction, or a :class:`Cost`.
``relu_count`` inspects any torch module or ONNX file, ``pi_cost`` predicts a private inference's
cost. The rest lives in submodules, one per concept:

- ``snl_fx.passes``: the compiler (trace, find, de-inplace, gate, lower, merge), pure torch.fx;
- ``snl_fx.budget``: budgets and the plans they make on a prepared model;
- ``snl_fx.select``: which ReLUs a binarized model keeps (binarize, scores, refinement);
- ``snl_fx.train``: the phases, the lambda schedule, the loop, data-parallel training, and the
  pieces for your own loop (``lasso_penalty``, ``LambdaSchedule``, ``clamp_gates``, ...);
- ``snl_fx.inspect``: the inspector (torch modules, ONNX files, the report);
- ``snl_fx.cost``: the calibrated private-inference cost model (network, tables, model, calibration);
- ``snl_fx.app``: the application (CLIs, jobs, data sets, model zoo, plots, PI backends' runners).

Every name is imported on first use, so ``import snl_fx`` is cheap and reading an ONNX file
(``relu_count("model.onnx")``) never imports torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("snl_fx")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

# The public surface: name -> the module that defines it.
_PUBLIC = {
    "linearize": "lifecycle",
    "LinearizeResult": "lifecycle",
    "load_linearized": "lifecycle",
    "prepare": "gated",
    "train_gates": "train.phases",
    "binarize": "select",
    "finetune": "train.phases",
    "convert": "gated",
    "TrainConfig": "train.config",
    "EpochRecord": "train.phases",
    "Cost": "budget",
    "relu_count": "inspect",
    "pi_cost": "cost",
    "export_onnx": "export",
    "pi_bench": "app.pi",  # measured runs under CrypTen or SPU (the application's backends)
    "SnlFxError": "errors",
}

# Names documented before the package was laid out by concept: they keep working, from their new homes.
_MOVED = {
    "refine_selection": "select",
    "linearization_scores": "select",
    "LambdaSchedule": "train",
    "lasso_penalty": "train",
    "clamp_gates": "train",
    "freeze_gates": "train",
    "gates": "train",
    "gate_parameters": "train",
    "relu_count_gated": "train",
    "soft_relu_count": "train",
    "site_relu_counts": "train",
    "evaluate": "train",
    "kd_loss": "train",
    "resolve_budget": "budget",
    "CostPlan": "budget",
    "parse_cost": "budget",
    "plan_cost": "budget",
    "ReluReport": "inspect",
    "SiteCount": "inspect",
    "OtherCount": "inspect",
    "PROTOCOLS": "cost",
    "ExportResult": "export",
    "PiCost": "cost",
    "LayerCost": "cost",
    "Network": "cost",
    "linear_cost": "cost",
    "relu_site_cost": "cost",
    "PiBenchResult": "app.pi",
}
# Modules of the application that were once reached as snl_fx.<name> (e.g. the spec snl_fx.models:...).
_APP_MODULES = ("cli", "data", "jobs", "models", "pi", "plots")


def __getattr__(name: str) -> Any:
    home = _PUBLIC.get(name) or _MOVED.get(name)
    if home is not None:
        value = getattr(importlib.import_module(f"snl_fx.{home}"), name)
        globals()[name] = value
        return value
    if name in _APP_MODULES:
        return importlib.import_module(f"snl_fx.app.{name}")
    if name == "distributed":
        return importlib.import_module("snl_fx.train.distributed")
    raise AttributeError(f"module 'snl_fx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC) | set(_MOVED))


if TYPE_CHECKING:  # for type checkers and IDEs: the public names, eagerly
    from snl_fx.budget import Cost
    from snl_fx.cost import pi_cost
    from snl_fx.errors import SnlFxError
    from snl_fx.export import export_onnx
    from snl_fx.gated import convert, prepare
    from snl_fx.inspect import relu_count
    from snl_fx.lifecycle import LinearizeResult, linearize, load_linearized
    from snl_fx.select import binarize
    from snl_fx.train.config import TrainConfig
    from snl_fx.train.phases import EpochRecord, finetune, train_gates

__all__ = [*_PUBLIC, "__version__"]
