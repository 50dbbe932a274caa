"""Overheads of the SNL pass, as ratios (robust on a shared machine).

1. Gate-phase training step on the small ResNet vs a plain training step with the same KD loss
   (target <= 1.10x): gated forward + Lasso penalty + gate clamp against the original model.
2. Lowered model latency under ONNX Runtime (and eager torch) vs the original model's (target
   <= 1.10x), at 5% of the ReLUs kept by one-shot selection: pixel gates (every site a
   PartialReLU) in the scatter form (default export) and the gather form (the ``pi`` profile's),
   channel gates, and pixel gates with only the last two sites partial (the others linear).

A and B are timed in alternation, so drifts of the shared machine hit both alike; each figure is
the median over ``--repeats`` rounds of the per-round ratio B/A. Times are CPU time of this
process (time.process_time: one thread, so waiting for a core on a loaded machine does not
count); wall-clock ratios are kept in the JSON. Usage:

    python benchmarks/snl_speed.py [--repeats 9] [--json runs/snl_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn

import snl_fx
from snl_fx import passes
from snl_fx.app.models import small_resnet


def _median_ratio(a: Callable[[], object], b: Callable[[], object], repeats: int, inner: int) -> dict[str, float]:
    """Median CPU seconds of a and of b, and median per-round ratios b/a (CPU and wall)."""
    for fn in (a, b):  # warm-up
        fn()
    cpu_a, cpu_b, cpu_ratio, wall_ratio = [], [], [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(inner):
            a()
        c1, w1 = time.process_time(), time.perf_counter()
        for _ in range(inner):
            b()
        c2, w2 = time.process_time(), time.perf_counter()
        cpu_a.append((c1 - c0) / inner)
        cpu_b.append((c2 - c1) / inner)
        cpu_ratio.append((c2 - c1) / (c1 - c0))
        wall_ratio.append((w2 - w1) / (w1 - w0))
    return {
        "a_s": statistics.median(cpu_a),
        "b_s": statistics.median(cpu_b),
        "ratio": statistics.median(cpu_ratio),
        "wall_ratio": statistics.median(wall_ratio),
    }


def step_time(repeats: int, batch: int) -> dict[str, float]:
    """Plain KD step on the original model vs gate-phase step on the gated model."""
    torch.manual_seed(0)
    cfg = snl_fx.TrainConfig()
    teacher = small_resnet().eval().requires_grad_(False)
    plain = small_resnet()
    plain.load_state_dict(teacher.state_dict())
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    gated = snl_fx.prepare(plain, x)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=1e-3)
    opt_gated = torch.optim.Adam(gated.parameters(), lr=1e-3)
    plain.train(), gated.train()

    def plain_step() -> None:
        with torch.no_grad():
            t = teacher(x)
        loss = snl_fx.train.kd_loss(plain(x), t, y, temperature=cfg.temperature, weight=cfg.kd_weight)
        opt_plain.zero_grad(set_to_none=True)
        loss.backward()
        opt_plain.step()

    def gated_step() -> None:
        with torch.no_grad():
            t = teacher(x)
        loss = snl_fx.train.kd_loss(gated(x), t, y, temperature=cfg.temperature, weight=cfg.kd_weight) + 1e-5 * snl_fx.train.lasso_penalty(gated)
        opt_gated.zero_grad(set_to_none=True)
        loss.backward()
        opt_gated.step()
        snl_fx.train.clamp_gates(gated)

    r = _median_ratio(plain_step, gated_step, repeats, inner=3)
    return {"batch": batch, "plain_step_s": r["a_s"], "gate_step_s": r["b_s"], "ratio": r["ratio"],
            "wall_ratio": r["wall_ratio"]}


def lowered_models(keep: float) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The original small ResNet and its one-shot lowered variants (name -> model)."""
    torch.manual_seed(0)
    model = small_resnet().eval()
    x = torch.randn(32, 1, 28, 28)
    budget = snl_fx.budget.resolve_budget(keep, snl_fx.relu_count(model, x[:1]).total)
    out = {}
    for granularity in ("pixel", "channel"):
        gm = snl_fx.prepare(model, x, granularity)
        snl_fx.binarize(gm, budget, snl_fx.select.linearization_scores(gm, x))
        out[granularity] = snl_fx.convert(gm).eval()
        if granularity == "pixel":
            for w in snl_fx.train.gate_parameters(gm)[:-2]:  # first four sites linear: two partial sites left
                w.data.zero_()
            out["pixel, last 2 sites partial"] = snl_fx.convert(gm).eval()
    gather = copy.deepcopy(out["pixel"])
    passes.set_form(gather, "gather")
    two = out["pixel, last 2 sites partial"]
    return model, {"pixel, scatter form": out["pixel"], "pixel, gather form": gather,
                   "channel, gather form": out["channel"], "pixel, last 2 sites partial": two}


def latency(repeats: int, batches: tuple[int, ...], keep: float) -> list[dict[str, object]]:
    """ONNX Runtime (1 thread, default optimizations) and eager torch latency, lowered vs original."""
    original, variants = lowered_models(keep)
    x = torch.randn(1, 1, 28, 28)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions, relus = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in {"original": original, **variants}.items():
            path = Path(tmp) / "model.onnx"
            relus[name] = snl_fx.export_onnx(m, x, path).relu_count
            sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    rows = []
    for batch in batches:
        feed = np.random.default_rng(0).standard_normal((batch, 1, 28, 28), dtype=np.float32)
        xt = torch.from_numpy(feed)
        inner = max(1, 64 // batch)
        base = sessions["original"]
        for name, m in variants.items():
            s = sessions[name]
            r_ort = _median_ratio(lambda: base.run(None, {"input": feed}), lambda s=s: s.run(None, {"input": feed}),
                                  repeats, inner)
            with torch.no_grad():
                r_eager = _median_ratio(lambda: original(xt), lambda m=m: m(xt), repeats, inner)
            rows.append({"batch": batch, "model": name, "relus_kept": relus[name],
                         "ort_original_s": r_ort["a_s"], "ort_lowered_s": r_ort["b_s"], "ort_ratio": r_ort["ratio"],
                         "ort_wall_ratio": r_ort["wall_ratio"], "eager_original_s": r_eager["a_s"],
                         "eager_lowered_s": r_eager["b_s"], "eager_ratio": r_eager["ratio"]})
            print(f"batch {batch:3d}  {name:28s} ({relus[name]:5,} ReLUs)  ORT {r_ort['b_s'] * 1e3:7.3f} ms vs "
                  f"{r_ort['a_s'] * 1e3:7.3f} ms: {r_ort['ratio']:.2f}x   eager {r_eager['ratio']:.2f}x", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    steps = []
    for batch in (32, 128):
        s = step_time(args.repeats, batch)
        steps.append(s)
        print(f"train step, batch {s['batch']:3d}: plain KD {s['plain_step_s'] * 1e3:7.1f} ms, gate phase "
              f"{s['gate_step_s'] * 1e3:7.1f} ms, ratio {s['ratio']:.3f}x (wall clock {s['wall_ratio']:.3f}x)",
              flush=True)
    out = {
        "step": steps,
        "latency": latency(args.repeats, (1, 8, 64), 0.05),
        "threads": 1,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
