"""The SPU backend of ``pi_bench``, main-venv side: start the two parties of ``_spu_runner.py`` in .venv-spu.

SecretFlow SPU 0.9.5 needs Python 3.10/3.11, jax 0.4.34 and numpy<2, so it lives in its own venv
(``bash scripts/setup.sh`` makes ``.venv-spu``; ``SNL_FX_SPU_PYTHON`` may name another interpreter
that has ``spu==0.9.5`` and ``onnx``). This module never imports jax or spu: it starts two
processes of that interpreter (server and client, SPU's brpc link on loopback), each reads back
its own SPU profile, and the two reports are combined here. With ``SNL_FX_SPU_REPORTS=FILE`` set,
both parties' raw reports (every inference, every executable's bytes and send actions) are also
written to FILE as JSON: ``benchmarks/pi_calibrate.py`` reads CHEETAH's silent-OT refills there.
SPU's ``enable_optimize_denominator_with_broadcast`` (softmax divides by one reciprocal per row) is
on by default (``snl_fx.cost.tables.SOFTMAX_BROADCAST``, as ``pi_cost`` prices it);
``SNL_FX_SPU_OPTIMIZE_DENOMINATOR=0`` (or ``run_spu(..., optimize_denominator=False)``) turns it off.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from snl_fx.cost.tables import SPU_PROTOCOLS
from snl_fx.errors import SnlFxError

PROTOCOLS = SPU_PROTOCOLS  # backend -> SPU ProtocolKind, from the one table (snl_fx.cost.tables)
RUNNER = Path(__file__).with_name("_spu_runner.py")
SPU_HINT = (
    "bash scripts/setup.sh creates .venv-spu (Python 3.10/3.11 with spu==0.9.5 and onnx), "
    "or set SNL_FX_SPU_PYTHON to such an interpreter"
)


def spu_python() -> str:
    """The interpreter that runs SPU: ``$SNL_FX_SPU_PYTHON``, else the repository's ``.venv-spu``; or SnlFxError."""
    given = os.environ.get("SNL_FX_SPU_PYTHON")
    path = Path(given) if given else Path(__file__).resolve().parents[2] / ".venv-spu" / "bin" / "python"
    if not (path.is_file() and os.access(path, os.X_OK)):
        where = f"SNL_FX_SPU_PYTHON={given}" if given else str(path)
        raise SnlFxError(f"the SPU backend needs SecretFlow SPU, not found at {where}: {SPU_HINT}")
    return str(path)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_spu(
    backend: str, model_path: Path, x: np.ndarray, runs: int, timeout: float, optimize_denominator: bool | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Run both parties; return the client's output and the combined measurements (see ``pi_bench``).

    ``optimize_denominator``: SPU's softmax option (see the module's doc); None: the environment's
    ``SNL_FX_SPU_OPTIMIZE_DENOMINATOR``, else ``snl_fx.cost.tables.SOFTMAX_BROADCAST`` (on).
    """
    from snl_fx.cost.tables import SOFTMAX_BROADCAST

    python = spu_python()
    if optimize_denominator is None:
        env = os.environ.get("SNL_FX_SPU_OPTIMIZE_DENOMINATOR")
        optimize_denominator = SOFTMAX_BROADCAST if env is None else env.lower() not in ("", "0", "false")
    with tempfile.TemporaryDirectory(prefix="snl_fx_spu_") as tmp:
        np.save(f"{tmp}/input.npy", x)
        ports = ",".join(map(str, _free_ports(2)))
        procs = []
        for rank in (0, 1):
            cmd = [
                python, str(RUNNER), "--rank", str(rank), "--model", str(model_path), "--protocol", PROTOCOLS[backend],
                "--input-shape", ",".join(map(str, x.shape)), "--ports", ports, "--runs", str(runs),
                "--timeout", str(timeout), "--out", f"{tmp}/result{rank}.json", "--log", f"{tmp}/party{rank}.log",
            ]
            if optimize_denominator:
                cmd.append("--optimize-denominator")
            if rank == 1:  # only the client sees the input and the output
                cmd += ["--input", f"{tmp}/input.npy", "--output", f"{tmp}/output.npy"]
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        reports = _wait(procs, tmp, timeout)
        output = np.load(f"{tmp}/output.npy")
    if os.environ.get("SNL_FX_SPU_REPORTS"):
        Path(os.environ["SNL_FX_SPU_REPORTS"]).write_text(json.dumps(reports))
    return output, combine(reports)


def _wait(procs: list[subprocess.Popen], tmp: str, timeout: float) -> list[dict[str, Any]]:
    """Wait for both parties; the first failure stops the other (it would wait for its peer forever)."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                if p.poll() not in (None, 0):
                    raise SnlFxError(_failure(rank, p.returncode, tmp))
            if time.monotonic() > deadline:
                raise SnlFxError(f"SPU parties did not finish within {timeout:.0f} s")
            time.sleep(0.05)
        for rank, p in enumerate(procs):
            if p.returncode != 0:
                raise SnlFxError(_failure(rank, p.returncode, tmp))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads(Path(f"{tmp}/result{rank}.json").read_text()) for rank in (0, 1)]


def _failure(rank: int, code: int, tmp: str) -> str:
    result = Path(f"{tmp}/result{rank}.json")
    if result.is_file():
        return f"SPU party {rank} failed: {json.loads(result.read_text()).get('error', f'exit code {code}')}"
    log = Path(f"{tmp}/party{rank}.log")
    last = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
    return f"SPU party {rank} died (exit code {code}){': ' + last[0] if last else ''}"


def combine(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Both parties' reports -> one inference's figures (bytes: both directions; rounds, seconds: slower party)."""
    server, client = reports
    segs = server["segments"]
    steady = list(zip(server["passes"][1:], client["passes"][1:]))  # pass 0 carried the set-up
    first = steady[0]
    relu = [i for i, s in enumerate(segs) if s["kind"] == "relu"]

    def seg_bytes(idx: list[int]) -> int:
        return sum(p["segments"][i]["sent"] for p in first for i in idx)

    def seg_actions(idx: list[int]) -> int:
        return max(sum(p["segments"][i]["actions"] for i in idx) for p in first)

    def seg_seconds(idx: list[int]) -> float:
        return statistics.median(max(sum(p["seg_seconds"][i] for i in idx) for p in pair) for pair in steady)

    ops: dict[str, dict[str, Any]] = {}
    for rank, party in enumerate(first):
        for seg in party["segments"]:
            for name, op in seg["ops"].items():
                o = ops.setdefault(name, {"count": 0, "bytes": 0, "seconds": [0.0, 0.0]})
                o["bytes"] += op["sent"]
                o["seconds"][rank] += op["seconds"]
                o["count"] += op["count"] if rank == 0 else 0
    kinds: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(s["kind"] for s in segs if s["kind"] != "linear"):
        idx = [i for i, s in enumerate(segs) if s["kind"] == kind]
        kinds[kind] = {
            "bytes": seg_bytes(idx), "rounds": seg_actions(idx), "seconds": seg_seconds(idx), "layers": len(idx),
            "elements": sum(segs[i].get("elements", segs[i]["relus"]) for i in idx),
            "rows": sum(segs[i].get("rows", segs[i]["relus"]) for i in idx),
        }
    op_table = {k: {"count": v["count"], "bytes": v["bytes"], "seconds": max(v["seconds"])} for k, v in ops.items()}
    warm = server["passes"][0]["sent"] + client["passes"][0]["sent"]
    warm_actions = max(server["passes"][0]["actions"], client["passes"][0]["actions"])
    total = sum(p["sent"] for p in first)
    actions = max(p["actions"] for p in first)
    times = tuple(max(a["seconds"], b["seconds"]) for a, b in steady)
    return {
        "bytes": total,
        "rounds": actions,
        "times": times,
        "seconds": statistics.median(times),
        "relus": sum(segs[i]["relus"] for i in relu),
        "relu_bytes": seg_bytes(relu),
        "relu_rounds": seg_actions(relu),
        "relu_seconds": seg_seconds(relu),
        "relu_layers": sum(1 for i in relu if segs[i]["relus"] > 0),
        "comparisons": sum(s["comparisons"] for s in segs),
        "setup_bytes": warm - total,
        "setup_rounds": warm_actions - actions,
        "weight_bytes": server["weight_sent"],
        "ops": op_table,
        "kinds": kinds,
    }
