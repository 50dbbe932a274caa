"""relu-count speed on torchvision ResNet-50 at 224x224: a torch spec and an ONNX file.

What is timed ("the work beyond imports"): the ``relu_count`` call itself, in-process, after
``import torch, torchvision, snl_fx`` and after the model is built (the ONNX file is exported
beforehand). Its first call in a fresh process (what one ``relu-count`` command pays) is shown
apart from the median of the later calls. Model build, imports and the whole ``relu-count``
command as a subprocess (start-up and imports included) are reported for context. With the
cost model: ``snl_fx.pi_cost(FILE, protocol=P)`` timed the same way for each protocol (target:
under 1 s; spu-cheetah also chooses SPU's ciphertext blocks for each of the 54 linear layers), and
the ``relu-count FILE --protocol P`` command.

    python benchmarks/relu_count_speed.py [--runs 5] [--no-cli] [--protocol spu-cheetah ...]
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402 - imports are timed
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402

import snl_fx  # noqa: E402

T_IMPORTS = time.perf_counter() - T_START
SHAPE = (1, 3, 224, 224)


def resnet50_relus(side: int = 224) -> int:
    """ReLUs per sample of torchvision's ResNet-50: stem, then 3 per bottleneck (stride in conv2)."""
    total = 64 * (side // 2) ** 2
    s = side // 4
    for i, blocks in enumerate((3, 4, 6, 3)):
        width, out = 64 * 2**i, s if i == 0 else s // 2
        total += width * s * s + 5 * width * out * out  # first block: conv1 before the stride
        total += (blocks - 1) * 6 * width * out * out
        s = out
    return total


def timed(fn: Callable[[], object], runs: int) -> tuple[tuple[float, float], tuple[float, float], object]:
    """(first call, median of ``runs`` later calls, last result); times are (wall, CPU) seconds.

    CPU time (this process, all threads) is the figure that other jobs on a shared machine
    disturb least; on an idle machine wall time is close to it.
    """

    def once() -> tuple[float, float, object]:
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        return time.perf_counter() - wall, time.process_time() - cpu, result

    first_wall, first_cpu, result = once()
    later = [once() for _ in range(runs)]
    median = (statistics.median(t[0] for t in later), statistics.median(t[1] for t in later))
    return (first_wall, first_cpu), median, later[-1][2] if later else result


def cli_seconds(argv: list[str], runs: int) -> float:
    """Median wall time of the ``relu-count`` console script as a fresh process."""
    script = Path(sys.executable).parent / "relu-count"
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([str(script), *argv, "--json"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed calls after the first (median reported)")
    parser.add_argument("--no-cli", action="store_true", help="skip the whole-command subprocess timings")
    parser.add_argument("--protocol", action="append",
                        help="protocol of a timed pi_cost call (repeatable; default: the three calibrated ones and delphi)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    load = os.getloadavg()[0]

    build_first, build_median, model = timed(lambda: torchvision.models.resnet50(weights=None).eval(), args.runs)
    x = torch.randn(*SHAPE)
    *torch_times, report = timed(lambda: snl_fx.relu_count(model, x), args.runs)
    assert report.total == resnet50_relus(), report.total

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "resnet50.onnx")
        start = time.perf_counter()
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"])
        export_s = time.perf_counter() - start
        *onnx_times, onnx_report = timed(lambda: snl_fx.relu_count(path), args.runs)
        assert onnx_report.total == resnet50_relus(), onnx_report.total
        costs = {p: timed(lambda p=p: snl_fx.pi_cost(path, protocol=p), args.runs)
                 for p in args.protocol or ["crypten", "spu-semi2k", "spu-cheetah", "delphi"]}
        size_mb = os.path.getsize(path) / 1e6
        if not args.no_cli:
            cli_onnx = cli_seconds([path], 3)
            cli_cost = {p: cli_seconds([path, "--protocol", p], 3) for p in costs}
    if not args.no_cli:
        cli_torch = cli_seconds(["torchvision:resnet50", "--input-shape", ",".join(map(str, SHAPE))], 3)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"ResNet-50 at {'x'.join(map(str, SHAPE))}: {report.total:,} ReLUs per sample in both paths")
    print(f"timed: the relu_count() call after imports and model build (the ONNX file exported before); "
          f"first call in the process, then the median of {args.runs} more; wall / CPU seconds")
    print(f"{'':36s}{'first call':>18s}{'median':>18s}")
    rows = [("relu_count(torch model)", torch_times, ""),
            ("relu_count(ONNX file)", onnx_times, f"  ({size_mb:.0f} MB, opset 17)")]
    rows += [(f"pi_cost(ONNX, {p})", (first, median),
              f"  ({cost.bytes / 1e6:,.0f} MB, {cost.rounds} rounds, {len(cost.layers)} layers)")
             for p, (first, median, cost) in costs.items()]
    for label, (first, median), extra in rows:
        print(f"{label:36s}{first[0]:8.3f} / {first[1]:.3f}{median[0]:9.3f} / {median[1]:.3f}{extra}")
    print("context (not part of the target):")
    print(f"  imports (torch, torchvision, snl_fx)  {T_IMPORTS:.3f} s")
    print(f"  resnet50(weights=None) build          {build_first[0]:.3f} s first, {build_median[0]:.3f} s median (wall)")
    print(f"  torch.onnx.export (dynamo=False)      {export_s:.3f} s")
    if not args.no_cli:
        print(f"  whole command, torch spec             {cli_torch:.3f} s (median of 3: start-up, imports, build, count)")
        print(f"  whole command, ONNX file              {cli_onnx:.3f} s (median of 3: start-up, imports, count)")
        for p, seconds in cli_cost.items():
            print(f"  whole command, ONNX --protocol {p:12s} {seconds:.3f} s (median of 3: start-up, imports, count, price)")


if __name__ == "__main__":
    main()
