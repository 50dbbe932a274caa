"""Calibrate the PI cost model's other nonlinearities (issue 18): GELU, SiLU, sigmoid, tanh, softmax,
LayerNorm, exp, division by a secret, secret x secret products, per SPU protocol.

Each kind runs on tiny torch graphs (a linear layer, then the kind), exported with
``export_onnx(..., profile="pi")`` and run with ``snl_fx.pi_bench``. The SPU runner runs every
nonlinear node as an executable of its own, so a kind's bytes, rounds and seconds are read from
``PiBenchResult.kinds``; the kinds it does not segment are the difference with the same graph
without the kind (``mul``: a secret x secret product, run inside a linear segment; ``silu``: SPU's
sigmoid segment plus that product). Its features are the cost model's own (``layer_features`` of
``snl_fx.relu_count(path)``: ``<kind>`` elements, ``<kind>_layer``, ``<kind>_rows`` for softmax
and LayerNorm, ``softmax_depth`` = ceil(log2(row)) and ``softmax_odd``). Bytes are fitted by least squares over them
(integers kept where they come out integral), rounds per layer (softmax: and per level of its row
maximum's comparison tree) as integers that must match every graph, seconds by
non-negative least squares of relative errors. One graph per kind is held out of the fit and
checked. The coefficients are added to the protocol's entry of ``snl_fx/cost/pi_constants.json``
(the existing ones are kept) with backend, date and command under ``kinds`` (as the CrypTen kinds script).
Usage:

    python benchmarks/pi_calibrate_kinds.py [--backend spu-semi2k] [--kinds gelu softmax ...] [--runs 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pi_calibrate import SOURCES, fit, integral, seq  # the ReLU calibration's helpers

import snl_fx
from snl_fx.cost.calibration import CONSTANTS_PATH, layer_features


class Pair(nn.Module):
    """A linear layer to 2 x ``d`` features, split in two activations a, b, then ``f(a, b)``."""

    def __init__(self, d: int, f) -> None:
        super().__init__()
        self.lin, self.f, self.d = nn.Linear(d, 2 * d), f, d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return self.f(y[..., :self.d], y[..., self.d:])


def _first(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a


ELEMENTWISE = {  # kind -> (module on the last dim d, the same graph without the kind)
    "gelu": (lambda d: nn.GELU(), None),
    "gelu_tanh": (lambda d: nn.GELU("tanh"), None),
    "silu": (lambda d: nn.SiLU(), lambda d: nn.Identity()),
    "sigmoid": (lambda d: nn.Sigmoid(), None),
    "tanh": (lambda d: nn.Tanh(), None),
    "exp": (lambda d: Pair(d, lambda a, b: torch.exp(a)), lambda d: Pair(d, _first)),
    "div": (lambda d: Pair(d, lambda a, b: a / (b * b + 1)), None),  # b*b: a mul layer, priced apart
    "mul": (lambda d: Pair(d, lambda a, b: a * b), lambda d: Pair(d, _first)),
}
ROWS = {"softmax": lambda d: nn.Softmax(dim=-1), "layernorm": lambda d: nn.LayerNorm(d)}
# (tokens, d): elements = tokens x d; the last one of each list is held out of the fit
ELEMENT_SHAPES = [(8, 16), (32, 64), (12, 64)]
ROW_SHAPES = [(8, 16), (4, 64), (16, 64), (2, 197), (3, 24)]  # softmax / LayerNorm rows of 16-197


def graphs(kinds: list[str]) -> list[dict]:
    """One dict per graph: kind, name, model, base (the graph without the kind, or None), x, holdout."""
    out = []
    for kind in kinds:
        shapes = ROW_SHAPES if kind in ROWS else ELEMENT_SHAPES
        for i, (n, d) in enumerate(shapes):
            torch.manual_seed(i)
            pre = nn.Linear(d, d) if kind in ROWS or not isinstance(ELEMENTWISE[kind][0](d), Pair) else None
            make, make_base = (ROWS[kind], None) if kind in ROWS else ELEMENTWISE[kind]
            body = make(d)
            model = seq(pre, body) if pre is not None else seq(body)
            base = None
            if make_base is not None:
                b = make_base(d)
                if isinstance(b, Pair):
                    b.lin = body.lin  # the same weights
                base = seq(pre, b) if pre is not None else seq(b)
            x = torch.randn((1, n, d), generator=torch.Generator().manual_seed(0))
            out.append({"kind": kind, "name": f"{kind}_{n}x{d}", "model": model, "base": base, "x": x,
                        "holdout": i == len(shapes) - 1})
    return out


def kind_features(path: Path, kind: str) -> dict[str, float]:
    """The cost model's features of the ``kind`` layers of an ONNX file, added up."""
    total: dict[str, float] = {}
    for _, k, _, _, feats in layer_features(snl_fx.relu_count(path)):
        if k == kind:
            for f, v in feats.items():
                total[f] = total.get(f, 0) + v
    return total


def measure(g: dict, backend: str, runs: int, workdir: Path) -> dict:
    """Bytes, rounds and seconds of the graph's ``kind`` layers, as the runner reports them."""
    kind, path = g["kind"], workdir / f"{g['name']}.onnx"
    snl_fx.export_onnx(g["model"], g["x"], path, profile="pi")
    r = snl_fx.pi_bench(path, runs=runs, input=g["x"], backend=backend)
    row = {"graph": g["name"], "kind": kind, "holdout": g["holdout"], "features": kind_features(path, kind),
           "total_bytes": r.bytes, "total_rounds": r.rounds, "max_abs_error": r.max_abs_error,
           "runner_kinds": r.kinds}
    if g["base"] is None:
        k = (r.kinds or {}).get(kind)
        if k is None:
            raise SystemExit(f"{g['name']}: the runner reports no {kind!r} segment: {sorted(r.kinds or {})}")
        row.update(bytes=k["bytes"], rounds=k["rounds"], seconds=k["seconds"])
    else:  # the difference with the same graph without the kind
        base_path = workdir / f"{g['name']}_base.onnx"
        snl_fx.export_onnx(g["base"], g["x"], base_path, profile="pi")
        b = snl_fx.pi_bench(base_path, runs=runs, input=g["x"], backend=backend)
        row.update(bytes=r.bytes - b.bytes, rounds=r.rounds - b.rounds, seconds=max(r.seconds - b.seconds, 1e-6),
                   base_bytes=b.bytes, base_rounds=b.rounds)
    return row


def calibrate_kind(kind: str, rows: list[dict]) -> dict:
    """Coefficients of one kind's features from its fit rows; rounds: per layer, the same on every graph."""
    fit_rows = [r for r in rows if not r["holdout"]]
    names = [kind, f"{kind}_layer"] + ([f"{kind}_rows"] if kind in ROWS else [])
    depth = [f for f in ("softmax_depth", "softmax_odd") if kind == "softmax"]  # its row maximum's tree levels
    for r in rows:
        r["features"] = {n: r["features"].get(n, 0.0) for n in names + depth}
    nbytes = integral(fit(fit_rows, names, "bytes"), tol=1e-3) | {n: 0.0 for n in depth}
    per = [f"{kind}_layer", *depth]  # rounds: per layer (and per comparison-tree level), integers
    rounds = {n: 0.0 for n in names + depth} | {k: float(round(v)) for k, v in fit(fit_rows, per, "rounds").items()}
    wrong = [(r["graph"], r["rounds"]) for r in rows if sum(rounds[n] * v for n, v in r["features"].items()) != r["rounds"]]
    if wrong:
        raise SystemExit(f"{kind}: rounds {rounds} miss {wrong}; the model needs another rounds feature")
    seconds = {n: 0.0 for n in names + depth} | fit(fit_rows, names[:2], "seconds", relative=True)
    return {"bytes": nbytes, "rounds": rounds, "seconds": seconds}


def check(kind: str, coef: dict, rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        f = r["features"]
        pb = sum(coef["bytes"][n] * v for n, v in f.items())
        pr = sum(coef["rounds"][n] * v for n, v in f.items())
        ps = sum(coef["seconds"].get(n, 0.0) * v for n, v in f.items())
        out.append({"graph": r["graph"], "kind": kind, "holdout": r["holdout"], "elements": f[kind],
                    "rows": f.get(f"{kind}_rows"), "bytes": r["bytes"], "predicted_bytes": pb,
                    "bytes_error": (pb - r["bytes"]) / r["bytes"], "rounds": r["rounds"], "predicted_rounds": pr,
                    "seconds": r["seconds"], "predicted_seconds": ps})
    return out


def vit_check(backend: str, runs: int, workdir: Path) -> dict:
    """The zoo ViT (``vit_tiny_fm``, random weights, seed 0) predicted by ``pi_cost`` against ``pi_bench``:
    totals and each kind (the runner's per-kind segments; linear: the rest, output and input included)."""
    from snl_fx.app.models import vit_tiny_fm
    from snl_fx.cost.tables import load_constants

    load_constants.cache_clear()  # the coefficients just written
    torch.manual_seed(0)
    model, x = vit_tiny_fm().eval(), torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    path = workdir / "vit_tiny_fm.onnx"
    snl_fx.export_onnx(model, x, path, profile="pi")
    cost = snl_fx.pi_cost(path, protocol=backend)
    r = snl_fx.pi_bench(path, runs=runs, input=x, backend=backend)
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
    parser.add_argument("--backend", default="spu-semi2k", choices=["spu-semi2k", "spu-cheetah"])
    parser.add_argument("--kinds", nargs="+", default=[*ELEMENTWISE, *ROWS])
    parser.add_argument("--runs", type=int, default=2, help="inferences per graph (pi_bench's steady state)")
    parser.add_argument("--out", default=str(CONSTANTS_PATH), help="the constants file (kind coefficients merged)")
    parser.add_argument("--results", default=None, help="per-graph measurements (default: "
                        "benchmarks/results/pi_calibrate_kinds_<backend>.json)")
    parser.add_argument("--from-results", action="store_true", help="refit from --results without running SPU")
    parser.add_argument("--vit", action="store_true", help="then check the zoo ViT, predicted against measured")
    args = parser.parse_args()
    results_path = Path(args.results or f"benchmarks/results/pi_calibrate_kinds_{args.backend}.json")
    out = Path(args.out)
    if args.from_results:  # the measurements stored; the features again from the graphs (the model's current ones)
        stored = {r["graph"]: r for r in json.loads(results_path.read_text())["rows"]}
        rows = []
        with tempfile.TemporaryDirectory(prefix="pi_calibrate_kinds_") as tmp:
            for g in graphs(args.kinds):
                path = Path(tmp) / f"{g['name']}.onnx"
                snl_fx.export_onnx(g["model"], g["x"], path, profile="pi")
                rows.append({**stored[g["name"]], "features": kind_features(path, g["kind"])})
    else:
        rows = []
        with tempfile.TemporaryDirectory(prefix="pi_calibrate_kinds_") as tmp:
            for g in graphs(args.kinds):
                row = measure(g, args.backend, args.runs, Path(tmp))
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "runner_kinds"}), flush=True)
    if not args.from_results:  # kept before fitting: --from-results refits from them
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps({"backend": args.backend, "rows": rows}, indent=2) + "\n")
    checks, fitted = [], {}
    for kind in args.kinds:
        kind_rows = [r for r in rows if r["kind"] == kind]
        coef = calibrate_kind(kind, kind_rows)
        fitted[kind] = coef
        checks += check(kind, coef, kind_rows)
    held = [c for c in checks if c["holdout"]]
    summary = {"max_bytes_rel_error": max(abs(c["bytes_error"]) for c in checks),
               "max_holdout_bytes_rel_error": max(abs(c["bytes_error"]) for c in held) if held else None,
               "rounds_exact": all(c["rounds"] == c["predicted_rounds"] for c in checks)}
    constants = json.loads(out.read_text())  # again: other scripts write other entries of the file
    entry = constants["protocols"][args.backend]
    for coef in fitted.values():  # this script's keys only: <kind>, <kind>_layer, <kind>_rows, softmax_depth/odd
        for part in ("bytes", "rounds", "seconds"):
            entry[part].update(coef[part])
    old = entry.get("kinds", {})
    entry["kinds"] = {
        "backend": args.backend,
        "date": datetime.date.today().isoformat(),
        # a refit keeps the command that measured (--from-results: the same rows, stored)
        "command": old["command"] if args.from_results and old.get("command") else "python " + " ".join(sys.argv),
        "source": SOURCES[args.backend] + "; per-kind segments of the SPU runner (PiBenchResult.kinds)",
        "kinds": sorted(set(old.get("kinds", [])) | set(args.kinds)),
        "check": {**old.get("check", {}), **{k: {c["graph"]: {"bytes_error": c["bytes_error"], "holdout": c["holdout"]}
                                               for c in checks if c["kind"] == k} for k in args.kinds}},
        "summary": summary,
        "note": ("bytes: least squares over <kind> elements, <kind>_layer (and <kind>_rows for softmax / layernorm) "
                 "on the fit graphs; rounds: per layer, equal on every graph; mul and silu: the difference with "
                 "the graph without them (SPU runs a secret product inside a linear segment; SiLU = sigmoid + mul)"),
    }
    out.write_text(json.dumps(constants, indent=2) + "\n")
    stored = json.loads(results_path.read_text())
    results_path.write_text(json.dumps({**stored, "checks": checks}, indent=2) + "\n")
    for c in checks:
        print(f"{c['graph']:18s} {'held out' if c['holdout'] else 'fit':8s} bytes {c['bytes']:>10,.0f} predicted "
              f"{c['predicted_bytes']:>12,.1f} ({c['bytes_error']:+.3%})  rounds {c['rounds']} / {c['predicted_rounds']:.0f}"
              f"  s {c['seconds']:.4f} / {c['predicted_seconds']:.4f}")
    print(json.dumps(summary))
    print(json.dumps(fitted, indent=1))
    if args.vit:
        with tempfile.TemporaryDirectory(prefix="pi_calibrate_kinds_vit_") as tmp:
            vit = vit_check(args.backend, args.runs, Path(tmp))
        stored = json.loads(results_path.read_text())
        results_path.write_text(json.dumps({**stored, "checks": checks, "vit_tiny_fm": vit}, indent=2) + "\n")


if __name__ == "__main__":
    main()
