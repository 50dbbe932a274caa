"""The training settings of both phases: one dataclass whose fields are also the CLI's options."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

import torch

from snl_fx.errors import SnlFxError
from snl_fx.gated import COUNT_EPS
from snl_fx.train import distributed

__all__ = ["FINETUNE_SCHEDULES", "SCHEDULES", "FinetuneSchedule", "Schedule", "TrainConfig"]


Schedule = Literal["target", "budget", "paper"]  # see LambdaSchedule


SCHEDULES: tuple[Schedule, ...] = get_args(Schedule)


FinetuneSchedule = Literal["cosine", "constant"]


FINETUNE_SCHEDULES: tuple[FinetuneSchedule, ...] = get_args(FinetuneSchedule)


@dataclass
class TrainConfig:
    """Hyper-parameters of both phases; defaults are the paper's unless noted."""

    epochs: int = 20  # gate phase: the target schedule reaches the budget near the end of these epochs
    finetune_epochs: int = 5  # paper: 100
    lr: float = 1e-3  # Adam, weights and gates
    gate_lr: float | None = None  # Adam lr for the gates; None: tied to the steps available (target), else lr
    lambda0: float | None = None  # None: the target schedule starts at the gates' gradient scale, the others at 1e-5
    kappa: float = 1.1  # budget and paper schedules only
    eps: float = COUNT_EPS  # a gate counts as a ReLU while c > eps
    schedule: Schedule = "target"  # "target" (per-step control), "budget" or "paper" (per epoch): see LambdaSchedule
    finetune_lr: float = 1e-2  # SGD; paper: 1e-3 constant for 100 epochs
    finetune_schedule: FinetuneSchedule = "cosine"  # "cosine" over finetune_epochs, or "constant" (the paper's)
    refine: bool = False  # linearize, ReLU budgets: after binarize, swap kept and removed ReLUs while the loss falls
    momentum: float = 0.9
    weight_decay: float = 0.0
    kd: bool = True
    temperature: float = 4.0
    kd_weight: float = 0.5  # equal weights on cross-entropy and KL
    batch_size: int = 128
    num_workers: int = 0
    seed: int = 0
    device: str | None = None  # None: CUDA when present, else CPU; under torchrun "cuda" is cuda:LOCAL_RANK
    progress: bool = True
    sync_bn: bool = False  # under torchrun on GPUs: BatchNorm as SyncBatchNorm while training

    def resolved_device(self) -> torch.device:
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is None and distributed.local_rank() is not None:
            return torch.device("cuda", distributed.local_rank())
        return device

    def __post_init__(self) -> None:
        """Refuse a value out of its range with a one-line SnlFxError that states the range.

        Every float field must be finite; a field without a rule below is only checked for that.
        A rule is (kind, low, high, text): ``kind`` int/float/bool/choice, bounds inclusive.
        """
        rules: dict[str, tuple[str, Any, Any, str]] = {
            "epochs": ("int", 0, None, "an integer >= 0"),
            "finetune_epochs": ("int", 0, None, "an integer >= 0"),
            "lr": ("float", 1e-12, None, "a number > 0"),
            "gate_lr": ("float", 1e-12, None, "a number > 0 (or None: same as lr)"),
            "lambda0": ("float", 0.0, None, "a number >= 0 (or None: automatic)"),
            "kappa": ("float", 1.0, None, "a number >= 1"),
            "eps": ("float", 0.0, 1.0 - 1e-12, "a number in [0, 1)"),
            "schedule": ("choice", SCHEDULES, None, f"one of {', '.join(SCHEDULES)}"),
            "finetune_lr": ("float", 1e-12, None, "a number > 0"),
            "finetune_schedule": ("choice", FINETUNE_SCHEDULES, None, f"one of {', '.join(FINETUNE_SCHEDULES)}"),
            "refine": ("bool", None, None, "True or False"),
            "momentum": ("float", 0.0, 1.0 - 1e-12, "a number in [0, 1)"),
            "weight_decay": ("float", 0.0, None, "a number >= 0"),
            "kd": ("bool", None, None, "True or False"),
            "temperature": ("float", 1e-12, None, "a number > 0"),
            "kd_weight": ("float", 0.0, 1.0, "a number in [0, 1]"),
            "batch_size": ("int", 1, None, "an integer >= 1"),
            "num_workers": ("int", 0, None, "an integer >= 0"),
            "seed": ("int", 0, 2**63 - 1, "an integer >= 0"),
            "progress": ("bool", None, None, "True or False"),
            "sync_bn": ("bool", None, None, "True or False"),
        }
        for f in fields(self):
            value = getattr(self, f.name)
            kind, low, high, text = rules.get(f.name, ("any", None, None, "a finite number"))
            if isinstance(value, float) and not math.isfinite(value):
                raise SnlFxError(f"{f.name} must be {text}, got {value}")
            if value is None and f.default is None:
                continue
            if kind == "choice":
                ok = value in low
            elif kind == "bool":
                ok = isinstance(value, bool)
            else:
                ok = kind == "any" or (isinstance(value, int if kind == "int" else (int, float)) and not isinstance(value, bool))
            if ok and kind in ("int", "float"):
                ok = (low is None or value >= low) and (high is None or value <= high)
            if not ok:
                raise SnlFxError(f"{f.name} must be {text}, got {value!r}")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise SnlFxError(f"device {self.device!r} is not a torch device: use cpu, cuda or cuda:N") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise SnlFxError(f"device {self.device!r} asked for, but CUDA is not available here: use cpu")
            if device.type not in ("cpu", "cuda"):
                raise SnlFxError(f"device {self.device!r} is not supported: use cpu, cuda or cuda:N")
