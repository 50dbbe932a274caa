"""Does the PartialReLU form avoid the per-element cost of spu issue 701? small_resnet under SPU CHEETAH and SEMI2K.

small_resnet (random weights: cost does not depend on them, 1x28x28 input) exported as the full
model and linearized to the same count three ways: pixel gates (one-shot), channel gates
(one-shot) and whole layers (layer3's two ReLU sites kept as plain ReLUs, every other site
linear: ``prepare(..., skip=["layer3.*"])`` with all gates closed). Each is exported with
``profile="pi"`` (gather form); pixel gates also with ``profile="default"`` (ScatterElements form).
Every file runs under ``snl_fx.pi_bench(path, backend=...)``: bytes, rounds, seconds, the part in
ReLU ops (link-statistic deltas around each Relu executable) and the seconds of SPU's local ops
(pphlo ops that sent 0 bytes: gather, scatter, concatenate, reshape, pad, transpose, ...).
Usage:

    python benchmarks/spu_bench.py [--backends spu-semi2k,spu-cheetah] [--runs 3] [--out benchmarks/results/spu_bench.json]
    python benchmarks/spu_bench.py --table     # the table again, from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

import snl_fx
from snl_fx.app.models import small_resnet

KEPT_LAYERS = ["layer3.*"]  # layer3.0.relu1 and layer3.0.relu2: 2 * 64*7*7 = 6,272 ReLUs (14.3%)
# the PartialReLU's data movement; SPU runs a scatter (ScatterElements) as a pphlo.while loop over its elements
MOVE = ("pphlo.gather", "pphlo.scatter", "pphlo.while", "pphlo.concatenate", "pphlo.dynamic_slice", "pphlo.slice")


def files(out: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    model = small_resnet().eval()
    x = torch.randn(16, 1, 28, 28)
    gm = snl_fx.prepare(model, x, skip=KEPT_LAYERS)
    with torch.no_grad():
        for gate in snl_fx.train.gate_parameters(gm):
            gate.zero_()
    layers = snl_fx.convert(gm)
    budget = snl_fx.relu_count(layers, x[:1]).total
    pixel = snl_fx.linearize(model, x, budget).model
    channel = snl_fx.linearize(model, x, budget, granularity="channel").model
    variants = {"full": (model, "pi"), "pixel": (pixel, "pi"), "pixel-scatter": (pixel, "default"),
                "channel": (channel, "pi"), "layers": (layers, "pi")}
    paths = {}
    for name, (m, profile) in variants.items():
        paths[name] = out / f"small_resnet_{name}.onnx"
        snl_fx.export_onnx(m, x[:1], paths[name], profile=profile)
    return paths


def row(name: str, backend: str, path: Path, runs: int) -> dict:
    r = {"variant": name, "file": str(path), **snl_fx.pi_bench(path, runs=runs, backend=backend).to_dict()}
    derive(r)
    print(json.dumps({k: v for k, v in r.items() if k != "ops"}), flush=True)
    return r


def derive(r: dict) -> None:
    """Seconds of local ops (0 bytes sent), of the PartialReLU's data movement, and of convolutions."""
    ops = r["ops"]
    r["local_seconds"] = sum(v["seconds"] for v in ops.values() if v["bytes"] == 0)
    r["move_seconds"] = sum(ops[k]["seconds"] for k in MOVE if k in ops)
    r["conv_seconds"] = ops.get("pphlo.convolution", {}).get("seconds", 0.0)


def table(rows: list[dict]) -> str:
    head = ("| backend | form | ReLUs | ReLU layers | MB | in ReLU ops MB | B per ReLU | rounds (in ReLU ops) "
            "| s per inference | in ReLU ops s | local ops s (gather/scatter/concat s) | conv s | max abs error |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        per = f"{r['relu_bytes'] / r['relus']:.1f}" if r["relus"] else "-"
        lines.append(
            f"| {r['backend']} | {r['variant']} | {r['relus']:,} | {r['relu_layers']} | {r['bytes'] / 1e6:.2f} "
            f"| {r['relu_bytes'] / 1e6:.2f} | {per} | {r['rounds']} ({r['relu_rounds']}) | {r['seconds']:.2f} "
            f"| {r['relu_seconds']:.2f} | {r['local_seconds']:.2f} ({r['move_seconds']:.2f}) | {r['conv_seconds']:.2f} "
            f"| {r['max_abs_error']:.1g} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="spu-semi2k,spu-cheetah")
    parser.add_argument("--runs", type=int, default=3, help="timed inferences per file (median)")
    parser.add_argument("--out", default="benchmarks/results/spu_bench.json")
    parser.add_argument("--table", action="store_true", help="print the table of the results in --out; run nothing")
    args = parser.parse_args()
    if args.table:
        rows = json.loads(Path(args.out).read_text())["rows"]
        for r in rows:
            derive(r)
        print(table(rows))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = files(Path("runs/spu_bench"))
    load = [os.getloadavg()[0]]
    rows = [row(name, b, p, args.runs) for b in args.backends.split(",") for name, p in paths.items()]
    load.append(os.getloadavg()[0])
    out.write_text(json.dumps({"load_average_start_end": load, "rows": rows}, indent=2))
    print(table(rows))
    print(f"\nload average (1 min) at start and end: {load[0]:.1f}, {load[1]:.1f}; results in {out}")


if __name__ == "__main__":
    main()
