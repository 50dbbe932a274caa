"""snl_fx: Selective Network Linearization as a torch.fx compiler pass.

``linearize`` runs the whole life cycle: ``prepare`` (trace, find the ReLU sites, gate them) ->
``train_gates`` (Algorithm 1) -> ``binarize`` -> ``finetune`` -> ``convert`` (lower to a static
graph); ``export_onnx`` writes it. For your own training loop: ``lasso_penalty``,
``LambdaSchedule``, ``clamp_gates``, ``relu_count_gated``. ``relu_count`` inspects any torch
module or ONNX file, ``pi_cost`` predicts a private inference's cost, ``pi_bench`` measures one
(the optional extra ``pi``). The compiler passes themselves are the ``passes`` package; the
application on top (CLIs, jobs, data sets, model zoo, plots, PI backends' runners) is ``snl_fx.app``.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ._cost import LayerCost, Network, PiCost, linear_cost, pi_cost, relu_site_cost
from ._cost_budget import Cost, CostPlan, parse_cost, plan_cost
from ._count import relu_count
from ._errors import SnlFxError
from ._export import ExportResult, export_onnx
from ._linearize import LinearizeResult, linearize, load_linearized
from ._phases import EpochRecord, finetune, refine_selection, train_gates
from ._report import PROTOCOLS, OtherCount, ReluReport, SiteCount
from ._snl import (
    LambdaSchedule,
    binarize,
    clamp_gates,
    convert,
    freeze_gates,
    gate_parameters,
    gates,
    lasso_penalty,
    linearization_scores,
    prepare,
    relu_count_gated,
    resolve_budget,
    site_relu_counts,
    soft_relu_count,
)
from ._train import TrainConfig, evaluate, kd_loss

try:
    __version__ = version("snl_fx")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

# Names the library documents from its application layer, imported on first use so that
# `import snl_fx` never loads snl_fx.app: the PI benchmark, and the modules that moved there.
_FROM_APP = {"pi_bench": "pi", "PiBenchResult": "pi"}
_APP_MODULES = ("cli", "data", "jobs", "models", "pi", "plots")


def __getattr__(name: str) -> Any:
    if name in _FROM_APP:
        return getattr(importlib.import_module(f"snl_fx.app.{_FROM_APP[name]}"), name)
    if name in _APP_MODULES:
        return importlib.import_module(f"snl_fx.app.{name}")
    raise AttributeError(f"module 'snl_fx' has no attribute {name!r}")


__all__ = [
    # life cycle: the whole pass, and its steps in order
    "linearize",
    "LinearizeResult",
    "load_linearized",
    "prepare",
    "binarize",
    "refine_selection",
    "convert",
    "TrainConfig",
    # phases: the training steps, and the pieces for your own loop
    "train_gates",
    "finetune",
    "EpochRecord",
    "LambdaSchedule",
    "lasso_penalty",
    "clamp_gates",
    "freeze_gates",
    "gates",
    "gate_parameters",
    "relu_count_gated",
    "soft_relu_count",
    "site_relu_counts",
    "linearization_scores",
    "resolve_budget",
    # inspector: ReLUs and other nonlinearities of any torch module or ONNX file
    "relu_count",
    "ReluReport",
    "SiteCount",
    "OtherCount",
    "PROTOCOLS",
    # export
    "export_onnx",
    "ExportResult",
    # cost: predicted private-inference cost, and budgets in cost units
    "pi_cost",
    "PiCost",
    "LayerCost",
    "Network",
    "linear_cost",
    "relu_site_cost",
    "Cost",
    "CostPlan",
    "parse_cost",
    "plan_cost",
    # PI backends: measured runs under CrypTen or SPU
    "pi_bench",
    "PiBenchResult",
    # helpers
    "evaluate",
    "kd_loss",
    "SnlFxError",
    "__version__",
]
