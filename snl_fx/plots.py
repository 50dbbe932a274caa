"""Plots of a linearization: ReLUs per layer (the paper's figure 4) and accuracy vs. ReLUs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first


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
    ax.set_xlabel("ReLUs per sample")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "Accuracy vs. ReLUs")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
