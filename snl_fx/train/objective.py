"""What the gate phase drives down and where it stops: a :class:`GateObjective`.

A budget's plan makes one (:meth:`snl_fx.budget.Plan.objective`); the gate phase only reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from snl_fx.gated import lasso_penalty, relu_count_gated, soft_relu_count, total_relus

__all__ = ["GateObjective", "count_objective", "joint_objective"]


@dataclass
class GateObjective:
    """What the gate phase drives down and where it stops (see :func:`snl_fx.train_gates`).

    ``penalty()`` is added to the loss times lambda; ``hard(eps)`` is the value of the gates
    thresholded at ``eps`` and ``soft()`` the gates' mass in the same unit (both steer lambda);
    the phase stops once ``hard(eps) <= limit``; ``start`` is the value before training.

    Args:
        penalty: no argument -> the differentiable penalty (a scalar tensor), e.g. ``sum|c|``.
        hard: ``eps`` -> the gates' value thresholded at ``eps`` (e.g. the ReLU count).
        soft: no argument -> the gates' mass in the same unit (a float, no gradient).
        start: the value before training (e.g. the model's ReLUs per sample).
        limit: the phase stops once ``hard(eps) <= limit`` (e.g. the ReLU budget).
        unit: what the values count, for log lines (default ``"ReLUs"``).

    Example:
        >>> objective = snl_fx.budget.count_objective(gm, 2000)  # gm: prepared resnet18 at 64x64
        >>> objective.start, objective.limit, objective.unit
        (188416, 2000, 'ReLUs')
        >>> loss = task_loss + lam * objective.penalty()
    """

    penalty: Callable[[], torch.Tensor]
    hard: Callable[[float], float]
    soft: Callable[[], float]
    start: float
    limit: float
    unit: str = "ReLUs"


def count_objective(gm: GraphModule, budget: int, family: str = "relu") -> GateObjective:
    """The ReLU count's objective: ``sum|c|``, the count ``#(c > eps)`` down to ``budget``.

    Args:
        gm: a model from :func:`snl_fx.prepare`.
        budget: ReLUs per sample at which the gate phase stops.
        family: whose gates and count (default ``"relu"``; ``"gelu"``, ``"softmax"``: their elements).

    Returns:
        A :class:`GateObjective` over :func:`lasso_penalty`, :func:`relu_count_gated` and
        :func:`soft_relu_count`, starting at :func:`total_relus`.

    Example:
        >>> objective = count_objective(gm, 2000)
        >>> loss = task_loss + lam * objective.penalty()
    """
    unit = "ReLUs" if family == "relu" else f"{family} elements"
    return GateObjective(lambda: lasso_penalty(gm, family), lambda eps: relu_count_gated(gm, eps, family),
                         lambda: soft_relu_count(gm, family), total_relus(gm, family), budget, unit)


SCALE = 1000.0  # the value of every family's budget in a joint objective: per mille


def joint_objective(objectives: dict[str, GateObjective]) -> GateObjective:
    """One objective for several families, each with its own budget and one lambda (PriViT's separate
    budgets): the value is the family furthest above its budget, as a multiple of that budget
    (times :data:`SCALE`), and a family's penalty applies only while its count is above its budget.

    Args:
        objectives: family -> its :func:`count_objective`.

    Returns:
        A :class:`GateObjective` that stops once every family meets its budget.

    Example:
        >>> joint = joint_objective({f: count_objective(gm, n, f) for f, n in {"gelu": 870, "softmax": 68}.items()})
        >>> joint.limit
        1000.0
    """
    from snl_fx import passes

    def ratio(values: dict[str, float]) -> float:
        return SCALE * max(values[f] / max(o.limit, 1) for f, o in objectives.items())

    def penalty() -> torch.Tensor:
        return sum(o.penalty() for o in objectives.values() if o.hard(passes.COUNT_EPS) > o.limit)

    return GateObjective(penalty, lambda eps: ratio({f: o.hard(eps) for f, o in objectives.items()}),
                         lambda: ratio({f: o.soft() for f, o in objectives.items()}),
                         ratio({f: o.start for f, o in objectives.items()}), SCALE,
                         "per mille of its budget (the family furthest above it)")
