"""snl_fx: Selective Network Linearization as a torch.fx compiler pass.

``linearize`` runs the whole pass. The steps, for your own training loop: ``prepare`` ->
train with ``lasso_penalty`` and a ``LambdaSchedule`` -> ``binarize`` -> fine-tune ->
``convert`` -> ``export_onnx``. ``relu_count`` inspects any torch module or ONNX file;
``pi_bench`` runs an exported file under CrypTen 2PC (the optional extra ``pi``).
"""

from importlib.metadata import PackageNotFoundError, version

from ._cost import LayerCost, Network, PiCost, linear_cost, pi_cost, relu_site_cost
from ._cost_budget import Cost, CostPlan, parse_cost, plan_cost
from ._count import relu_count
from ._errors import SnlFxError
from ._export import ExportResult, export_onnx
from ._linearize import LinearizeResult, linearize, load_linearized
from ._phases import EpochRecord, finetune, train_gates
from ._report import PROTOCOLS, OtherCount, ReluReport, SiteCount
from ._snl import (
    LambdaSchedule,
    binarize,
    clamp_gates,
    convert,
    freeze_gates,
    gate_parameters,
    lasso_penalty,
    linearization_scores,
    prepare,
    relu_count_gated,
    resolve_budget,
    site_relu_counts,
    soft_relu_count,
)
from ._train import TrainConfig, evaluate, kd_loss
from .pi import PiBenchResult, pi_bench

try:
    __version__ = version("snl_fx")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = [
    "PROTOCOLS",
    "Cost",
    "CostPlan",
    "EpochRecord",
    "ExportResult",
    "LayerCost",
    "Network",
    "PiCost",
    "LambdaSchedule",
    "LinearizeResult",
    "OtherCount",
    "PiBenchResult",
    "ReluReport",
    "SiteCount",
    "SnlFxError",
    "TrainConfig",
    "__version__",
    "binarize",
    "clamp_gates",
    "convert",
    "evaluate",
    "export_onnx",
    "finetune",
    "freeze_gates",
    "gate_parameters",
    "kd_loss",
    "lasso_penalty",
    "linear_cost",
    "linearization_scores",
    "linearize",
    "load_linearized",
    "pi_bench",
    "parse_cost",
    "pi_cost",
    "plan_cost",
    "prepare",
    "relu_count",
    "relu_count_gated",
    "relu_site_cost",
    "resolve_budget",
    "site_relu_counts",
    "train_gates",
    "soft_relu_count",
]
