"""The ReLU report: per-site counts, other nonlinearities, linear layers and ReLU depth.

Both inspectors (``torch_model``, ``onnx_model``) build a :class:`ReluReport`; its price under a
protocol is :func:`snl_fx.pi_cost`'s (``snl_fx.cost``). Imports nothing heavy: the ONNX inspector
runs without torch.
"""

from __future__ import annotations

import graphlib
from collections.abc import Container, Hashable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from snl_fx.family_kinds import FAMILY_KINDS


def relu_depth(nodes: Iterable[Hashable], edges: Iterable[tuple[Hashable, Hashable]], relus: Container[Hashable]) -> int:
    """Longest chain of ReLU nodes along any path of a graph (MPC rounds grow with it).

    Args:
        nodes: every node of the graph.
        edges: (producer, consumer) pairs.
        relus: the nodes that are ReLUs.

    Returns:
        The most ReLU nodes on one path; raises ``graphlib.CycleError`` on a cycle.

    Example:
        >>> relu_depth("abc", [("a", "b"), ("b", "c")], {"a", "c"})
        2
    """
    preds: dict[Hashable, list[Hashable]] = {node: [] for node in nodes}
    for src, dst in edges:
        preds.setdefault(dst, []).append(src)
        preds.setdefault(src, [])
    depth: dict[Hashable, int] = {}
    for node in graphlib.TopologicalSorter(preds).static_order():
        depth[node] = max((depth[p] for p in preds[node]), default=0) + (node in relus)
    return max(depth.values(), default=0)


@dataclass(frozen=True)
class SiteCount:
    """ReLUs per sample at one call site (torch) or one Relu-like node (ONNX)."""

    name: str
    op: str
    shape: tuple[int, ...]
    relus: int


@dataclass(frozen=True)
class OtherCount:
    """A nonlinearity that is not a ReLU; max-pool counts k*k-1 comparisons per output.

    Kind ``avgpool`` (average pools, spatial means) is linear but costs fixed-point backends a
    truncation per output; ``comparisons`` is then its outputs. For element-wise kinds
    (gelu, silu, sigmoid, softmax, ...) ``comparisons`` is the elements per sample, and for the
    kinds that normalise rows (softmax, layernorm, rmsnorm) ``row`` is the row length.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    comparisons: int
    row: int | None = None  # softmax, layernorm, rmsnorm: the length of the rows they normalise over


@dataclass(frozen=True)
class ScaleCount:
    """A product of a secret value by a public constant (a float: a fixed-point truncation per element).

    ``op``: how it was written (``Mul``/``Div`` in ONNX, ``mul``/``truediv``/... in torch);
    ``elements``: its elements per sample. Attention's ``1/sqrt(d)``, residual scalings.
    """

    name: str
    op: str
    shape: tuple[int, ...]
    elements: int


@dataclass(frozen=True)
class LinearCount:
    """A layer with a weight operand (Conv, Gemm/Linear, MatMul): element counts for one sample.

    ``weight`` is the second operand (a weight, or an activation for MatMul of two activations);
    ``macs`` are the multiply-accumulates of one sample.
    """

    name: str
    op: str
    input: int
    weight: int
    output: int
    macs: int


@dataclass
class ReluReport:
    """What ``relu_count`` found: ``total`` is ReLUs per sample, whatever the batch size."""

    source: str
    sites: list[SiteCount]
    relu_depth: int
    others: list[OtherCount] = field(default_factory=list)
    ungateable: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    linear: list[LinearCount] = field(default_factory=list)
    outputs: int = 0  # elements per sample of the model's outputs (what a PI backend reveals)
    scales: list[ScaleCount] = field(default_factory=list)  # products by public constants (truncations)

    @property
    def total(self) -> int:
        return sum(s.relus for s in self.sites)

    @property
    def relu_layers(self) -> int:
        """ReLU layers with at least one ReLU: each one costs a round trip in MPC protocols."""
        return sum(1 for s in self.sites if s.relus > 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; ``total`` is the per-sample ReLU count."""
        return {
            "source": self.source,
            "total": self.total,
            "relu_layers": self.relu_layers,
            "relu_depth": self.relu_depth,
            "sites": [asdict(s) for s in self.sites],
            "others": [asdict(o) for o in self.others],
            "other_totals": self.other_totals(),
            "scales": [asdict(s) for s in self.scales],
            "ungateable": self.ungateable,
            "notes": self.notes,
        }

    def other_totals(self) -> dict[str, int]:
        """Comparisons (max-pool, max, min) or elements per sample for each kind of other nonlinearity."""
        totals: dict[str, int] = {}
        for o in self.others:
            totals[o.kind] = totals.get(o.kind, 0) + o.comparisons
        return totals

    def family_count(self, family: str) -> int:
        """Elements per sample of a gateable family (``"relu"``: :attr:`total`; ``"gelu"``: GELUs of
        both forms; ``"softmax"``, ``"silu"``), as :func:`snl_fx.linearize` budgets them.

        Example:
            >>> snl_fx.relu_count("vit.onnx").family_count("softmax")
            1156
        """
        if family == "relu":
            return self.total
        kinds = FAMILY_KINDS[family]
        return sum(o.comparisons for o in self.others if o.kind in kinds)

    def table(self) -> str:
        """A table for people: one row per site, then totals, other nonlinearities and notes."""
        rows = [("site", "op", "shape", "ReLUs/sample")]
        rows += [(s.name, s.op, "x".join(map(str, s.shape)), f"{s.relus:,}") for s in self.sites]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"\ntotal: {self.total:,} ReLUs per sample in {self.relu_layers} ReLU layers, ReLU depth {self.relu_depth}")
        for kind, n in sorted(self.other_totals().items()):
            if kind == "avgpool":
                lines.append(f"average pool (linear; one truncation per output): {n:,} outputs per sample")
                continue
            unit = "comparisons" if kind in ("maxpool", "max", "min") else "elements"
            rows = sorted({o.row for o in self.others if o.kind == kind and o.row is not None})
            in_rows = f" in rows of {', '.join(f'{r:,}' for r in rows)}" if rows else ""
            lines.append(f"other nonlinearity (not counted above): {kind}: {n:,} {unit} per sample{in_rows}")
        for u in self.ungateable:
            relus = "unknown" if u["relus"] is None else f"{u['relus']:,}"
            lines.append(f"not gateable: {u['name']} ({u['module_type']}) computes {relus} ReLUs per sample inside a leaf module")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def not_per_sample_note(items: Iterable[tuple[str, str, int]]) -> str | None:
    """The note both inspectors give on layers that no batched input flows into, or None if none.

    Args:
        items: (name, kind, elements) of each such nonlinearity or linear layer, e.g. a ReLU on a
            weight: ``("relu", "relu", 128)``.

    Returns:
        One line: they are computed once per inference on the same values for every sample
        (weights, constants), so they are never gated and left out of the total and the costs.

    Example:
        >>> not_per_sample_note([("w_relu", "relu", 128)])
        "not per sample: relu 'w_relu' (128 elements); no batched input flows into them ..."
    """
    items = list(items)
    if not items:
        return None
    shown = ", ".join(f"{kind} '{name}' ({n:,} elements)" for name, kind, n in items)
    return (f"not per sample: {shown}; no batched input flows into them (they read only weights, "
            "constants and input shapes), so they are computed once per inference, never gated, and left out of the "
            "total and the costs")
