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
    """Hyper-parameters of both phases; defaults are the paper's unless noted.

    A value out of its range raises a one-line SnlFxError; every float must be finite.

    Args:
        epochs: gate phase epochs, an int >= 0 (default 20); the target schedule reaches the
            budget near their end.
        finetune_epochs: KD fine-tune epochs, an int >= 0 (default 5; the paper: 100).
        lr: Adam lr of the gate phase, weights and gates, > 0 (default 1e-3).
        gate_lr: Adam lr of the gates, > 0; None (default): tied to the steps available under
            the target schedule, else ``lr``.
        lambda0: starting lambda, >= 0; None (default): the gates' gradient scale under the
            target schedule, 1e-5 under the others.
        kappa: lambda's growth factor of the ``budget`` and ``paper`` schedules, >= 1 (default 1.1).
        eps: a gate counts as a ReLU while ``c > eps``, in [0, 1) (default 0.01, ``COUNT_EPS``).
        schedule: lambda schedule, ``"target"`` (default, per step), ``"budget"`` or ``"paper"``
            (per epoch): see :class:`LambdaSchedule`.
        finetune_lr: SGD lr of the fine-tune, > 0 (default 1e-2; the paper: 1e-3 constant).
        finetune_schedule: ``"cosine"`` (default, over ``finetune_epochs``) or ``"constant"`` (the paper's).
        refine: after binarize (ReLU budgets), swap kept and removed ReLUs while the loss falls
            (:func:`snl_fx.refine_selection`); default False.
        momentum: SGD momentum of the fine-tune, in [0, 1) (default 0.9).
        weight_decay: SGD weight decay of the fine-tune, >= 0 (default 0).
        kd: distil from the original model in both phases (default True); False: cross-entropy only.
        temperature: KD temperature, > 0 (default 4.0).
        kd_weight: share of the KL term in the loss, in [0, 1] (default 0.5: equal weights with
            cross-entropy).
        batch_size: samples per step, the global batch under torchrun, an int >= 1 (default 128).
        num_workers: DataLoader workers, an int >= 0 (default 0).
        seed: seeds every epoch's RNGs (a resumed run replays a straight one), an int >= 0 (default 0).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; None (default): CUDA when present, else
            CPU. Under torchrun ``"cuda"`` is ``cuda:LOCAL_RANK``.
        progress: show progress bars (default True); False: no bars, progress lines go to the
            ``snl_fx`` logger.
        sync_bn: under torchrun on GPUs, BatchNorm as SyncBatchNorm while training (default False).

    Example:
        >>> cfg = snl_fx.TrainConfig(epochs=8, finetune_epochs=8, batch_size=256)
        >>> result = snl_fx.linearize(model, x, 0.05, train_set, config=cfg)
        >>> snl_fx.linearize(model, x, 0.05, train_set, epochs=8)  # the same fields as keywords
    """

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
