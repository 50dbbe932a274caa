"""Predicted vs measured private-inference cost: small_resnet and cifar_resnet18 at 100/10/3/1% of their ReLUs.

Each file: random weights (cost does not depend on them), ``snl_fx.prepare`` with pixel or
channel gates, random gate values, ``binarize`` to the fraction, ``convert``, ``export_onnx(...,
profile="pi")``. Measured with ``snl_fx.pi_bench`` under each backend asked for; predicted with
``snl_fx.pi_cost(path, protocol=backend, network=lan|wan)``. Rows are merged into the results
JSON per (model, granularity, fraction, backend). spu-cheetah is measured as
``pi_calibrate.bench`` does: the steady state (an inference after the first in the same SPU
session) with silent-OT refills taken out and counted apart. Usage:

    python benchmarks/pi_cost_check.py [--models small_resnet] [--backend crypten] [--runs 1] [--reprice]
        [--from-log FILE]   # measurements per file (JSON lines with "file": NAME), not run again
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import snl_fx
from snl_fx.app.models import cifar_resnet18, small_resnet

sys.path.insert(0, str(Path(__file__).parent))
from pi_calibrate import REFILL_BYTES, bench, partial  # noqa: E402  (the same random-gate files as the calibration)

MODELS = {"small_resnet": (small_resnet, (1, 1, 28, 28)), "cifar_resnet18": (cifar_resnet18, (1, 3, 32, 32))}
FRACTIONS = (1.0, 0.1, 0.03, 0.01)
MEASURED = ("bytes", "rounds", "seconds", "relus", "relu_bytes", "relu_rounds", "setup_bytes",
            # spu-cheetah (pi_calibrate.steady): refills out of bytes/rounds, shown apart; the first inference
            "input_bytes", "refills", "raw_bytes", "raw_rounds", "first_bytes", "first_rounds")


def files(name: str, workdir: Path) -> list[tuple[str, float, Path, torch.Tensor]]:
    """(granularity, fraction, path, input) of every file of ``name``; 100% is the original model."""
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model, x = factory().eval(), torch.randn(shape)
    out = []
    for granularity in ("pixel", "channel"):
        for fraction in FRACTIONS:
            if fraction == 1.0 and granularity == "channel":
                continue
            path = workdir / f"{name}_{granularity}_{fraction}.onnx"
            if not path.exists():
                lowered = model if fraction == 1.0 else partial(model, x, fraction, granularity)
                snl_fx.export_onnx(lowered, x, path, profile="pi")
            out.append(("all" if fraction == 1.0 else granularity, fraction, path, x))
    return out


def row(name: str, granularity: str, fraction: float, path: Path, x: torch.Tensor, backend: str, runs: int,
        measured: dict | None = None) -> dict:
    """Measure (unless ``measured`` is given) and predict one file under one backend."""
    measured = measured or bench(path, backend, runs, x)
    lan = snl_fx.pi_cost(path, protocol=backend, network="lan")
    wan = snl_fx.pi_cost(path, protocol=backend, network="wan")
    relu = lan.by_kind().get("relu", {"bytes": 0, "rounds": 0})
    return {
        "model": name, "granularity": granularity, "fraction": fraction, "backend": backend,
        "kept_relus": snl_fx.relu_count(path).total, **measured,
        "predicted_bytes": lan.bytes, "predicted_rounds": lan.rounds,
        "predicted_compute_seconds": lan.compute_seconds, "predicted_lan_seconds": lan.seconds,
        "predicted_wan_seconds": wan.seconds,
        "predicted_relu_bytes": relu["bytes"], "predicted_relu_rounds": relu["rounds"],
        "bytes_rel_error": (lan.bytes - measured["bytes"]) / measured["bytes"],
        "rounds_exact": lan.rounds == measured["rounds"],
    }


def cheetah_table(rows: list[dict]) -> str:
    """spu-cheetah rows: steady state vs prediction, then what the model leaves out (refills, set-up)."""
    head = ("| model | gates | ReLUs kept | MB measured (steady) | MB predicted (error) | rounds measured "
            "| rounds predicted | refills in the measured inference (MB) | first inference MB (set-up MB) "
            "| ReLU share of bytes / rounds (predicted) | s loopback measured | LAN s | WAN s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        refills = (r.get("refills") or [0])[0]
        share_b = r["predicted_relu_bytes"] / r["predicted_bytes"] if r["predicted_bytes"] else 0.0
        share_r = r["predicted_relu_rounds"] / r["predicted_rounds"] if r["predicted_rounds"] else 0.0
        first = "-" if r.get("first_bytes") is None else f"{r['first_bytes'] / 1e6:.2f} ({r['setup_bytes'] / 1e6:.2f})"
        lines.append(
            f"| {r['model']} | {r['granularity']} | {r['kept_relus']:,} ({r['fraction']:.0%}) "
            f"| {r['bytes'] / 1e6:.3f} | {r['predicted_bytes'] / 1e6:.3f} ({r['bytes_rel_error']:+.2%}) "
            f"| {r['rounds']} | {r['predicted_rounds']} | {refills} ({refills * REFILL_BYTES / 1e6:.2f}) | {first} "
            f"| {share_b:.1%} / {share_r:.1%} | {r['seconds']:.2f} "
            f"| {r['predicted_lan_seconds']:.2f} | {r['predicted_wan_seconds']:.2f} |"
        )
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = ("| model | gates | ReLUs kept | backend | MB measured | MB predicted (error) | rounds measured "
            "| rounds predicted | ReLU share of bytes / rounds (predicted) | s loopback measured | "
            "s compute predicted | LAN s | WAN s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        share_b = r["predicted_relu_bytes"] / r["predicted_bytes"] if r["predicted_bytes"] else 0.0
        share_r = r["predicted_relu_rounds"] / r["predicted_rounds"] if r["predicted_rounds"] else 0.0
        lines.append(
            f"| {r['model']} | {r['granularity']} | {r['kept_relus']:,} ({r['fraction']:.0%}) | {r['backend']} "
            f"| {r['bytes'] / 1e6:.3f} | {r['predicted_bytes'] / 1e6:.3f} ({r['bytes_rel_error']:+.2%}) "
            f"| {r['rounds']} | {r['predicted_rounds']} | {share_b:.1%} / {share_r:.1%} "
            f"| {r['seconds']:.2f} | {r['predicted_compute_seconds']:.2f} "
            f"| {r['predicted_lan_seconds']:.2f} | {r['predicted_wan_seconds']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", action="append", choices=sorted(MODELS), help="default: both")
    parser.add_argument("--backend", action="append", help="crypten (default), spu-cheetah, spu-semi2k")
    parser.add_argument("--runs", type=int, default=1, help="inferences per file (median seconds)")
    parser.add_argument("--workdir", default="runs/pi_cost_check", help="where the ONNX files are made (reused)")
    parser.add_argument("--out", default="benchmarks/results/pi_cost_check.json")
    parser.add_argument("--reprice", action="store_true", help="keep the stored measurements, predict again")
    parser.add_argument("--from-log", metavar="FILE", help="measurements by file name (JSON lines), not run again")
    args = parser.parse_args()
    workdir, out = Path(args.workdir), Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    key = lambda r: (r["model"], r["granularity"], r["fraction"], r["backend"])  # noqa: E731
    stored = json.loads(out.read_text()) if out.exists() else {"rows": []}
    rows = {key(r): r for r in stored["rows"]}
    command = "python " + " ".join(sys.argv)
    meta = {"command": stored.get("command", command) if args.reprice else command}
    if args.reprice:
        meta["repriced_by"] = command
    logged = {}
    for line in Path(args.from_log).read_text().splitlines() if args.from_log else []:
        entry = json.loads(line)
        logged[entry.pop("file")] = {k: entry.get(k) for k in MEASURED}
    for name in args.models or list(MODELS):
        for granularity, fraction, path, x in files(name, workdir):
            for backend in args.backend or ["crypten"]:
                old = rows.get((name, granularity, fraction, backend))
                if args.reprice and old is None or args.from_log and path.stem not in logged:
                    continue
                measured = {k: old.get(k) for k in MEASURED} if args.reprice else logged.get(path.stem)
                r = row(name, granularity, fraction, path, x, backend, args.runs, measured)
                rows[key(r)] = r
                print(json.dumps(r), flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({**meta, "rows": list(rows.values())}, indent=2) + "\n")
    ordered = sorted(rows.values(), key=lambda r: (r["model"] != "small_resnet", r["backend"], r["granularity"] != "all",
                                                   r["granularity"], -r["fraction"]))
    print(table([r for r in ordered if r["backend"] != "spu-cheetah"]))
    cheetah = [r for r in ordered if r["backend"] == "spu-cheetah"]
    if cheetah:
        print(cheetah_table(cheetah))


if __name__ == "__main__":
    main()
