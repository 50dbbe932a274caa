"""Private inference under CrypTen 2PC: original vs linearized models, measured, vs the cost model's prediction.

For each model (random weights: cost does not depend on them) and ReLU budget: training-free
one-shot linearization (``snl_fx.linearize(model, x, budget)``), ``export_onnx(..., profile="pi")``,
then ``snl_fx.pi_bench`` (2 parties on loopback, 1 thread each) and
``snl_fx.pi_cost(path, protocol="crypten", network="lan")`` for the calibrated prediction. Times:
``--rounds`` rounds, each running every file in turn (drifts of a shared machine hit all files alike) with
``pi_bench(runs=3)`` (median of 3 inferences); then the median over rounds per file. Checks that
ReLU traffic is the per-ReLU cost times the ReLU count and that the traffic outside ReLU ops does
not change with the budget (the gather form adds 0 bytes). Usage:

    python benchmarks/pi_bench.py [--rounds 5] [--out runs/pi_bench/results.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

import snl_fx
from snl_fx.app.models import cifar_resnet18, small_resnet

MODELS = {
    "small_resnet": (small_resnet, (1, 28, 28), [0.2, 0.05, 0.01]),
    "cifar_resnet18": (cifar_resnet18, (3, 32, 32), [50_000, 15_000, 5_000]),
}


def measure(name: str, model: torch.nn.Module, x: torch.Tensor, budget: int | float | None, out: Path) -> dict:
    if budget is not None:
        model = snl_fx.linearize(model, x, budget).model
    path = out / f"{name}_{'original' if budget is None else budget}.onnx"
    snl_fx.export_onnx(model, x[:1], path, profile="pi")
    report = snl_fx.relu_count(path)
    r = snl_fx.pi_bench(path, runs=3, input=x[:1])
    row = {"model": name, "budget": budget, "kept": report.total, "relu_layers_in_file": report.relu_layers,
           "estimate": _estimate(path), "path": str(path), "input": x[:1],
           **r.to_dict(), "times": [r.seconds], "relu_times": [r.relu_seconds]}
    return row


def _estimate(path: Path) -> dict:
    """The calibrated model's prediction for the file under CrypTen on this machine's loopback (lan)."""
    cost = snl_fx.pi_cost(path, protocol="crypten", network="lan")
    return {"bytes": cost.bytes, "rounds": cost.rounds, "seconds": cost.seconds}


def time_rounds(rows: list[dict], rounds: int) -> None:
    """Run every file once per round, in turn; seconds and relu_seconds become medians over rounds."""
    for _ in range(rounds - 1):
        for row in rows:
            r = snl_fx.pi_bench(row["path"], runs=3, input=row["input"])
            row["times"].append(r.seconds)
            row["relu_times"].append(r.relu_seconds)
    for row in rows:
        row["timing_rounds"] = rounds
        row["seconds"] = statistics.median(row["times"])
        row["relu_seconds"] = statistics.median(row["relu_times"])
        del row["input"]
        print(json.dumps(row), flush=True)


def table(rows: list[dict]) -> str:
    head = ("| model | ReLUs kept | ReLUs CrypTen computed | ReLU layers | total MB | in ReLU ops MB | B per ReLU "
            "| outside ReLU ops MB | rounds (in ReLU ops) | s per inference (in ReLU ops) "
            "| estimate MB | estimate rounds | estimate s | max abs error |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        e = r["estimate"]
        per = f"{r['relu_bytes'] / r['relus']:.1f}" if r["relus"] else "-"
        lines.append(
            f"| {r['model']}{'' if r['budget'] is None else ' @ ' + str(r['budget'])} | {r['kept']:,} | {r['relus']:,} "
            f"| {r['relu_layers']} | {r['bytes'] / 1e6:.2f} | {r['relu_bytes'] / 1e6:.2f} | {per} "
            f"| {(r['bytes'] - r['relu_bytes']) / 1e6:.2f} | {r['rounds']} ({r['relu_rounds']}) "
            f"| {r['seconds']:.2f} ({r['relu_seconds']:.2f}) | {e['bytes'] / 1e6:.2f} | {e['rounds']} "
            f"| {e['seconds']:.2f} | {r['max_abs_error']:.2g} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds of 3 inferences per file (median)")
    parser.add_argument("--out", default="runs/pi_bench/results.json")
    parser.add_argument("--quick", action="store_true", help="small_resnet only")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    load = [os.getloadavg()[0]]
    for name, (factory, shape, budgets) in MODELS.items():
        if args.quick and name != "small_resnet":
            continue
        torch.manual_seed(0)
        model = factory().eval()
        x = torch.randn(16, *shape)
        model_rows = [measure(name, model, x, b, out.parent) for b in [None, *budgets]]
        per_relu = {r["relu_bytes"] / r["relus"] for r in model_rows}
        outside = {r["bytes"] - r["relu_bytes"] for r in model_rows}
        assert len(per_relu) == 1, f"{name}: bytes per ReLU differ across budgets: {per_relu}"
        assert len(outside) == 1, f"{name}: traffic outside ReLU ops differs across budgets: {outside}"
        assert all(r["relus"] == r["kept"] for r in model_rows)
        rows += model_rows
    time_rounds(rows, args.rounds)
    load.append(os.getloadavg()[0])
    out.write_text(json.dumps({"load_average_start_end": load, "rows": rows}, indent=2))
    print(table(rows))
    print(f"\nload average (1 min) at start and end: {load[0]:.1f}, {load[1]:.1f}; results in {out}")


if __name__ == "__main__":
    main()
