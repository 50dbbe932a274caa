"""Private inference for real: run an exported ONNX file under 2PC on this machine.

Backends: ``crypten`` (CrypTen 2PC, trusted first party) and ``spu-cheetah`` / ``spu-semi2k``
(SecretFlow SPU's CHEETAH and SEMI2K, see ``_spu``). Two processes on loopback: the server
(rank 0) holds the weights, the client (rank 1) holds the input and receives the output. CrypTen
is imported lazily: it is the optional extra ``pi`` (``bash scripts/setup.sh`` installs it); SPU
runs in its own venv, ``.venv-spu``, that the same script makes.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snl_fx.cost.tables import BACKENDS
from snl_fx.errors import SnlFxError
from snl_fx.export import import_crypten

__all__ = ["BACKENDS", "Backend", "PiBenchResult", "import_crypten", "pi_bench"]

# A backend's name: one of BACKENDS, the runners of snl_fx.cost.tables.PROTOCOLS (the one table).
Backend = str


@dataclass(frozen=True)
class PiBenchResult:
    """One ONNX file under 2PC; traffic and counts are for one inference of the file's input.

    Fields as measured under CrypTen (``backend="crypten"``) below; the SPU backends' differences
    follow the CrypTen paragraph.

    ``max_abs_error``: against ONNX Runtime on the same input; ``output_scale``: the largest
    absolute output there (CrypTen computes in 16-bit fixed point). ``bytes``: both directions
    (what each party logged, summed and halved, as CrypTen's docs say). ``rounds``: communication
    rounds of one party. ``seconds``: median wall time of one inference (encrypt the input,
    forward, reveal the output to the client), slower party. ``relus``: elements CrypTen's ReLU
    op evaluated. ``relu_bytes``, ``relu_rounds``, ``relu_seconds``: the part spent inside ReLU
    ops, measured around each ReLU call. ``comparisons``: elements through CrypTen's sign test
    (``_ltz``): ReLUs plus max-pool and other comparisons. Beaver triples come from CrypTen's
    default provider (``TFP``: the server makes them, the client's shares come from a seed the
    two share, no traffic), so the figures are online traffic; a deployment adds a dealer or an
    offline phase for the triples. ``kinds``: per nonlinear kind CrypTen runs (relu, maxpool,
    sigmoid, tanh, softmax, exp, div by a secret, mul of two secrets), measured around each of its
    modules: bytes (both directions), rounds, seconds (slower party, median), layers, elements and
    rows (softmax rows; elements otherwise). ONNX's Tanh runs as CrypTen's ``MPCTensor.tanh``.

    SPU (``spu-cheetah``, ``spu-semi2k``; ring FM64, 18 fraction bits): ``bytes`` is what both
    parties sent (SPU's link statistics per executable run, plus the client's input share and the
    server's output share); ``rounds``: send actions of the busier party (SPU counts messages;
    each takes at most one round). ``relu_bytes``, ``relu_rounds``, ``relu_seconds``: the Relu
    nodes run as executables of their own, so these are link-statistic deltas around them.
    ``setup_bytes`` / ``setup_rounds``: what the first inference sent beyond a later one (CHEETAH's
    one-time OT and HE key set-up; 0 for SEMI2K, whose Beaver triples come from a trusted first
    party as CrypTen's do). ``weight_bytes``: the server's one-time secret sharing of its weights
    (SPU 0.9.5's CHEETAH has no private inputs, so weights are shared and every conv is a
    secret x secret product). ``ops``: per SPU (pphlo) op of one inference: count, bytes sent
    by both parties, seconds of the slower party. ``kinds``: per nonlinear kind (relu, maxpool,
    gelu, softmax, layernorm, sigmoid, tanh, exp, erf, div, sqrt, pow), each node run as an
    executable of its own: bytes (both parties), rounds (send actions, busier party), seconds,
    layers, elements and rows (softmax / layernorm rows; elements otherwise).
    """

    max_abs_error: float
    output_scale: float
    bytes: int
    rounds: int
    seconds: float
    relus: int
    relu_bytes: int
    relu_rounds: int
    relu_seconds: float
    relu_layers: int
    comparisons: int
    runs: int
    times: tuple[float, ...]
    backend: Backend = "crypten"
    setup_bytes: int | None = None
    setup_rounds: int | None = None
    weight_bytes: int | None = None
    ops: dict[str, dict[str, Any]] | None = None
    kinds: dict[str, dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``max_abs_error``, ``bytes``, ``rounds``, ``seconds``, ``relus`` and more."""
        out = asdict(self)
        out["times"] = list(self.times)
        return out


# Ops CrypTen 0.4.1 loads but computes wrongly, or cannot load: refused by name, never run.
CRYPTEN_REFUSED = {
    "Erf": "its erf is an 8-term Taylor series, wrong beyond |x| of about 3 (torch's GELU exports through it)",
    "Gelu": "it has no GELU",
    "LayerNormalization": "it has no LayerNorm",
}


def _refuse_wrong_in_crypten(model_bytes: bytes, path: Path) -> None:
    """One line naming the ops of the file CrypTen would compute wrongly or cannot load."""
    import onnx

    try:
        graph = onnx.load_from_string(model_bytes).graph
    except Exception:  # noqa: BLE001 - not an ONNX file: reading the client's input says so in one line
        return
    ops = sorted({n.op_type for n in graph.node} & CRYPTEN_REFUSED.keys())
    if ops:
        why = "; ".join(f"{op}: {CRYPTEN_REFUSED[op]}" for op in ops)
        raise SnlFxError(f"{path} cannot run under CrypTen 0.4.1 ({why}): use --backend spu-semi2k or spu-cheetah")


def pi_bench(
    onnx_path: str | os.PathLike,
    runs: int = 3,
    input: torch.Tensor | None = None,
    seed: int = 0,
    timeout: float = 600.0,
    backend: Backend = "crypten",
    softmax_broadcast: bool | None = None,
) -> PiBenchResult:
    """Run ``onnx_path`` under 2PC ``runs`` times and compare it with ONNX Runtime.

    ``backend``: ``crypten`` (default), ``spu-cheetah`` or ``spu-semi2k``. ``input``: the client's
    input (default: standard normal of the file's input shape, from ``seed``). ``timeout``: seconds
    before the parties are stopped. Export the file with ``export_onnx(..., profile="pi")``:
    CrypTen 0.4.1 then loads it as it is (SPU also runs the default profile).

    Args:
        onnx_path: the ONNX file (one input).
        runs: measured inferences, >= 1 (default 3); ``seconds`` is their median.
        input: the client's input; None (default): standard normal of the file's input shape.
        seed: seeds the default input (default 0).
        timeout: seconds before the parties are stopped (default 600).
        backend: ``"crypten"`` (default), ``"spu-cheetah"`` or ``"spu-semi2k"``.
        softmax_broadcast: SPU only: compile with SPU's ``enable_optimize_denominator_with_broadcast``
            (a softmax divides by one reciprocal per row: 1,394 -> 389 B per element under SEMI2K
            for rows of 197, outputs still within 1e-2); False: SPU's plain softmax. None (default):
            the environment's ``SNL_FX_SPU_OPTIMIZE_DENOMINATOR``, else on
            (``snl_fx.cost.tables.SOFTMAX_BROADCAST``, as ``pi_cost`` prices it).

    Returns:
        A :class:`PiBenchResult`: error against ONNX Runtime, measured bytes, rounds, seconds,
        ReLUs. Raises SnlFxError on a missing file or backend.

    Example:
        >>> snl_fx.export_onnx(result.model, x[:1], "model.onnx", profile="pi")
        >>> r = snl_fx.pi_bench("model.onnx", runs=3)
        >>> r.relus, r.seconds, r.max_abs_error
    """
    if backend not in BACKENDS:
        raise SnlFxError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "crypten":
        import_crypten()
    else:
        from ._spu import spu_python

        spu_python()
    path = Path(onnx_path)
    if not path.is_file():
        raise SnlFxError(f"no such ONNX file: {path}")
    if runs < 1:
        raise SnlFxError(f"runs must be >= 1, got {runs}")
    model_bytes = path.read_bytes()
    if backend == "crypten":
        _refuse_wrong_in_crypten(model_bytes, path)
    x = _client_input(model_bytes, input, seed, crypten=backend == "crypten")
    reference = _ort_output(model_bytes, x)
    if backend != "crypten":
        return _spu_result(backend, path, x, reference, runs, timeout, softmax_broadcast)
    outs = _run_parties(model_bytes, x, runs, timeout)
    server, client = outs[0], outs[1]
    y = client["output"]
    _check_shape("CrypTen", y, reference)
    times = tuple(max(a, b) for a, b in zip(server["times"], client["times"]))
    kinds = _crypten_kinds(server, client)
    return PiBenchResult(
        max_abs_error=_error(y, reference),
        output_scale=float(np.abs(reference).max()) if reference.size else 0.0,
        bytes=int(round((server["bytes"] + client["bytes"]) / 2)),
        rounds=int(max(server["rounds"], client["rounds"])),
        seconds=statistics.median(times),
        relus=int(client["relus"]),
        relu_bytes=int(round((server["relu_bytes"] + client["relu_bytes"]) / 2)),
        relu_rounds=int(max(server["relu_rounds"], client["relu_rounds"])),
        relu_seconds=kinds["relu"]["seconds"] if "relu" in kinds else 0.0,
        relu_layers=int(client["relu_layers"]),
        comparisons=int(client["comparisons"]),
        runs=runs,
        times=times,
        kinds=kinds,
    )


def _crypten_kinds(server: dict[str, Any], client: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Both parties' per-kind tallies -> one inference's: bytes both directions (summed, halved, as
    the total), rounds and seconds of the slower party (seconds: median over the runs)."""
    out: dict[str, dict[str, Any]] = {}
    for kind, c in client["kinds"].items():
        s = server["kinds"].get(kind, c)
        per_run = [max(a.get(kind, 0.0), b.get(kind, 0.0)) for a, b in zip(server["kind_times"], client["kind_times"])]
        out[kind] = {
            "bytes": int(round((s["bytes"] + c["bytes"]) / 2)), "rounds": int(max(s["rounds"], c["rounds"])),
            "seconds": statistics.median(per_run), "layers": c["layers"], "elements": c["elements"], "rows": c["rows"],
        }
    return out


def _spu_result(
    backend: str, path: Path, x: np.ndarray, reference: np.ndarray, runs: int, timeout: float,
    softmax_broadcast: bool | None = None,
) -> PiBenchResult:
    from ._spu import run_spu

    y, m = run_spu(backend, path, x, runs, timeout, softmax_broadcast)
    _check_shape("SPU", y, reference)
    return PiBenchResult(
        max_abs_error=_error(y, reference),
        output_scale=float(np.abs(reference).max()) if reference.size else 0.0,
        runs=runs,
        backend=backend,
        **{k: tuple(v) if k == "times" else v for k, v in m.items()},
    )


def _check_shape(who: str, y: np.ndarray, reference: np.ndarray) -> None:
    if y.shape != reference.shape:
        raise SnlFxError(f"{who} output shape {tuple(y.shape)} differs from ONNX Runtime's {reference.shape}")


def _error(y: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(y - reference).max()) if reference.size else 0.0


def _client_input(model_bytes: bytes, given: torch.Tensor | None, seed: int, crypten: bool = True) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load_model_from_string(model_bytes).graph
    except Exception as exc:  # noqa: BLE001 - protobuf's errors vary; a junk file is a user error
        raise SnlFxError(f"not an ONNX file ({type(exc).__name__}): export one with snl_fx.export_onnx") from None
    if not graph.node:
        raise SnlFxError("not an ONNX model: the file has no graph nodes")
    ints = [i.name for i in graph.initializer if numpy_helper.to_array(i).dtype.kind in "iub"]
    if crypten and (ints or any(n.op_type == "Identity" for n in graph.node)):
        what = f"integer initializers ({', '.join(ints[:3])})" if ints else "Identity nodes"
        raise SnlFxError(f"CrypTen cannot run a file with {what}: export it with export_onnx(..., profile='pi')")
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise SnlFxError(f"pi-bench runs models with one input; this file has {len(inputs)}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if given is not None:
        x = given.detach().cpu().float().numpy()
        if len(dims) != x.ndim or any(d is not None and d != s for d, s in zip(dims, x.shape)):
            raise SnlFxError(f"input shape {x.shape} does not match the file's input {dims}")
        return x
    if not crypten and dims and dims[0] is None:  # a default-profile file: its dynamic batch dim runs as 1
        dims[0] = 1
    if any(d is None or d <= 0 for d in dims):
        raise SnlFxError(f"the file's input shape {dims} is not static: export with profile='pi' or pass an input")
    return torch.randn(dims, generator=torch.Generator().manual_seed(seed)).numpy()


def _ort_output(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    except Exception as exc:  # noqa: BLE001 - ORT's own errors are long; the file is the user's
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SnlFxError(f"ONNX Runtime cannot run the file (the reference output): {first[:300]}") from None


def _run_parties(model_bytes: bytes, x: np.ndarray, runs: int, timeout: float) -> dict[int, dict]:
    """Fork the two parties and collect what each reports."""
    ctx = mp.get_context("fork")  # children inherit the imported modules: fast start
    results: Any = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="snl_fx_pi_") as tmp:
        rendezvous = f"file://{tmp}/rendezvous"
        procs = [
            ctx.Process(target=_party, args=(rank, rendezvous, model_bytes, x, runs, results), daemon=True)
            for rank in (0, 1)
        ]
        for p in procs:
            p.start()
        outs: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(outs) < 2:
                try:
                    rank, out = results.get(timeout=1.0)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise SnlFxError(f"CrypTen parties did not finish within {timeout:.0f} s") from None
                    if any(p.exitcode not in (None, 0) for p in procs):
                        raise SnlFxError("a CrypTen party died without a report (see its output above)") from None
                    continue
                if "error" in out:
                    raise SnlFxError(f"CrypTen party {rank} failed: {out['error']}")
                outs[rank] = out
        finally:
            for p in procs:  # after a failure the other party would wait forever: stop it now
                p.join(timeout=10.0 if len(outs) == 2 else 0.0)
                if p.is_alive():
                    p.kill()
                    p.join()
    return outs


def _party(rank: int, rendezvous: str, model_bytes: bytes, x: np.ndarray, runs: int, results: Any) -> None:
    """One CrypTen party: rank 0 the server (weights), rank 1 the client (input and output)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module=r"crypten\.")  # CrypTen's own deprecation noise
    os.environ.update(
        RENDEZVOUS=rendezvous, WORLD_SIZE="2", RANK=str(rank), BACKEND="gloo", DISTRIBUTED_BACKEND="gloo"
    )
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        crypten = import_crypten()
        crypten.cfg.mpc.provider = "TFP"
        crypten.init()
        crypten.cfg.communicator.verbose = True
        out = _infer(crypten, rank, model_bytes, x, runs)
        crypten.uninit()
        results.put((rank, out))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
        results.put((rank, {"error": f"{type(exc).__name__}: {exc}"}))


def _infer(crypten: Any, rank: int, model_bytes: bytes, x: np.ndarray, runs: int) -> dict[str, Any]:
    comm = crypten.comm.get()
    _add_tanh(crypten)
    model = crypten.nn.from_onnx(io.BytesIO(model_bytes))
    if rank != 0:  # the client knows the architecture only; the server's weights arrive as shares
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                module.set_parameter(name, torch.zeros_like(param))
    model.encrypt(src=0)
    model.eval()
    tally = _count_kinds(crypten, comm)
    plain = torch.from_numpy(x) if rank == 1 else torch.zeros(x.shape)
    times, kind_times, first, output = [], [], None, None
    for _ in range(runs):
        comm.barrier()
        comm.reset_communication_stats()
        tally["kinds"].clear()
        tally["comparisons"] = 0
        start = time.perf_counter()
        with crypten.no_grad():
            y = model(crypten.cryptensor(plain, src=1))
            raw = y.reveal(dst=1)
        times.append(time.perf_counter() - start)
        kind_times.append({k: v["seconds"] for k, v in tally["kinds"].items()})
        if rank == 1:
            output = y.encoder.decode(raw).numpy()
        if first is None:
            stats = comm.get_communication_stats()
            kinds = {k: dict(v) for k, v in tally["kinds"].items()}
            relu = kinds.get("relu", {})
            first = {
                "bytes": stats["bytes"], "rounds": stats["rounds"], "comparisons": tally["comparisons"],
                "kinds": kinds, "relus": relu.get("elements", 0), "relu_layers": relu.get("layers", 0),
                "relu_bytes": relu.get("bytes", 0), "relu_rounds": relu.get("rounds", 0),
            }
    return {**first, "times": times, "kind_times": kind_times, "output": output}


# CrypTen's modules (crypten.nn.module) of the nonlinear kinds, by the inspector's kind names.
# Mul and Div count only with two secret operands (a weight is secret: the server encrypts it);
# by a public constant they are local in 2PC (truncation included).
CRYPTEN_KINDS = {
    "ReLU": "relu", "MaxPool2d": "maxpool", "Sigmoid": "sigmoid", "Tanh": "tanh", "Softmax": "softmax",
    "LogSoftmax": "softmax", "Exp": "exp", "Div": "div", "Mul": "mul",
}


def _add_tanh(crypten: Any) -> None:
    """CrypTen 0.4.1 has ``MPCTensor.tanh`` (2 sigmoid(2x) - 1) but no module for ONNX's Tanh: add one."""
    module = crypten.nn.module
    if hasattr(module, "Tanh"):
        return

    class Tanh(module.Module):
        def forward(self, input: Any) -> Any:
            return input.tanh()

        @staticmethod
        def from_onnx(attributes: Any = None) -> "Tanh":
            return Tanh()

    module.Tanh = Tanh


def _count_kinds(crypten: Any, comm: Any) -> dict[str, Any]:
    """Patch CrypTen's nonlinear modules and sign test (in this party's process only) to count what
    they do: per kind, bytes and rounds (this party's communicator statistics around each call),
    seconds, layers, elements (outputs) and rows (softmax: elements over the row length; otherwise
    the elements, as the SPU runner reports them)."""
    tally: dict[str, Any] = {"kinds": {}, "comparisons": 0}
    mpc_tensor = crypten.mpc.MPCTensor

    def patch(cls: Any, kind: str) -> None:
        forward = cls.forward

        def counted(self: Any, x: Any) -> Any:
            if kind in ("mul", "div") and not all(isinstance(v, mpc_tensor) for v in x):
                return forward(self, x)  # a public operand: local
            before, start = comm.get_communication_stats(), time.perf_counter()
            y = forward(self, x)
            seconds = time.perf_counter() - start
            after = comm.get_communication_stats()
            n = y.nelement()
            rows = n // y.size(self.dim) if kind == "softmax" and n else n
            k = tally["kinds"].setdefault(
                kind, {"bytes": 0, "rounds": 0, "seconds": 0.0, "layers": 0, "elements": 0, "rows": 0}
            )
            k["bytes"] += after["bytes"] - before["bytes"]
            k["rounds"] += after["rounds"] - before["rounds"]
            k["seconds"] += seconds
            k["layers"] += int(n > 0)
            k["elements"] += n
            k["rows"] += rows
            return y

        cls.forward = counted

    for name, kind in CRYPTEN_KINDS.items():
        patch(getattr(crypten.nn.module, name), kind)
    ltz = mpc_tensor._ltz

    def counted_ltz(self: Any) -> Any:
        tally["comparisons"] += self.nelement()
        return ltz(self)

    mpc_tensor._ltz = counted_ltz
    return tally
