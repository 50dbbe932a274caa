"""Linearize any torchvision model and export it (training-free one-shot selection, random weights).

Shows the front end on a real architecture: every ReLU site found (torchvision's resnet18 has 9
nn.ReLU modules but 17 call sites), a budget met exactly, and an ONNX file whose ReLU count reads
back exactly. For a trained selection pass ``data=`` (a Dataset of (image, label)) to
``snl_fx.linearize``.

    python examples/torchvision_model.py --model resnet18 --size 64 --budget 0.1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision

import snl_fx


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision classification model name")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--budget", type=float, default=0.1, help="fraction (0, 1) or ReLUs per sample (>= 1)")
    parser.add_argument("--granularity", choices=["pixel", "channel"], default="pixel")
    parser.add_argument("--out", default="runs/torchvision")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None, num_classes=10).eval()
    x = torch.randn(8, 3, args.size, args.size)
    before = snl_fx.relu_count(model, x)
    print(before.table())
    budget = args.budget if args.budget < 1 else int(args.budget)
    result = snl_fx.linearize(model, x, budget, granularity=args.granularity)
    exported = snl_fx.export_onnx(result.model, x[:1], Path(args.out) / f"{args.model}.onnx")
    print(f"\n{args.model}: {before.total:,} -> {result.relu_count:,} ReLUs per sample ({result.method}); "
          f"{exported.path}: {exported.relu_count:,} ReLUs, ONNX Runtime max abs error {exported.max_abs_error:.1e}")


if __name__ == "__main__":
    main()
