"""Calibrate the PI cost model: run tiny graphs through each backend, fit its constants, check them.

Every graph (one conv, one gemm, ReLU layers, partial ReLU layers in the gather form, max-pools,
bare outputs) is exported with ``export_onnx(..., profile="pi")`` and run with
``snl_fx.pi_bench``; its features come from the cost model itself
(``snl_fx.relu_count(path)`` -> ``layer_features``). Bytes and rounds are fitted by least squares
over those features (rounds and exact byte counts rounded to integers), compute seconds by
non-negative least squares of relative errors over MACs, ReLUs, comparisons and rounds (the two
small_resnet files included: tiny graphs alone time mostly overhead). small_resnet (all ReLUs,
and 10% kept per pixel) is left out of the bytes and rounds fit and checks it. The constants go to
``snl_fx/cost/pi_constants.json`` with backend, date and command; other backends' entries are kept.
Usage:

    python benchmarks/pi_calibrate.py [--backend crypten] [--backend spu-cheetah] [--runs 3]
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import snl_fx
from snl_fx.app.models import small_resnet
from snl_fx.cost.calibration import CHEETAH_OT_INSTANCES, CONSTANTS_PATH, layer_features

SOURCES = {
    "crypten": "measured: CrypTen 0.4.1 2PC, 2 processes on loopback, TFP Beaver triples (online traffic)",
    "spu-cheetah": "measured: SecretFlow SPU 0.9.5 CHEETAH 2PC (dealer-free), SPU link statistics",
    "spu-semi2k": "measured: SecretFlow SPU 0.9.5 SEMI2K 2PC, SPU link statistics",
}
TIMING = ("fixed", "mac", "relu", "comparison", "round")  # features of compute seconds
CHEETAH_TIMING = ("mac", "relu")  # fitted on the small_resnet runs alone (its tiny graphs time mostly set-up)


def seq(*layers: nn.Module) -> nn.Module:
    return nn.Sequential(*layers).eval()


def partial(model: nn.Module, x: torch.Tensor, fraction: float, granularity: str, seed: int = 0) -> nn.Module:
    """A lowered model keeping ``fraction`` of its ReLUs, chosen by random gate values."""
    gm = snl_fx.prepare(model, x, granularity=granularity)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in snl_fx.train.gate_parameters(gm):
            p.uniform_()
    total = sum(snl_fx.train.site_relu_counts(gm).values())
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
        # CHEETAH: OT work splits over instances above 2,048 elements; ciphertext packing steps
        "relu_2048": (seq(nn.ReLU()), (1, 8, 16, 16)),
        "relu_2304": (seq(nn.ReLU()), (1, 9, 16, 16)),
        "relu_4096": (seq(nn.ReLU()), (1, 16, 16, 16)),
        "relu_6144": (seq(nn.ReLU()), (1, 24, 16, 16)),
        "relu_12544": (seq(nn.ReLU()), (1, 16, 28, 28)),
        "conv_16to16_28x28": (seq(conv(16, 16)), (1, 16, 28, 28)),
        "conv_64to64_8x8": (seq(conv(64, 64)), (1, 64, 8, 8)),
        "conv_64to64_16x16": (seq(conv(64, 64)), (1, 64, 16, 16)),
        "conv_1to16_28x28": (seq(conv(1, 16)), (1, 1, 28, 28)),
        "gemm_512to10": (seq(nn.Flatten(), nn.Linear(512, 10)), (1, 512, 1, 1)),
        "gap_16x7x7": (seq(nn.AdaptiveAvgPool2d(1)), (1, 16, 7, 7)),
        "gap_64x8x8": (seq(nn.AdaptiveAvgPool2d(1)), (1, 64, 8, 8)),
        "maxpool2_32x32": (seq(nn.MaxPool2d(2)), (1, 16, 32, 32)),  # 4,096 outputs: two OT instances
        "maxpool3s2_32x32": (seq(nn.MaxPool2d(3, 2, 1)), (1, 16, 32, 32)),
    }


# SPU CHEETAH: the graphs it is calibrated on (the timing-only ones left out: its tiny graphs time
# mostly set-up) and the features its bytes and rounds are fitted over. The client's input share
# (8 B per input element) has no feature: it is absorbed by output/fixed (< 0.05% of a CNN's traffic).
CHEETAH_GRAPHS = (
    "output_192 output_768 relu_192 relu_768 relu_2048 relu_2304 relu_4096 relu_6144 relu_12544 relu_two_layers "
    "conv_3to8_8x8 conv_3to16_8x8 conv_6to8_8x8 conv_3to8_16x16 conv_3to8_16x16_stride2 conv_1x1_8to4 "
    "conv_3to8_8x8_k5 conv_16to32_14x14_stride2 conv_32to32_7x7 conv_16to16_28x28 conv_64to64_8x8 "
    "conv_64to64_16x16 conv_1to16_28x28 two_convs gemm_48to10 gemm_64to32 gemm_512to10 gap_16x7x7 gap_64x8x8 "
    "conv_relu_conv_relu partial_pixel_25pct maxpool2_8x8 maxpool2_16x16 maxpool2_32x32 maxpool3s2_8x8 maxpool3s2_16x16 "
    "maxpool3s2_32x32"
).split()
CHEETAH_FEATURES = ("fixed", "output", "relu", "relu_layer", "relu_ot_workers", "linear_output", "linear_layer",
                    "linear_ot_workers", "he_ct_in", "he_ct_out", "he_ct_out_packed", "avgpool_output", "avgpool_layer",
                    "maxpool4_output", "maxpool4_layer", "maxpool9_output", "maxpool9_layer", "maxpool4_ot_workers",
                    "maxpool9_ot_workers")
# Its bytes: per element and per ciphertext only, fitted on relative errors (graphs span 250 B to 3 MB;
# per-layer and per-instance byte terms came out negative, tens of kB, in an absolute fit).
CHEETAH_BYTES = ("fixed", "output", "relu", "linear_output", "he_ct_in", "he_ct_out", "he_ct_out_packed",
                 "avgpool_output", "maxpool4_output", "maxpool9_output")
# A silent-OT refill (SPU's Ferret bootstrap, 10,485,760 OTs for one instance and direction): one
# party sends 1,281 messages, 266,259 B (measured: a 65,536-ReLU layer of cifar_resnet18 with two
# refills sent 532,518 B and 2,562 messages more than without). No op of these models sends 1,281
# messages itself, so a profiled segment with A actions holds A // 1281 refills.
REFILL_ACTIONS, REFILL_BYTES = 1281, 266_259


def steady(reports: list[dict]) -> dict:
    """CHEETAH: one inference's traffic without silent-OT refills, from both parties' raw SPU reports.

    Every pass after the first (which carries the one-time set-up) is counted with its refills taken
    out; bytes: the mean over those passes (HE ciphertexts are compressed: +-0.05% between passes),
    rounds: the busier party's send actions; ``refills``: refills per pass; ``first_bytes``: the
    first pass (set-up included) as it was measured, ``setup_bytes``: first minus steady;
    ``input_bytes``: the client's share of its input (in ``bytes``; the cost model has no feature for it).
    """
    passes = len(reports[0]["passes"])

    def one(k: int) -> tuple[float, int, int, int, int]:
        nbytes, raw, actions, refills = 0, 0, [], 0
        for party in reports:
            p = party["passes"][k]
            count = 1 if p["manual_sent"] else 0
            for seg in p["segments"]:
                r = seg["actions"] // REFILL_ACTIONS
                refills += r
                nbytes += seg["sent"] - r * REFILL_BYTES
                count += seg["actions"] - r * REFILL_ACTIONS
            nbytes += p["manual_sent"]
            raw += p["sent"]
            actions.append(count)
        return nbytes, max(actions), refills, raw, max(party["passes"][k]["actions"] for party in reports)

    runs = [one(k) for k in range(1, passes)]
    first = one(0)
    nbytes = float(np.mean([r[0] for r in runs]))
    return {"bytes": nbytes, "input_bytes": reports[1]["passes"][1]["manual_sent"], "rounds": max(r[1] for r in runs), "refills": [r[2] for r in runs],
            "raw_bytes": [r[3] for r in runs], "raw_rounds": [r[4] for r in runs],
            "first_bytes": first[3], "first_rounds": first[4], "setup_bytes": first[3] - nbytes}


def spu_raw(path: Path, backend: str, runs: int, x: torch.Tensor):
    """``snl_fx.pi_bench`` under an SPU backend, with both parties' raw per-pass reports kept."""
    with tempfile.TemporaryDirectory(prefix="pi_calibrate_spu_") as tmp:
        keep = Path(tmp) / "reports.json"
        os.environ["SNL_FX_SPU_REPORTS"] = str(keep)
        try:
            result = snl_fx.pi_bench(path, runs=runs, input=x, backend=backend)
        finally:
            del os.environ["SNL_FX_SPU_REPORTS"]
        return result, json.loads(keep.read_text())


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
    if backend == "spu-cheetah":  # refills out, per-pass detail kept (see steady)
        r, reports = spu_raw(path, backend, max(runs, 2), x)
        return {**steady(reports), "seconds": r.seconds, "relus": r.relus}
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
    only = only or (CHEETAH_GRAPHS if backend == "spu-cheetah" else None)
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
    target = "bytes"
    if backend == "spu-cheetah":  # fitted without the client's input share (no feature: see CHEETAH_GRAPHS)
        target = "model_bytes"
        for r in rows:
            r["model_bytes"] = r["bytes"] - r["input_bytes"]
    traffic = sorted({k for r in graph_rows for k in r["features"]} - {"mac", "comparison"})
    zero = {}
    if backend == "spu-cheetah":  # priced by ciphertexts and OT work, not by input/weight/im2col sizes
        zero = {k: 0.0 for k in traffic if k not in CHEETAH_FEATURES}
        traffic = [k for k in traffic if k in CHEETAH_FEATURES]
    if backend == "spu-cheetah":
        nbytes = {k: 0.0 for k in traffic} | integral(
            fit(graph_rows, [k for k in traffic if k in CHEETAH_BYTES], target, relative=True), tol=1e-3) | zero
    else:
        nbytes = integral(fit(graph_rows, traffic, target), tol=1e-3) | zero
    rounds = {k: float(round(v)) for k, v in fit(graph_rows, traffic, "rounds").items()} | zero
    for r in rows:
        r["features"]["round"] = r["rounds"]
    # CHEETAH: its compute time is fitted on the small_resnet runs alone (tiny graphs time mostly overhead)
    timed = [r for r in rows if r.get("seconds") and (backend != "spu-cheetah" or r["holdout"])]
    timing = [k for k in (CHEETAH_TIMING if backend == "spu-cheetah" else TIMING)
              if any(r["features"].get(k) for r in timed)]
    seconds = {k: 0.0 for k in TIMING} | fit(timed, timing, "seconds", relative=True)
    entry = {
        "backend": backend,
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "source": SOURCES[backend],
        "bytes": nbytes,
        "rounds": rounds,
        "seconds": seconds,
    }
    if backend == "spu-cheetah":
        entry["ot_instances"] = CHEETAH_OT_INSTANCES
        entry["refill"] = {"bytes": REFILL_BYTES, "messages": REFILL_ACTIONS, "ots": 10_485_760}
        # One-time set-up, from the first inference's excess: an average pool alone opens one OT
        # instance (no HE keys, no refill); a gemm alone adds the HE public and Galois keys.
        ot_setup = float(np.median([r["setup_bytes"] for r in rows if r["graph"].startswith("gap_")]))
        he_keys = float(np.median([r["setup_bytes"] for r in rows if r["graph"].startswith("gemm_")])) - ot_setup
        messages = int(np.median([r["first_rounds"] - r["rounds"] for r in rows if r["graph"].startswith("gap_")]))
        entry["setup"] = {"he_keys": round(he_keys), "ot_instance": round(ot_setup), "ot_instance_messages": messages,
                          "first_refills_per_instance": 2}
        entry["note"] = ("bytes: relative least squares over CHEETAH_BYTES (per-layer and per-instance byte terms are 0: "
                         "an absolute fit made them negative); rounds: exact. seconds: fitted on the two small_resnet runs "
                         "alone, rough. ot_instances: SPU's OT instances on the calibration machine (2 cores). setup: "
                         "one-time, first inference only, not in pi_cost's totals. --from-log rows: each graph run in a "
                         "fresh SPU session for 4 inferences, reduced by steady()")
        entry["quantity"] = ("steady state: one inference after the first in the same SPU session, silent-OT "
                             "refills taken out (they come every 10,485,760 OTs per instance and direction)")
    return entry, rows


def check(entry: dict, rows: list[dict], backend: str, workdir: Path) -> dict:
    """Predicted vs measured on every graph; small_resnet rows were not in the bytes/rounds fit."""
    from snl_fx.cost.calibration import CostTable, cost_from_report, parse_network

    table = CostTable(backend, entry["bytes"], entry["rounds"], entry["seconds"], entry["source"], {})
    out = []
    for r in rows:
        cost = cost_from_report(snl_fx.relu_count(workdir / f"{r['graph']}.onnx"), table, parse_network("lan"))
        out.append({"graph": r["graph"], "holdout": r["holdout"],
                    "bytes": r.get("model_bytes", r["bytes"]), "predicted_bytes": cost.bytes,
                    "rounds": r["rounds"], "predicted_rounds": cost.rounds,
                    "seconds": r.get("seconds"), "predicted_compute_seconds": cost.compute_seconds})
    worst = max(abs(o["predicted_bytes"] - o["bytes"]) / o["bytes"] for o in out)
    exact = all(o["predicted_rounds"] == o["rounds"] for o in out)
    timing = [abs(o["predicted_compute_seconds"] - o["seconds"]) / o["seconds"] for o in out
              if o["seconds"] and (backend != "spu-cheetah" or o["holdout"])]
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
                          "cost = sum of coefficient x feature (see snl_fx/cost/model.py); bytes both directions")
    out.write_text(json.dumps(constants, indent=2) + "\n")
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({b: constants["protocols"][b] for b in args.backend or ["crypten"]}, indent=2))


if __name__ == "__main__":
    main()
