"""Plots of a linearization: ReLUs per layer (the paper's figure 4) and accuracy vs. ReLUs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402


def _relu_axis(axis: Any) -> None:
    """Log axis of ReLU counts with plain labels (1,000 2,000 5,000) that do not overlap."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axis.set_minor_formatter(NullFormatter())


def plot_relus_per_layer(sites: Mapping[str, Mapping[str, int]], path: str | os.PathLike, title: str = "") -> None:
    """Bars of ReLUs per sample at each site, before and after linearization."""
    names = list(sites)
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 2), 4))
    ax.bar([x - 0.2 for x in xs], [sites[n]["before"] for n in names], 0.4, label="before")
    ax.bar([x + 0.2 for x in xs], [sites[n]["after"] for n in names], 0.4, label="after")
    ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=8)
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylabel("ReLUs per sample")
    ax.set_title(title or "ReLUs per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_relus(
    series: Mapping[str, Sequence[tuple[int, float]]], path: str | os.PathLike, title: str = "",
    reference: tuple[int, float] | None = None,
) -> None:
    """One line per method through (ReLUs per sample, accuracy %) points; log-scaled ReLU axis."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        pts = sorted(points)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if reference is not None:
        ax.scatter([reference[0]], [reference[1]], marker="*", s=120, color="black", label="original", zorder=5)
    ax.set_xscale("log")
    _relu_axis(ax.xaxis)
    ax.set_xlabel("ReLUs per sample")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "Accuracy vs. ReLUs")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gate_path(history: Sequence[Mapping[str, Any]], path: str | os.PathLike, budget: int, title: str = "") -> None:
    """The gate phase step by step: ReLU count (#c > eps) and lambda against optimizer steps."""
    points = [p for h in history if h.get("phase") == "gates" for p in h.get("path", ())]
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        steps, counts, lams = zip(*points)
        ax.plot(steps, counts, label="ReLU count")
        ax.axhline(budget, color="gray", linestyle="--", label=f"budget {budget:,}")
        ax.set_yscale("log")
        _relu_axis(ax.yaxis)
        twin = ax.twinx()
        twin.plot(steps, lams, color="tab:orange", alpha=0.7, label="lambda")
        twin.set_yscale("log")
        twin.set_ylabel("lambda")
        ax.legend(loc="upper right")
    ax.set_xlabel("gate-phase step")
    ax.set_ylabel("ReLUs per sample")
    ax.set_title(title or "Gate phase")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
