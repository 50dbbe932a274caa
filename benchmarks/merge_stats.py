"""What passes.merge_linear merges in zoo ResNets with the ReLU layers of one block removed.

For each block of small_resnet (1x28x28) and cifar_resnet18 (3x32x32), random weights and random
BatchNorm statistics: every ReLU site of that block becomes identity (``snl_fx.binarize`` with
scores that zero the block, then ``snl_fx.convert``), the others stay whole. Prints, before and
after ``passes.merge_linear`` with its default rule: conv and BatchNorm nodes, MACs per sample
(conv + linear from ``relu_count``'s report, plus one per BatchNorm element), the conv -> conv
pairs still adjacent, the largest output difference and the ReLU counts.

    OMP_NUM_THREADS=1 python benchmarks/merge_stats.py [--models small_resnet cifar_resnet18]
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn as nn

import snl_fx
from snl_fx import passes
from snl_fx.app.models import MODELS

INPUTS = {"small_resnet": (1, 1, 28, 28), "cifar_resnet18": (1, 3, 32, 32)}


def with_block_linear(name: str, block: str, x: torch.Tensor) -> torch.fx.GraphModule:
    """The zoo model with every ReLU site under ``block`` removed, lowered, in eval mode."""
    torch.manual_seed(0)
    model = MODELS[name]()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    gm = snl_fx.prepare(model, x)
    sites = passes.get_meta(gm).sites
    removed = {s.name for s in sites if s.name.startswith(block + ".")}
    scores = {s.name: torch.full(s.shape, 0.0 if s.name in removed else 1.0) for s in sites}
    snl_fx.binarize(gm, sum(s.numel for s in sites if s.name not in removed), scores)
    return snl_fx.convert(gm).eval()


def stats(gm: torch.fx.GraphModule, x: torch.Tensor) -> dict[str, int]:
    """Conv/BN nodes, MACs per sample, adjacent conv -> conv pairs and ReLUs of a lowered graph."""
    report = snl_fx.relu_count(gm, x)
    modules = dict(gm.named_modules())
    kind = {n: type(modules[str(n.target)]).__name__ for n in gm.graph.nodes if n.op == "call_module"}
    bn_macs = sum(math.prod(n.meta["tensor_meta"].shape[1:]) for n, k in kind.items() if k == "BatchNorm2d")
    pairs = sum(
        1 for n, k in kind.items()
        if k == "Conv2d" and kind.get(n.args[0]) == "Conv2d" and len(n.args[0].users) == 1
    )
    return {
        "conv": sum(k == "Conv2d" for k in kind.values()),
        "bn": sum(k == "BatchNorm2d" for k in kind.values()),
        "macs": sum(layer.macs for layer in report.linear) + bn_macs,
        "pairs": pairs,
        "relus": report.total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(INPUTS), choices=list(INPUTS))
    args = parser.parse_args()
    columns = ["model", "block made linear", "conv nodes", "BN nodes", "MACs per sample", "adjacent conv pairs",
               "max abs diff", "ReLUs"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        x = torch.randn(*INPUTS[name])
        model = MODELS[name]()
        blocks = sorted({n.rsplit(".", 1)[0] for n, m in model.named_modules() if isinstance(m, nn.ReLU)})
        for block in blocks:
            lowered = with_block_linear(name, block, x)
            merged = passes.merge_linear(copy.deepcopy(lowered))
            with torch.no_grad():
                xb = torch.randn(4, *INPUTS[name][1:])
                diff = float((lowered(xb) - merged(xb)).abs().max())
            b, a = stats(lowered, x), stats(merged, x)
            print(
                f"| {name} | {block} | {b['conv']} -> {a['conv']} | {b['bn']} -> {a['bn']} | "
                f"{b['macs']:,} -> {a['macs']:,} | {b['pairs']} -> {a['pairs']} | {diff:.1e} | "
                f"{b['relus']:,} -> {a['relus']:,} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
