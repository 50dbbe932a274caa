"""Overheads of the SNL pass, as ratios (robust on a shared machine).

1. Gate-phase training step on the small ResNet vs a plain training step with the same KD loss
   (target <= 1.10x): gated forward + Lasso penalty + gate clamp against the original model.
2. Lowered ONNX model latency under ONNX Runtime vs the original model's (target <= 1.10x), at
   5% of the ReLUs kept (pixel gates, so every site is a gather-form PartialReLU).

A and B are timed in alternation, so drifts of the shared machine hit both alike; each figure is
the median of ``--repeats`` rounds. Usage:

    python benchmarks/snl_speed.py [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import snl_fx
from snl_fx.models import small_resnet


def _median_ratio(a: Callable[[], None], b: Callable[[], None], repeats: int, inner: int) -> tuple[float, float, float]:
    """(median seconds of a, of b, median of per-round ratios b/a), a and b alternated."""
    for fn in (a, b):  # warm-up
        fn()
    times_a, times_b, ratios = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            a()
        t1 = time.perf_counter()
        for _ in range(inner):
            b()
        t2 = time.perf_counter()
        times_a.append((t1 - t0) / inner)
        times_b.append((t2 - t1) / inner)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(times_a), statistics.median(times_b), statistics.median(ratios)


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
        loss = snl_fx.kd_loss(plain(x), t, y, cfg)
        opt_plain.zero_grad(set_to_none=True)
        loss.backward()
        opt_plain.step()

    def gated_step() -> None:
        with torch.no_grad():
            t = teacher(x)
        loss = snl_fx.kd_loss(gated(x), t, y, cfg) + 1e-5 * snl_fx.lasso_penalty(gated)
        opt_gated.zero_grad(set_to_none=True)
        loss.backward()
        opt_gated.step()
        snl_fx.clamp_gates(gated)

    a, b, ratio = _median_ratio(plain_step, gated_step, repeats, inner=5)
    return {"batch": batch, "plain_step_s": a, "gate_step_s": b, "ratio": ratio}


def onnx_latency(repeats: int, batch: int, keep: float) -> dict[str, float]:
    """ONNX Runtime latency of the original vs the lowered model (one-shot selection at ``keep``)."""
    torch.manual_seed(0)
    model = small_resnet().eval()
    x = torch.randn(32, 1, 28, 28)
    result = snl_fx.linearize(model, x, keep)
    feed = np.random.default_rng(0).standard_normal((batch, 1, 28, 28), dtype=np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in (("original", model), ("lowered", result.model)):
            path = Path(tmp) / f"{name}.onnx"
            snl_fx.export_onnx(m, x[:1], path)
            sessions.append(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]))
    runs = [lambda s=s: s.run(None, {s.get_inputs()[0].name: feed}) for s in sessions]
    a, b, ratio = _median_ratio(runs[0], runs[1], repeats, inner=20 if batch == 1 else 3)
    return {"batch": batch, "relus_kept": result.relu_count, "original_s": a, "lowered_s": b, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = {
        "step": [step_time(args.repeats, b) for b in (32, 128)],
        "onnx": [onnx_latency(args.repeats, b, 0.05) for b in (1, 64)],
        "threads": 1,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }
    for s in out["step"]:
        print(f"train step, batch {s['batch']:3d}: plain KD {s['plain_step_s'] * 1e3:7.1f} ms, "
              f"gate phase {s['gate_step_s'] * 1e3:7.1f} ms, ratio {s['ratio']:.3f}x")
    for o in out["onnx"]:
        print(f"ONNX Runtime, batch {o['batch']:3d}: original {o['original_s'] * 1e3:7.2f} ms, "
              f"lowered ({o['relus_kept']:,} ReLUs) {o['lowered_s'] * 1e3:7.2f} ms, ratio {o['ratio']:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
