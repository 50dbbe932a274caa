"""Training-step time vs torch threads, alone and beside a busy process (issue 11, item 7).

One training step = forward, backward and SGD step of ``small_resnet`` on a batch of 128
Fashion-MNIST-sized inputs. For each thread count (torch's default, one per core, and the
CLI's default, cores - 1) the median step time is measured twice: with the machine as it is
("alone") and beside one extra process spinning on a core at nice 19 ("busy"). Each measurement
runs in a fresh process. Usage:

    python benchmarks/threads.py [--steps 10] [--json runs/threads.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SPIN = "while True: pass"


def _step_times(threads: int, steps: int) -> list[float]:
    import torch
    import torch.nn.functional as F

    from snl_fx.app.models import small_resnet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = small_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    times = []
    for i in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return times


def _measure(threads: int, steps: int, busy: bool) -> float:
    spinner = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", SPIN]) if busy else None
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(threads), "--steps", str(steps)],
            capture_output=True, text=True, check=True, env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
        ).stdout
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return statistics.median(json.loads(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default="runs/threads.json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_step_times(args.child, args.steps)))
        return
    cores = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()
    rows = []
    for threads in sorted({cores, max(1, cores - 1)}, reverse=True):
        for busy in (False, True):
            seconds = _measure(threads, args.steps, busy)
            rows.append({"threads": threads, "busy": busy, "median_step_s": seconds})
            print(f"threads {threads}  {'beside a busy process' if busy else 'alone                '}  "
                  f"{seconds:.3f} s per step (median of {args.steps})", flush=True)
    result = {"cores": cores, "load_before": load_before, "load_after": os.getloadavg(), "rows": rows}
    print(f"cores {cores}, load average before {load_before[0]:.2f}, after {result['load_after'][0]:.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
