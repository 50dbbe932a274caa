"""Training: the two phases of SNL, the lambda schedule, the loop, and data-parallel training.

``train_gates`` (Algorithm 1) and ``finetune`` (KD) are the phases (``phases``); ``TrainConfig``
their settings (``config``); ``LambdaSchedule`` steers lambda (``schedule``); ``GateObjective``
is what the gate phase drives down (``objective``, made by a budget's plan); ``loop`` has the
epoch loop, KD loss, data loaders and checkpoints; ``distributed`` the DDP helpers. For a
training loop of your own: ``lasso_penalty``, ``LambdaSchedule``, ``clamp_gates``,
``relu_count_gated`` (the count, ``#(c > eps)``), ``soft_relu_count`` (the gates' mass),
``gate_parameters``, ``freeze_gates``, ``kd_loss``, ``evaluate``. Names are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "train_gates": "phases",
    "finetune": "phases",
    "EpochRecord": "phases",
    "TrainConfig": "config",
    "LambdaSchedule": "schedule",
    "GateObjective": "objective",
    "evaluate": "loop",
    "kd_loss": "loop",
    "clamp_gates": "gated",
    "freeze_gates": "gated",
    "gate_parameters": "gated",
    "gates": "gated",
    "lasso_penalty": "gated",
    "relu_count_gated": "gated",
    "site_relu_counts": "gated",
    "soft_relu_count": "gated",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'snl_fx.train' has no attribute {name!r}")
    module = importlib.import_module("snl_fx.gated" if home == "gated" else f"snl_fx.train.{home}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


__all__ = sorted(_HOMES)
