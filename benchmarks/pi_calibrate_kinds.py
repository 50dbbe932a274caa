"""Calibrate the PI cost model's other nonlinearities per backend (CrypTen, SPU SEMI2K or CHEETAH).

Issue 18: GELU, SiLU, sigmoid, tanh, softmax, LayerNorm, exp, division by a secret, secret x secret products.

Each kind runs on tiny torch graphs, exported with ``export_onnx(..., profile="pi")`` and run with
``snl_fx.pi_bench``, whose ``PiBenchResult.kinds`` gives the bytes, rounds and seconds spent in
each kind; the kinds a backend does not segment are the difference with the same graph without
the kind (SPU: ``mul``, a secret product run inside a linear segment; ``silu``, sigmoid plus that
product). What differs between backends is data, in ``BACKENDS``: the graphs (kinds, shapes, a
linear layer in front), the kinds measured by difference, the softmax rounds and the seconds fit.

Features are the cost model's own (``layer_features`` of ``snl_fx.relu_count(path)``: ``<kind>``
elements, ``<kind>_layer``, ``<kind>_rows`` for softmax and LayerNorm, ``softmax_depth`` and
``softmax_odd``). Bytes are fitted by least squares (integers kept where they come out integral),
rounds per layer (softmax: and per level of its row maximum's comparison tree) so that every
graph matches (CrypTen softmax: those with rows of 64 and 197), seconds by non-negative least
squares of relative errors (SPU) or as compute beyond the entry's seconds per round, negative
terms set to 0 (CrypTen). The last graph of each kind is held out of the fit and checked. With
``--write`` the coefficients are added to the backend's entry of ``snl_fx/cost/pi_constants.json``
(other keys kept), with backend, date and command under ``kinds``. CHEETAH (``CHEETAH``): more
sizes, a ``<kind>_ot_workers`` feature, rounds by least squares (not exact: they grow in steps
with the elements), and for mul and LayerNorm SPU's Beaver-triple refills counted per graph and
amortised. ``--softmax-broadcast`` measures softmax with SPU's denominator option and writes it
under the entry's ``softmax_broadcast`` (``snl_fx.cost.tables.cost_table`` overlays it); without
it the runs have the option off, whatever the runs' default. ``--vit`` checks the zoo ViT.
Usage:

    python benchmarks/pi_calibrate_kinds.py --backend spu-semi2k [--kinds gelu softmax ...] [--write]
    python benchmarks/pi_calibrate_kinds.py --backend spu-cheetah --from-log FILE --write
    python benchmarks/pi_calibrate_kinds.py --backend spu-semi2k --kinds softmax --softmax-broadcast --write
    python benchmarks/pi_calibrate_kinds.py --backend crypten --from-log FILE --write
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pi_calibrate import REFILL_ACTIONS, REFILL_BYTES, SOURCES, fit, integral, seq, spu_raw  # the ReLU calibration's helpers

import snl_fx
from snl_fx.cost.calibration import CONSTANTS_PATH, layer_features

ROW_KINDS = ("softmax", "layernorm")  # kinds with a <kind>_rows feature


class Fn(nn.Module):
    def __init__(self, f) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


class Pair(nn.Module):
    """A linear layer to 2 x ``d`` features, split in two activations a, b, then ``f(a, b)``."""

    def __init__(self, d: int, f) -> None:
        super().__init__()
        self.lin, self.f, self.d = nn.Linear(d, 2 * d), f, d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return self.f(y[..., :self.d], y[..., self.d:])


def fn(f):
    return lambda d: Fn(f)


def pair(f):
    return lambda d: Pair(d, f)


def _first(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a


SPU = {
    "kinds": {  # kind -> (module on the last dim d, the same graph without the kind: measured by difference)
        "gelu": (lambda d: nn.GELU(), None),
        "gelu_tanh": (lambda d: nn.GELU("tanh"), None),
        "silu": (lambda d: nn.SiLU(), lambda d: nn.Identity()),
        "sigmoid": (lambda d: nn.Sigmoid(), None),
        "tanh": (lambda d: nn.Tanh(), None),
        "exp": (pair(lambda a, b: torch.exp(a)), pair(_first)),
        "div": (pair(lambda a, b: a / (b * b + 1)), None),  # b*b: a mul layer, priced apart
        "mul": (pair(lambda a, b: a * b), pair(_first)),
        "softmax": (lambda d: nn.Softmax(dim=-1), None),
        "layernorm": (lambda d: nn.LayerNorm(d), None),
    },
    "linear": True,  # a linear layer in front of the kind (a Pair has its own)
    # (input shape without the batch, twice in a row); the last one of each list is held out
    "shapes": [((8, 16), False), ((32, 64), False), ((12, 64), False)],
    "row_shapes": [((8, 16), False), ((4, 64), False), ((16, 64), False), ((2, 197), False), ((3, 24), False)],
    "rounds_depth": ("softmax_depth", "softmax_odd"),  # softmax rounds: per layer and per tree level
    "softmax_rounds_rows": None,  # the rows whose softmax rounds are fitted and must match (None: all)
    "seconds": "relative",
    "runs": 2,
    "source": "; per-kind segments of the SPU runner (PiBenchResult.kinds)",
    "note": ("bytes: least squares over <kind> elements, <kind>_layer (and <kind>_rows for softmax / layernorm) "
             "on the fit graphs; rounds: per layer, equal on every graph; mul and silu: the difference with "
             "the graph without them (SPU runs a secret product inside a linear segment; SiLU = sigmoid + mul)"),
}
CRYPTEN = {
    "kinds": {
        "sigmoid": (fn(torch.sigmoid), None),
        "tanh": (fn(torch.tanh), None),
        "softmax": (fn(lambda x: torch.softmax(x, dim=-1)), None),
        "exp": (fn(torch.exp), None),
        "div": (fn(lambda x: x / (torch.sigmoid(x) + 1)), None),  # by a secret in (1, 2); sigmoid priced apart
        "mul": (fn(lambda x: x * (x + 1)), None),  # not x * x: CrypTen 0.4.1 cannot feed one value to both inputs
    },
    "linear": False,
    "shapes": [((256,), False), ((1024,), False), ((256,), True), ((4096,), False)],
    "row_shapes": [((4, 64), False), ((2, 197), False), ((8, 32), False), ((2, 64), True), ((4, 197), True),
                   ((16, 197), False)],
    "rounds_depth": ("softmax_depth",),
    # CrypTen's row maximum is not linear in the depth (rows of 8, 16, 32, 64, 100-129, 197-256: 93, 95,
    # 105, 115, 116, 126 rounds): the line through rows of 64 and 197 (ViT at 224 px), within 9 elsewhere
    "softmax_rounds_rows": (64, 197),
    "seconds": "beyond_rounds",
    "runs": 3,
    "source": "; per-kind modules of the CrypTen runner (PiBenchResult.kinds)",
    "note": ("sigmoid, tanh, softmax, exp, div (by a secret), mul (two secrets): fitted by "
             "benchmarks/pi_calibrate_kinds.py on each kind's own CrypTen modules; softmax "
             "rounds: softmax_layer + softmax_depth (ceil(log2(row))), the line through rows of 64 and "
             "197, exact there; CrypTen's row maximum is not linear in the depth (rows of 8, 16, "
             "32, 64, 100-129, 197-256: 93, 95, 105, 115, 116, 126 rounds), so other rows are within 9 "
             "rounds; softmax_depth bytes 0. Seconds: compute beyond the entry's seconds per round, "
             "negative terms set to 0 (on these tiny graphs 4.4 ms per round already exceeds the measured "
             "time: predicted seconds up to 2x the measured)"),
}
# CHEETAH: SEMI2K's graphs at more sizes, on both sides of 2,048 elements (one OT instance below,
# two above: ``<kind>_ot_workers``); the last (34x64 = 2,176 elements, rows of 17 in 68 rows: the
# zoo ViT's GELU and softmax sizes) held out. Its rounds grow with the elements within one OT
# instance as well (OT batching), so rounds are fitted by least squares and their error reported.
CHEETAH = dict(
    SPU,
    shapes=[((8, 16), False), ((32, 64), False), ((12, 64), False), ((64, 64), False), ((96, 64), False),
            ((34, 64), False)],
    row_shapes=[((8, 16), False), ((4, 64), False), ((16, 64), False), ((2, 197), False), ((3, 24), False),
                ((32, 64), False), ((16, 197), False), ((64, 16), False), ((128, 8), False), ((68, 17), False)],
    rounds_fit="least_squares",
    # Kinds whose own traffic is small beside SPU's Beaver triples: CHEETAH makes triples for products
    # of two secrets (MulAA below 2 x 8,192 elements) with one homomorphic OLE of 8,192 slots, 4,096
    # triples, ~1.1 MB, whenever its cache runs short (libspu/mpc/cheetah/state.cc, makeSureCacheSize),
    # so a small graph's steady-state inference has 0, 1 or 2 such refills depending on what ran
    # before. Their refills are counted per graph (the residual of a fit without them, in whole
    # refills), their size fitted, and the price amortises them: triples per element (a product: 1;
    # LayerNorm: (x - mean)^2, times 1/sd, times its weight: 3) x refill bytes / 4,096.
    beaver={"mul": 1, "layernorm": 3},
    beaver_triples_per_refill=4096,
    note=("steady state (an inference after the first, silent-OT refills out). bytes: least squares over <kind> "
          "elements and <kind>_layer (softmax: and rows), within 5% on the held-out graphs of 2,176 elements but "
          "gelu_tanh (-5.3%); up to 30% on graphs of 128-768 elements, where one Beaver-triple refill (an HE OLE "
          "of 4,096 triples, ~1.14 MB, whenever SPU's cache runs short) more or less moves a layer's bytes; mul "
          "and layernorm: the refills each graph measured counted and their bytes amortised per element (1 and 3 "
          "triples an element), so a lone layer's steady-state bytes are the price +- about one refill. rounds: "
          "least squares over <kind>_layer, <kind>_ot_workers (1 OT instance up to 2,048 elements, 2 above) and "
          "elements (softmax: and its tree levels), within 10 rounds on every graph (OT batching: rounds grow in "
          "steps with the elements)"),
)
BACKENDS = {"crypten": CRYPTEN, "spu-semi2k": SPU, "spu-cheetah": CHEETAH}


def graphs(spec: dict, kinds: list[str]) -> list[dict]:
    """One dict per graph: kind, name, model, base (the graph without the kind, or None), x, holdout."""
    out = []
    for kind in kinds:
        make, make_base = spec["kinds"][kind]
        shapes = spec["row_shapes"] if kind in ROW_KINDS else spec["shapes"]
        for i, (shape, twice) in enumerate(shapes):
            torch.manual_seed(i)
            d = shape[-1]
            body = make(d)
            pre = [nn.Linear(d, d)] if spec["linear"] and not isinstance(body, Pair) else []
            again = [Fn(torch.sigmoid), make(d)] if kind == "exp" else [make(d)]  # exp(exp(x)) overflows
            model = seq(*pre, body, *(again if twice else []))
            base = None
            if make_base is not None:
                b = make_base(d)
                if isinstance(b, Pair):
                    b.lin = body.lin  # the same weights
                base = seq(*pre, b)
            out.append({"kind": kind, "name": f"{kind}_{'x'.join(map(str, shape))}{'_twice' if twice else ''}",
                        "model": model, "base": base, "holdout": i == len(shapes) - 1,
                        "x": torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))})
    return out


def kind_features(g: dict, workdir: Path) -> dict[str, float]:
    """The cost model's features of the graph's ``kind`` layers, added up (the graph exported to ``workdir``)."""
    path = workdir / f"{g['name']}.onnx"
    snl_fx.export_onnx(g["model"], g["x"], path, profile="pi")
    total: dict[str, float] = {}
    for _, k, _, _, feats in layer_features(snl_fx.relu_count(path)):
        if k == g["kind"]:
            for f, v in feats.items():
                total[f] = total.get(f, 0) + v
    return total


def _without_refills(r, reports: list[dict]):
    """CHEETAH: the runner's figures of the last inference with its silent-OT refills taken out
    (a refill: REFILL_BYTES in REFILL_ACTIONS one-way messages, inside whichever segment ran out),
    as ``benchmarks/pi_calibrate.py``'s ``steady`` does for totals. Returns ``r`` with bytes,
    rounds and each kind's bytes and rounds replaced."""
    import dataclasses

    server = reports[0]
    last = [party["passes"][-1] for party in reports]
    kinds = {}
    for kind, v in (r.kinds or {}).items():
        idx = [i for i, s in enumerate(server["segments"]) if s["kind"] == kind]
        nbytes, actions = 0, []
        for p in last:
            count = 0
            for i in idx:
                seg = p["segments"][i]
                n = seg["actions"] // REFILL_ACTIONS
                nbytes += seg["sent"] - n * REFILL_BYTES
                count += seg["actions"] - n * REFILL_ACTIONS
            actions.append(count)
        kinds[kind] = {**v, "bytes": nbytes, "rounds": max(actions)}
    nbytes, actions = 0, []
    for p in last:
        count = 1 if p.get("manual_sent") else 0
        for seg in p["segments"]:
            n = seg["actions"] // REFILL_ACTIONS
            nbytes += seg["sent"] - n * REFILL_BYTES
            count += seg["actions"] - n * REFILL_ACTIONS
        nbytes += p.get("manual_sent", 0)
        actions.append(count)
    return dataclasses.replace(r, bytes=nbytes, rounds=max(actions), kinds=kinds)


def bench(path: Path, backend: str, runs: int, x: torch.Tensor):
    """``snl_fx.pi_bench``; CHEETAH: at least 2 inferences, the last one, refills out (the steady state)."""
    if backend != "spu-cheetah":
        return snl_fx.pi_bench(path, runs=runs, input=x, backend=backend)
    r, reports = spu_raw(path, backend, max(runs, 2), x)
    return _without_refills(r, reports)


def measure(g: dict, backend: str, runs: int, workdir: Path) -> dict:
    """Bytes, rounds and seconds of the graph's ``kind`` layers, as the runner reports them."""
    kind, features = g["kind"], kind_features(g, workdir)
    r = bench(workdir / f"{g['name']}.onnx", backend, runs, g["x"])
    row = {"graph": g["name"], "kind": kind, "holdout": g["holdout"], "features": features, "total_bytes": r.bytes,
           "total_rounds": r.rounds, "max_abs_error": r.max_abs_error, "runner_kinds": r.kinds}
    if g["base"] is None:
        k = (r.kinds or {}).get(kind)
        if k is None:
            raise SystemExit(f"{g['name']}: the runner reports no {kind!r} segment: {sorted(r.kinds or {})}")
        row.update(bytes=k["bytes"], rounds=k["rounds"], seconds=k["seconds"])
    else:  # the difference with the same graph without the kind
        base_path = workdir / f"{g['name']}_base.onnx"
        snl_fx.export_onnx(g["base"], g["x"], base_path, profile="pi")
        b = bench(base_path, backend, runs, g["x"])
        row.update(bytes=r.bytes - b.bytes, rounds=r.rounds - b.rounds, seconds=max(r.seconds - b.seconds, 1e-6),
                   base_bytes=b.bytes, base_rounds=b.rounds)
    return row


def beaver_refills(rows: list[dict], names: list[str], prior: float = 1e6) -> float:
    """Count each row's CHEETAH Beaver-triple refills (``features["beaver_refills"]``, whole numbers) and
    return a refill's bytes: refills = round(residual / refill bytes) against a fit on ``names`` and the
    refills, from ``prior`` bytes a refill, until the counts settle."""
    size = prior
    for _ in range(10):
        base = fit([r for r in rows if r["bytes"] < size / 2] or rows, names, "bytes")
        counts = [max(0, round((r["bytes"] - sum(base[n] * r["features"].get(n, 0.0) for n in names)) / size))
                  for r in rows]
        for r, n in zip(rows, counts):
            r["features"]["beaver_refills"] = n
        new = fit([r for r in rows if not r["holdout"]], names + ["beaver_refills"], "bytes")["beaver_refills"]
        if abs(new - size) < 1.0:
            break
        size = new
    return size


def calibrate_kind(kind: str, rows: list[dict], spec: dict, round_seconds: float) -> tuple[dict, list[dict]]:
    """Coefficients of one kind's features from its fit rows, and the check of every row."""
    train = [r for r in rows if not r["holdout"]]
    names = [kind, f"{kind}_layer"] + ([f"{kind}_rows"] if kind in ROW_KINDS else [])
    depth = ["softmax_depth", "softmax_odd"] if kind == "softmax" else []
    zeros = {n: 0.0 for n in names + depth + [f"{kind}_ot_workers"]}
    refill_bytes = None
    if kind in spec.get("beaver", {}):
        names = [kind] + ([f"{kind}_rows"] if kind in ROW_KINDS else [])  # no per-layer term: refills are it
        refill_bytes = beaver_refills(rows, names)
        fitted = fit(train, names + ["beaver_refills"], "bytes")
        fitted[kind] += spec["beaver"][kind] * fitted.pop("beaver_refills") / spec["beaver_triples_per_refill"]
        nbytes = zeros | integral(fitted, tol=1e-3)
    else:
        nbytes = zeros | integral(fit(train, names, "bytes"), tol=1e-3)
    at = spec["softmax_rounds_rows"] if kind == "softmax" else None  # rows whose rounds must match
    exact = [r for r in rows if at is None or r["features"][kind] / r["features"][f"{kind}_rows"] in at]
    per = [f"{kind}_layer", *(spec["rounds_depth"] if depth else [])]
    if spec.get("rounds_fit") == "least_squares":  # CHEETAH: per layer, OT instance and element; not exact
        exact = []
        rounds = zeros | {n: round(v, 6) for n, v in
                          fit(train, [*per, f"{kind}_ot_workers", kind], "rounds").items()}
    else:
        rounds = zeros | integral(fit([r for r in exact if not r["holdout"]], per, "rounds"))
    if spec["seconds"] == "relative":  # the kind's seconds, non-negative least squares of relative errors
        seconds = fit(train, [kind, f"{kind}_layer"], "seconds", relative=True)
    else:  # compute beyond the entry's seconds per round, negative terms set to 0
        for r in rows:
            r["compute"] = r["seconds"] - round_seconds * r["rounds"]
        seconds = {n: max(v, 0.0) for n, v in fit(train, [kind, f"{kind}_layer"], "compute").items()}
        for r in rows:
            del r["compute"]
    seconds = dict.fromkeys(zeros, 0.0) | seconds
    checks = []
    for r in rows:
        f = {n: v for n, v in r["features"].items() if n != "beaver_refills"}
        pb, pr = (sum(c.get(n, 0.0) * v for n, v in f.items()) for c in (nbytes, rounds))
        ps = sum(seconds.get(n, 0.0) * v for n, v in f.items()) + (round_seconds * pr if spec["seconds"] != "relative" else 0.0)
        checks.append({"graph": r["graph"], "kind": kind, "holdout": r["holdout"], "elements": f[kind],
                       "beaver_refills": r["features"].get("beaver_refills"), "refill_bytes": refill_bytes,
                       # this inference's own refills instead of the amortised ones: the fit's error
                       "steady_bytes_error": None if refill_bytes is None else (
                           pb + refill_bytes * (r["features"]["beaver_refills"] - spec["beaver"][kind] * f[kind]
                                                / spec["beaver_triples_per_refill"]) - r["bytes"]) / r["bytes"],
                       "rows": f.get(f"{kind}_rows"), "bytes": r["bytes"], "predicted_bytes": pb,
                       "bytes_error": (pb - r["bytes"]) / r["bytes"], "rounds": r["rounds"], "predicted_rounds": pr,
                       "seconds": r["seconds"], "predicted_seconds": ps})
    wrong = [(c["graph"], c["rounds"]) for c, r in zip(checks, rows) if r in exact and c["predicted_rounds"] != c["rounds"]]
    if wrong:
        raise SystemExit(f"{kind}: rounds {rounds} miss {wrong}; the model needs another rounds feature")
    return {"bytes": nbytes, "rounds": rounds, "seconds": seconds}, checks


def vit_check(backend: str, runs: int, workdir: Path, softmax_broadcast: bool = False) -> dict:
    """The zoo ViT (``vit_tiny_fm``, random weights, seed 0) predicted by ``pi_cost`` against ``pi_bench``:
    totals and each kind (the runner's per-kind segments; linear: the rest, output and input included)."""
    from snl_fx.app.models import vit_tiny_fm
    from snl_fx.cost.tables import load_constants

    load_constants.cache_clear()  # the coefficients just written
    torch.manual_seed(0)
    model, x = vit_tiny_fm().eval(), torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    path = workdir / "vit_tiny_fm.onnx"
    snl_fx.export_onnx(model, x, path, profile="pi")
    cost = snl_fx.pi_cost(path, protocol=backend, softmax_broadcast=softmax_broadcast)
    r = bench(path, backend, runs, x)  # CHEETAH: the steady state, as priced (the option: the environment's, above)
    predicted = cost.by_kind()
    measured = {k: {"bytes": v["bytes"], "rounds": v["rounds"]} for k, v in (r.kinds or {}).items()}
    rest = {"bytes": r.bytes - sum(v["bytes"] for v in measured.values()),
            "rounds": r.rounds - sum(v["rounds"] for v in measured.values())}
    rest_kinds = [k for k in predicted if k not in measured]
    rows = {k: {"measured": measured[k], "predicted": {"bytes": predicted[k]["bytes"], "rounds": predicted[k]["rounds"]}}
            for k in measured if k in predicted}
    rows["+".join(rest_kinds)] = {"measured": rest, "predicted": {
        "bytes": sum(predicted[k]["bytes"] or 0 for k in rest_kinds),
        "rounds": sum(predicted[k]["rounds"] or 0 for k in rest_kinds)}}
    rows["total"] = {"measured": {"bytes": r.bytes, "rounds": r.rounds},
                     "predicted": {"bytes": cost.bytes, "rounds": cost.rounds}}
    for k, v in rows.items():
        m, p = v["measured"], v["predicted"]
        v["bytes_error"] = (p["bytes"] - m["bytes"]) / m["bytes"] if m["bytes"] else None
        print(f"vit_tiny_fm {k:22s} bytes {m['bytes']:>12,} predicted {p['bytes']:>14,.1f} "
              f"({v['bytes_error']:+.3%})  rounds {m['rounds']} / {p['rounds']}", flush=True)
    print(f"vit_tiny_fm complete: {cost.complete} {cost.lower_bound()}; max_abs_error {r.max_abs_error:.2e}")
    return {"complete": cost.complete, "lower_bound": cost.lower_bound(), "max_abs_error": r.max_abs_error,
            "seconds": r.seconds, "predicted_compute_seconds": cost.compute_seconds, "kinds": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, choices=list(BACKENDS),
                        help="spu-cheetah: SEMI2K's graphs at more sizes, rounds by least squares, Beaver "
                             "refills amortised (see CHEETAH)")
    parser.add_argument("--kinds", nargs="+", help="these kinds only (default: all the backend's)")
    parser.add_argument("--runs", type=int, help="inferences per graph (default: SPU 2, CrypTen 3)")
    parser.add_argument("--write", action="store_true", help="add the coefficients to the backend's entry of --out")
    parser.add_argument("--out", default=str(CONSTANTS_PATH), help="the constants file")
    parser.add_argument("--results", help="where the per-graph measurements go (default: "
                        "benchmarks/results/pi_calibrate_kinds_<backend>.json)")
    parser.add_argument("--from-results", metavar="FILE", help="refit the rows of an earlier run's results, run nothing")
    parser.add_argument("--from-log", metavar="FILE", help="reuse the rows printed by an earlier run; run the rest")
    parser.add_argument("--vit", action="store_true", help="then check the zoo ViT, predicted against measured")
    parser.add_argument("--softmax-broadcast", action="store_true",
                        help="SPU: run with SPU's softmax denominator option (softmax only) and write its coefficients "
                             "under the entry's softmax_broadcast; without it the option is off")
    args = parser.parse_args()
    spec = BACKENDS[args.backend]
    if args.softmax_broadcast and (args.backend == "crypten" or set(args.kinds or []) != {"softmax"}):
        raise SystemExit("--softmax-broadcast: an SPU backend and --kinds softmax")
    # explicit either way: the runs' default is the option on (snl_fx.cost.tables.SOFTMAX_BROADCAST)
    os.environ["SNL_FX_SPU_OPTIMIZE_DENOMINATOR"] = "1" if args.softmax_broadcast else "0"
    kinds, runs = args.kinds or list(spec["kinds"]), args.runs or spec["runs"]
    suffix = "_softmax_broadcast" if args.softmax_broadcast else ""
    results_path = Path(args.results or args.from_results
                        or f"benchmarks/results/pi_calibrate_kinds_{args.backend}{suffix}.json")
    out = Path(args.out)
    if args.from_results:
        stored = json.loads(Path(args.from_results).read_text())["rows"]
    else:
        stored = [json.loads(line) for line in Path(args.from_log).read_text().splitlines()
                  if line.startswith('{"graph"')] if args.from_log else []
    stored = {r["graph"]: r for r in stored}
    rows = []
    with tempfile.TemporaryDirectory(prefix="pi_calibrate_kinds_") as tmp:
        for g in graphs(spec, kinds):
            if g["name"] in stored:  # the measurement stored; the features again (the model's current ones)
                rows.append({**stored[g["name"]], "holdout": g["holdout"], "features": kind_features(g, Path(tmp))})
            elif args.from_results:
                raise SystemExit(f"{args.from_results} has no row {g['name']!r}")
            else:
                rows.append(measure(g, args.backend, runs, Path(tmp)))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "runner_kinds"}), flush=True)
    constants = json.loads(out.read_text())
    round_seconds = constants["protocols"][args.backend]["seconds"].get("round", 0.0)
    checks, fitted = [], {}
    for kind in kinds:
        fitted[kind], kind_checks = calibrate_kind(kind, [r for r in rows if r["kind"] == kind], spec, round_seconds)
        checks += kind_checks
    held = [c for c in checks if c["holdout"]]
    steady = [c for c in checks if c.get("steady_bytes_error") is not None]
    summary = {"max_bytes_rel_error": max(abs(c["bytes_error"]) for c in checks),
               "max_holdout_bytes_rel_error": max(abs(c["bytes_error"]) for c in held),
               "max_rounds_error": max(abs(round(c["predicted_rounds"]) - c["rounds"]) for c in checks),
               "max_holdout_rounds_error": max(abs(round(c["predicted_rounds"]) - c["rounds"]) for c in held)}
    if steady:  # Beaver kinds: the fit with each graph's own refills, and a refill's bytes
        summary["max_steady_bytes_rel_error"] = max(abs(c["steady_bytes_error"]) for c in steady)
        summary["beaver_refill_bytes"] = {c["kind"]: c["refill_bytes"] for c in steady}
    for c in checks:
        print(f"{c['graph']:20s} {'held out' if c['holdout'] else 'fit':8s} bytes {c['bytes']:>10,.0f} predicted "
              f"{c['predicted_bytes']:>12,.1f} ({c['bytes_error']:+.3%})  rounds {c['rounds']} / {c['predicted_rounds']:g}"
              f"  s {c['seconds']:.4f} / {c['predicted_seconds']:.4f}"
              + ("" if c.get("steady_bytes_error") is None else
                 f"  [{c['beaver_refills']} Beaver refill(s) measured; with them {c['steady_bytes_error']:+.3%}]"))
    print(json.dumps(summary))
    print(json.dumps(fitted, indent=1))
    if not args.from_results:  # what was measured (or logged), with its checks
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps({"backend": args.backend, "rows": rows, "checks": checks,
                                            "summary": summary}, indent=2) + "\n")
    if args.write and args.softmax_broadcast:  # an overlay of the softmax coefficients (tables.cost_table)
        constants = json.loads(out.read_text())  # again: other scripts write other entries of the file
        constants["protocols"][args.backend]["softmax_broadcast"] = {
            **{part: fitted["softmax"][part] for part in ("bytes", "rounds", "seconds")},
            "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
            "check": {c["graph"]: {"bytes_error": c["bytes_error"], "rounds": c["rounds"],
                                   "predicted_rounds": c["predicted_rounds"], "holdout": c["holdout"]} for c in checks},
            "summary": summary,
        }
        out.write_text(json.dumps(constants, indent=2) + "\n")
    if args.write and not args.softmax_broadcast:
        constants = json.loads(out.read_text())  # again: other scripts write other entries of the file
        entry = constants["protocols"][args.backend]
        for coef in fitted.values():  # this script's keys only: <kind>, <kind>_layer, <kind>_rows, softmax_*
            for part in ("bytes", "rounds", "seconds"):
                entry[part].update(coef[part])
        old = entry.get("kinds", {})
        entry["kinds"] = {
            "backend": args.backend,
            "date": datetime.date.today().isoformat(),
            # a refit keeps the command that measured (--from-results: the same rows, stored)
            "command": old["command"] if args.from_results and old.get("command") else "python " + " ".join(sys.argv),
            "source": SOURCES[args.backend] + spec["source"],
            "kinds": sorted(set(old.get("kinds", [])) | set(kinds)),
            "check": {**{k: v for k, v in old.get("check", {}).items() if isinstance(v, dict)},  # other kinds'
                      **{k: {c["graph"]: {"bytes_error": c["bytes_error"], "holdout": c["holdout"]}
                            for c in checks if c["kind"] == k} for k in kinds}},
            "summary": summary,
            "note": spec["note"],
        }
        out.write_text(json.dumps(constants, indent=2) + "\n")
    if args.vit:
        with tempfile.TemporaryDirectory(prefix="pi_calibrate_kinds_vit_") as tmp:
            vit = vit_check(args.backend, runs, Path(tmp), args.softmax_broadcast)
        stored = json.loads(results_path.read_text())
        results_path.write_text(json.dumps({**stored, "vit_tiny_fm": vit}, indent=2) + "\n")


if __name__ == "__main__":
    main()
