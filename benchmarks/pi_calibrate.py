"""Calibrate the PI cost model: run tiny graphs through each backend, fit its constants, check them.

Every graph (one conv, one gemm, ReLU layers, partial ReLU layers in the gather form, max-pools,
bare outputs) is exported with ``export_onnx(..., profile="pi")`` and run with
``snl_fx.pi_bench``; its features come from the cost model itself
(``snl_fx.relu_count(path)`` -> ``layer_features``). Bytes and rounds are fitted by least squares
over those features (rounds and exact byte counts rounded to integers), compute seconds by
non-negative least squares of relative errors over MACs, ReLUs, comparisons and rounds (the two
small_resnet files included: tiny graphs alone time mostly overhead). small_resnet (all ReLUs,
and 10% kept per pixel) is left out of the bytes and rounds fit and checks it. The constants go to
``snl_fx/pi_constants.json`` with backend, date and command; other backends' entries are kept.
Usage:

    python benchmarks/pi_calibrate.py [--backend crypten] [--backend spu-cheetah] [--runs 3]
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import snl_fx
from snl_fx.calibration import CONSTANTS_PATH, layer_features
from snl_fx.app.models import small_resnet

SOURCES = {
    "crypten": "measured: CrypTen 0.4.1 2PC, 2 processes on loopback, TFP Beaver triples (online traffic)",
    "spu-cheetah": "measured: SecretFlow SPU 0.9.5 CHEETAH 2PC (dealer-free), SPU link statistics",
    "spu-semi2k": "measured: SecretFlow SPU 0.9.5 SEMI2K 2PC, SPU link statistics",
}
TIMING = ("fixed", "mac", "relu", "comparison", "round")  # features of compute seconds


def seq(*layers: nn.Module) -> nn.Module:
    return nn.Sequential(*layers).eval()


def partial(model: nn.Module, x: torch.Tensor, fraction: float, granularity: str, seed: int = 0) -> nn.Module:
    """A lowered model keeping ``fraction`` of its ReLUs, chosen by random gate values."""
    gm = snl_fx.prepare(model, x, granularity=granularity)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in snl_fx.gate_parameters(gm):
            p.uniform_()
    total = sum(snl_fx.site_relu_counts(gm).values())
    snl_fx.binarize(gm, max(1, int(total * fraction)))
    return snl_fx.convert(gm)


def graphs() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """The calibration set: each feature varies on its own in at least two graphs."""
    torch.manual_seed(0)
    conv = lambda i, o, k=3, s=1: nn.Conv2d(i, o, k, stride=s, padding=k // 2)  # noqa: E731
    two_relus = seq(conv(3, 4), nn.ReLU(), conv(4, 4), nn.ReLU())
    x8 = torch.randn(1, 3, 8, 8)
    return {
        "output_192": (seq(nn.Flatten()), (1, 3, 8, 8)),
        "output_768": (seq(nn.Flatten()), (1, 3, 16, 16)),
        "conv_3to8_8x8": (seq(conv(3, 8)), (1, 3, 8, 8)),
        "conv_3to16_8x8": (seq(conv(3, 16)), (1, 3, 8, 8)),
        "conv_3to8_16x16": (seq(conv(3, 8)), (1, 3, 16, 16)),
        "conv_3to8_16x16_stride2": (seq(conv(3, 8, s=2)), (1, 3, 16, 16)),
        "conv_1x1_8to4": (seq(conv(8, 4, k=1)), (1, 8, 8, 8)),
        "conv_6to8_8x8": (seq(conv(6, 8)), (1, 6, 8, 8)),
        "conv_3to8_8x8_k5": (seq(conv(3, 8, k=5)), (1, 3, 8, 8)),
        "conv_16to32_14x14_stride2": (seq(conv(16, 32, s=2)), (1, 16, 14, 14)),
        "conv_32to32_7x7": (seq(conv(32, 32)), (1, 32, 7, 7)),
        "two_convs": (seq(conv(3, 4), conv(4, 4)), (1, 3, 8, 8)),
        "conv_16to16_32x32": (seq(conv(16, 16)), (1, 16, 32, 32)),  # timing: MACs dominate
        "conv_64to64_32x32": (seq(conv(64, 64)), (1, 64, 32, 32)),  # timing: 38M MACs, ResNet-sized
        "gemm_48to10": (seq(nn.Flatten(), nn.Linear(48, 10)), (1, 3, 4, 4)),
        "gemm_64to32": (seq(nn.Flatten(), nn.Linear(64, 32)), (1, 4, 4, 4)),
        "relu_192": (seq(nn.ReLU()), (1, 3, 8, 8)),
        "relu_768": (seq(nn.ReLU()), (1, 3, 16, 16)),
        "relu_16384": (seq(nn.ReLU()), (1, 16, 32, 32)),  # timing: per-ReLU time dominates
        "relu_two_layers": (seq(nn.ReLU(), nn.Flatten(), nn.ReLU()), (1, 3, 8, 8)),
        "conv_relu_conv_relu": (two_relus, (1, 3, 8, 8)),
        "partial_pixel_25pct": (partial(two_relus, x8, 0.25, "pixel"), (1, 3, 8, 8)),
        "partial_channel_50pct": (partial(two_relus, x8, 0.5, "channel"), (1, 3, 8, 8)),
        "maxpool2_8x8": (seq(nn.MaxPool2d(2)), (1, 3, 8, 8)),
        "maxpool2_16x16": (seq(nn.MaxPool2d(2)), (1, 3, 16, 16)),
        "maxpool3s2_8x8": (seq(nn.MaxPool2d(3, 2, 1)), (1, 3, 8, 8)),
        "maxpool3s2_16x16": (seq(nn.MaxPool2d(3, 2, 1)), (1, 3, 16, 16)),
    }


def features_of(path: Path) -> dict[str, float]:
    total: dict[str, float] = {}
    for *_, feats in layer_features(snl_fx.relu_count(path)):
        for k, v in feats.items():
            total[k] = total.get(k, 0) + v
    return total


def bench(path: Path, backend: str, runs: int, x: torch.Tensor) -> dict:
    kwargs = {"backend": backend} if "backend" in inspect.signature(snl_fx.pi_bench).parameters else {}
    if backend != "crypten" and not kwargs:
        raise SystemExit(f"snl_fx.pi_bench has no backend argument yet: cannot run {backend}")
    r = snl_fx.pi_bench(path, runs=runs, input=x, **kwargs)
    return {"bytes": r.bytes, "rounds": r.rounds, "seconds": r.seconds, "relus": r.relus, "relu_bytes": r.relu_bytes,
            "relu_rounds": r.relu_rounds, "setup_bytes": getattr(r, "setup_bytes", None)}


def fit(rows: list[dict], names: list[str], target: str, relative: bool = False) -> dict[str, float]:
    """Least squares of ``target`` on ``names``.

    ``relative``: minimise relative errors (each row divided by its measurement: timings on a
    shared machine have outliers) with non-negative coefficients (negative ones dropped, refit).
    """
    names = list(names)
    while True:
        a = np.array([[r["features"].get(n, 0.0) for n in names] for r in rows], dtype=float)
        y = np.array([r[target] for r in rows], dtype=float)
        if relative:
            a, y = a / y[:, None], np.ones_like(y)
        rank = np.linalg.matrix_rank(a)
        if rank < len(names):
            raise SystemExit(f"calibration set does not identify {target} over {names} (rank {rank})")
        coef = np.linalg.lstsq(a, y, rcond=None)[0]
        if not relative or (coef >= 0).all():
            return dict(zip(names, coef.tolist()))
        names.pop(int(np.argmin(coef)))


def integral(coef: dict[str, float], tol: float = 1e-6) -> dict[str, float]:
    """Round coefficients that are integers up to fitting noise (deterministic protocols)."""
    return {k: float(round(v)) if abs(v - round(v)) < max(tol, 1e-9 * abs(v)) else round(v, 6) for k, v in coef.items()}


def calibrate(backend: str, runs: int, workdir: Path, only: list[str] | None = None,
              holdout_models: bool = True, logged: dict[str, dict] | None = None) -> tuple[dict, list[dict]]:
    """Measure the calibration graphs (``only``: a subset) and small_resnet; fit on the graphs alone.

    ``logged``: measurements printed by an earlier run of this script, by graph; those graphs are not run again.
    """
    models = {name: (model, torch.randn(shape, generator=torch.Generator().manual_seed(0)))
              for name, (model, shape) in graphs().items() if not only or name in only}
    torch.manual_seed(0)
    resnet, x = small_resnet().eval(), torch.randn(1, 1, 28, 28)
    holdout = {"small_resnet": (resnet, x), "small_resnet_pixel_10pct": (partial(resnet, x, 0.1, "pixel"), x)}
    holdout = holdout if holdout_models else {}
    rows = []
    for name, (model, x) in {**models, **holdout}.items():
        path = workdir / f"{name}.onnx"
        snl_fx.export_onnx(model, x, path, profile="pi")
        try:
            measured = (logged or {}).get(name) or bench(path, backend, runs, x)
        except snl_fx.SnlFxError as exc:  # an op the backend lacks: its features stay uncalibrated
            print(f"{name}: skipped under {backend}: {exc}", flush=True)
            continue
        row = {"graph": name, "holdout": name in holdout, "features": features_of(path), **measured}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "features"}), flush=True)
    graph_rows = [r for r in rows if not r["holdout"]]
    traffic = sorted({k for r in graph_rows for k in r["features"]} - {"mac", "comparison"})
    nbytes = integral(fit(graph_rows, traffic, "bytes"), tol=1e-3)
    rounds = {k: float(round(v)) for k, v in fit(graph_rows, traffic, "rounds").items()}
    for r in rows:
        r["features"]["round"] = r["rounds"]
    timing = [k for k in TIMING if any(r["features"].get(k) for r in rows)]
    seconds = {k: 0.0 for k in TIMING} | fit(rows, timing, "seconds", relative=True)
    entry = {
        "backend": backend,
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "source": SOURCES[backend],
        "bytes": nbytes,
        "rounds": rounds,
        "seconds": seconds,
    }
    return entry, rows


def check(entry: dict, rows: list[dict], backend: str, workdir: Path) -> dict:
    """Predicted vs measured on every graph; small_resnet rows were not in the bytes/rounds fit."""
    from snl_fx.calibration import CostTable, cost_from_report, parse_network

    table = CostTable(backend, entry["bytes"], entry["rounds"], entry["seconds"], entry["source"], {})
    out = []
    for r in rows:
        cost = cost_from_report(snl_fx.relu_count(workdir / f"{r['graph']}.onnx"), table, parse_network("lan"))
        out.append({"graph": r["graph"], "holdout": r["holdout"],
                    "bytes": r["bytes"], "predicted_bytes": cost.bytes,
                    "rounds": r["rounds"], "predicted_rounds": cost.rounds,
                    "seconds": r["seconds"], "predicted_compute_seconds": cost.compute_seconds})
    worst = max(abs(o["predicted_bytes"] - o["bytes"]) / o["bytes"] for o in out)
    exact = all(o["predicted_rounds"] == o["rounds"] for o in out)
    timing = [abs(o["predicted_compute_seconds"] - o["seconds"]) / o["seconds"] for o in out]
    print(f"{backend}: worst bytes error {worst:.3%}, rounds exact: {exact}, "
          f"median compute-time error {float(np.median(timing)):.0%}", flush=True)
    return {"max_bytes_rel_error": worst, "rounds_exact": exact,
            "median_seconds_rel_error": float(np.median(timing)), "graphs": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", choices=sorted(SOURCES), help="default: crypten")
    parser.add_argument("--runs", type=int, default=5, help="inferences per graph (median seconds)")
    parser.add_argument("--graphs", action="append", metavar="NAME", help="calibrate on these graphs only")
    parser.add_argument("--no-holdout", action="store_true", help="skip the small_resnet check runs")
    parser.add_argument("--from-log", metavar="FILE", help="reuse the rows this script printed in an earlier run")
    parser.add_argument("--out", default=str(CONSTANTS_PATH), help="the constants file (entries merged)")
    parser.add_argument("--results", default="benchmarks/results/pi_calibrate.json", help="per-graph measurements")
    args = parser.parse_args()
    out, results_path = Path(args.out), Path(args.results)
    constants = json.loads(out.read_text()) if out.exists() else {"protocols": {}}
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    with tempfile.TemporaryDirectory(prefix="pi_calibrate_") as tmp:
        for backend in args.backend or ["crypten"]:
            logged = {}
            for line in Path(args.from_log).read_text().splitlines() if args.from_log else []:
                if line.startswith('{"graph"'):
                    row = json.loads(line)
                    logged[row.pop("graph")] = {k: v for k, v in row.items() if k != "holdout"}
            entry, rows = calibrate(backend, args.runs, Path(tmp), args.graphs, not args.no_holdout, logged)
            results[backend] = check(entry, rows, backend, Path(tmp))
            entry["check"] = {k: v for k, v in results[backend].items() if k != "graphs"}
            constants["protocols"][backend] = entry
    constants["about"] = ("PI cost model constants per backend, fitted by benchmarks/pi_calibrate.py: "
                          "cost = sum of coefficient x feature (see snl_fx/_cost.py); bytes both directions")
    out.write_text(json.dumps(constants, indent=2) + "\n")
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({b: constants["protocols"][b] for b in args.backend or ["crypten"]}, indent=2))


if __name__ == "__main__":
    main()
