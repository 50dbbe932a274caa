"""The ReLU report: per-site counts, other nonlinearities, depth, and private-inference cost."""

from __future__ import annotations

from collections.abc import Container, Hashable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import networkx as nx


def relu_depth(nodes: Iterable[Hashable], edges: Iterable[tuple[Hashable, Hashable]], relus: Container[Hashable]) -> int:
    """Longest chain of ReLU nodes along any path of a graph (MPC rounds grow with it).

    ``edges`` are (producer, consumer) pairs; raises ``networkx.NetworkXUnfeasible`` on a cycle.
    """
    dag = nx.DiGraph()
    dag.add_nodes_from(nodes)
    dag.add_edges_from(edges)
    depth: dict[Hashable, int] = {}
    for node in nx.topological_sort(dag):
        depth[node] = max((depth[p] for p in dag.predecessors(node)), default=0) + (node in relus)
    return max(depth.values(), default=0)


@dataclass(frozen=True)
class Protocol:
    """Per-ReLU cost of one private-inference protocol (both directions, one ReLU)."""

    name: str
    bytes_per_relu: float
    seconds_per_relu: float
    rounds_per_layer: int | None
    seconds_per_layer: float
    source: str


# One table of constants, with where each figure comes from (see ANCHORS.md of the project).
PROTOCOLS: tuple[Protocol, ...] = (
    Protocol("delphi", 1.2e3, 0.021 / 1000, None, 0.0,
             "DELPHI garbled circuits: ~1.2 KB online per ReLU; SNL paper's 0.021 s per 1000 ReLUs"),
    Protocol("sci", 532.0, 10e-6, None, 0.0,
             "CrypTFlow2/SCI OT-based ReLU: ~532 B and ~10 us per ReLU (1 thread, loopback)"),
    Protocol("cheetah", 52.0, 1e-6, None, 0.0,
             "Cheetah silent-OT ReLU: ~52-100 B per ReLU (low end used), 1-30 us"),
    Protocol("crypten", 464.0, 3.5e-6, 9, 30e-3,
             "CrypTen 2PC, trusted dealer: 464 B and ~3.5 us per ReLU, 9 rounds and ~30 ms per ReLU layer"),
)


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
    truncation per output; ``comparisons`` is then its outputs.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    comparisons: int


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

    @property
    def total(self) -> int:
        return sum(s.relus for s in self.sites)

    @property
    def relu_layers(self) -> int:
        """ReLU layers with at least one ReLU: each one costs a round trip in MPC protocols."""
        return sum(1 for s in self.sites if s.relus > 0)

    def costs(self) -> dict[str, dict[str, float | int | None]]:
        """Estimated private-inference cost per sample for each protocol in :data:`PROTOCOLS`."""
        out = {}
        for p in PROTOCOLS:
            out[p.name] = {
                "bytes": p.bytes_per_relu * self.total,
                "seconds": p.seconds_per_relu * self.total + p.seconds_per_layer * self.relu_layers,
                "rounds": None if p.rounds_per_layer is None else p.rounds_per_layer * self.relu_depth,
            }
        return out

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
            "ungateable": self.ungateable,
            "costs": self.costs(),
            "notes": self.notes,
        }

    def other_totals(self) -> dict[str, int]:
        """Comparisons (max-pool) or elements per sample for each kind of other nonlinearity."""
        totals: dict[str, int] = {}
        for o in self.others:
            totals[o.kind] = totals.get(o.kind, 0) + o.comparisons
        return totals

    def table(self) -> str:
        """A table for people: one row per site, then totals and cost estimates."""
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
            unit = "comparisons" if kind == "maxpool" else "elements"
            lines.append(f"other nonlinearity (not counted above): {kind}: {n:,} {unit} per sample")
        for u in self.ungateable:
            relus = "unknown" if u["relus"] is None else f"{u['relus']:,}"
            lines.append(f"not gateable: {u['name']} ({u['module_type']}) computes {relus} ReLUs per sample inside a leaf module")
        lines.append("estimated private-inference cost per sample (ReLUs only):")
        for name, c in self.costs().items():
            rounds = "" if c["rounds"] is None else f", {c['rounds']} rounds"
            lines.append(f"  {name:8s} {c['bytes'] / 1e6:10.2f} MB  {c['seconds']:8.3f} s{rounds}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
