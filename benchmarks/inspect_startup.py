"""Start-up of the ONNX inspector: a fresh ``relu-count FILE.onnx`` against a bare ``import onnx``.

Each pair runs ``python -c "import onnx"`` and then the ``relu-count`` console script of this
venv on the file, each as a fresh process; wall time (``time.perf_counter`` around the process)
and peak RSS (``ru_maxrss`` of that child, from ``os.wait4``). Medians over the pairs. The file
is the demo's model: ``small_resnet`` (Fashion-MNIST, 1x28x28) exported with
``snl_fx.export_onnx`` (default profile), unless ``--file`` names another. Target (issue 16):
relu-count at most 1.5x the wall time of ``import onnx`` and at most 150 MB peak.

    python benchmarks/inspect_startup.py [--runs 5] [--file model.onnx] [--json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO, TARGET_MB = 1.5, 150.0


def run_once(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one fresh process; its output is thrown away."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {err.strip()[:500]}")
    return wall, usage.ru_maxrss / 1024  # Linux: kilobytes


def demo_file(folder: str) -> str:
    """small_resnet for Fashion-MNIST, exported as the demo's ONNX file is (default profile).

    Exported in a child process: this process stays small, so that the children's peak RSS
    (which on Linux starts from the parent's at fork) is their own.
    """
    path = os.path.join(folder, "small_resnet.onnx")
    code = ("import torch, snl_fx\nfrom snl_fx.app.models import small_resnet\ntorch.manual_seed(0)\n"
            f"snl_fx.export_onnx(small_resnet().eval(), torch.randn(1, 1, 28, 28), {path!r})")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="paired runs (medians reported)")
    parser.add_argument("--file", help="an ONNX file (default: small_resnet exported to a temporary folder)")
    parser.add_argument("--json", action="store_true", help="time `relu-count FILE --json` instead of the table")
    args = parser.parse_args()
    script = Path(sys.executable).parent / "relu-count"
    if not script.exists():
        raise SystemExit(f"{script} not found: install the package (pip install -e .)")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or demo_file(tmp)
        onnx_cmd = [sys.executable, "-c", "import onnx"]
        count_cmd = [str(script), path, *(["--json"] if args.json else [])]
        run_once(onnx_cmd), run_once(count_cmd)  # warm the page cache; not counted
        pairs = [(run_once(onnx_cmd), run_once(count_cmd)) for _ in range(args.runs)]
    base_s = statistics.median(p[0][0] for p in pairs)
    base_mb = statistics.median(p[0][1] for p in pairs)
    count_s = statistics.median(p[1][0] for p in pairs)
    count_mb = statistics.median(p[1][1] for p in pairs)
    ratio = statistics.median(p[1][0] / p[0][0] for p in pairs)
    print(f"file: {path if args.file else 'small_resnet (1x28x28), export_onnx default profile'}; "
          f"{args.runs} paired runs, medians; load average {os.getloadavg()[0]:.1f}")
    print(f"  python -c 'import onnx'       {base_s:6.3f} s  {base_mb:6.1f} MB peak RSS")
    print(f"  {' '.join(['relu-count', 'FILE', *count_cmd[2:]]):28s}  {count_s:6.3f} s  {count_mb:6.1f} MB peak RSS")
    print(f"  ratio (median of the pairs' ratios) {ratio:.2f}x; target <= {TARGET_RATIO}x and <= {TARGET_MB:.0f} MB: "
          f"{'met' if ratio <= TARGET_RATIO and count_mb <= TARGET_MB else 'NOT met'}")


if __name__ == "__main__":
    main()
