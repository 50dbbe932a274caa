"""A calibrated private-inference cost model: bytes, rounds and latency per layer and per model.

Each layer of a :class:`ReluReport` (linear layers, ReLU sites, max- and average pools, the
revealed output) becomes a few *features* (elements in, weight elements, kept ReLUs, ...). A
protocol's cost is a linear function of them whose coefficients are its :class:`CostTable`
(``tables``): measured on each backend by ``benchmarks/pi_calibrate.py`` and checked in as
``pi_constants.json`` (with backend, date and command), or, for the literature protocols, per-ReLU
figures that leave the rest out and say so per layer. Latency adds the network (``network``):
``compute + bytes / bandwidth + rounds * RTT``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from snl_fx.cost.network import NETWORKS, Network, parse_network
from snl_fx.cost.tables import (
    CONSTANTS_PATH,
    MEASURED_PROTOCOLS,
    PROTOCOLS,
    CostTable,
    cost_table,
    load_constants,
    protocols,
)
from snl_fx.inspect.report import LinearCount, ReluReport

# Kinds of layers, in the order of the per-kind split (``PiCost.by_kind``). Each nonlinearity kind
# the inspectors report is its own row; "other" gathers any kind not listed here (elu, mish, ...).
NONLINEAR_KINDS = ("gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "erf", "softmax", "layernorm", "rmsnorm",
                   "exp", "div", "mul")
# "scale": a product of a secret by a public (float) constant, one fixed-point truncation per element.
KINDS = ("linear", "relu", "maxpool", "avgpool", "scale", *NONLINEAR_KINDS, "other", "output")

# Network and table names are re-exported: they lived here before the package was split.
__all__ = [
    "CONSTANTS_PATH", "KINDS", "MEASURED_PROTOCOLS", "NETWORKS", "NONLINEAR_KINDS", "PROTOCOLS", "CostTable", "LayerCost", "Network",
    "PiCost", "cheetah_matmul", "cost_from_report", "cost_table", "layer_features", "linear_cost",
    "linear_features", "matmul_heads", "parse_network", "pi_cost", "price", "protocols", "relu_site_cost",
    "scale_features",
]


# ---- features: what a layer is made of, one place for the model and its calibration ----

# SPU 0.9.5 CHEETAH (facts read from its source, libspu/mpc/cheetah, and checked against its logs):
# * a secret x secret product (M x K) by (K x N) -- a conv is its im2col product, M = Hout*Wout,
#   K = Cin*k*k, N = Cout -- runs as two homomorphic products, one per direction. In each, one
#   party encrypts its operand in RLWE ciphertexts of degree 8192 (64-bit ring) and the other
#   answers with encrypted, masked results. The operands are cut into blocks (d0, d1, d2) chosen
#   to minimise 1000 x ciphertexts + CPU terms; outputs are packed into fewer ciphertexts when more
#   than one block of results comes back. Traffic therefore steps with ceil(M/d0) etc., not with
#   M*K*N. :func:`cheetah_matmul` repeats that choice.
# * OT-based ops (truncation, comparison, multiplexing) split an op of n elements over
#   min(instances, ceil(n / 2048)) OT instances, instances = SPU's thread count (at most 48);
#   each instance's first use costs a one-time set-up, and each instance refills its silent-OT
#   buffer (10,485,760 correlated OTs) when it runs out -- which is why one inference's traffic
#   depended on what ran before it in the same process. The model prices the steady state
#   without refills (a refill: 266 kB in 1,281 one-way messages; "refill" and "quantity" in
#   pi_constants.json, and a note on every CHEETAH PiCost).
CHEETAH_POLY_DEGREE = 8192
CHEETAH_OT_GRAIN = 2048
CHEETAH_OT_INSTANCES = 2  # the calibration machine's thread count (2 cores); set in pi_constants.json


def ot_workers(elements: int) -> int:
    """OT instances SPU CHEETAH spreads an op of ``elements`` elements over (0 for an empty op)."""
    instances = int(load_constants().get("spu-cheetah", {}).get("ot_instances", CHEETAH_OT_INSTANCES))
    return min(instances, -(-elements // CHEETAH_OT_GRAIN)) if elements > 0 else 0


def _blocks(m: int, k: int, n: int, pack: bool, degree: int) -> tuple[int, int, int]:
    """The block shape (d0, d1, d2) SPU CHEETAH picks for an (m x k) by (k x n) product.

    Every d0 <= min(degree, m) and d1 (powers of two with packing, else every integer) <= k with
    d0 * d1 <= degree; d2 = min(n, degree // (d0 * d1)). Cost, in tenths: 10,000 x (ciphertexts
    sent + ciphertexts returned) + 10 x automorphisms (packing) + block products; the last
    minimum in (d0, d1) order wins, as SPU keeps a candidate of equal cost.
    """
    import numpy as np

    d1s = []
    d1 = 1
    while d1 <= k:
        d1s.append(d1)
        d1 = d1 * 2 if pack else d1 + 1
    d0 = np.arange(1, min(degree, m) + 1, dtype=np.int64)[:, None]
    d1v = np.array(d1s, dtype=np.int64)[None, :]
    area = d0 * d1v
    d2 = np.maximum(np.minimum(n, degree // area), 1)
    b0, b1, b2 = -(-m // d0), -(-k // d1v), -(-n // d2)
    cost = (np.minimum(b0, b2) * b1 + -(-(b0 * b2) // d1v)) * 10_000 + b0 * b1 * b2
    if pack:
        cost = cost + 10 * (-(-(m * n) // degree)) * d1v
    cost = np.where(area <= degree, cost, np.iinfo(np.int64).max).ravel()
    best = cost.size - 1 - int(np.argmin(cost[::-1]))
    i, j = divmod(best, len(d1s))
    return int(d0[i, 0]), d1s[j], int(d2[i, j])


@functools.lru_cache(maxsize=4096)
def cheetah_matmul(m: int, k: int, n: int, degree: int = CHEETAH_POLY_DEGREE) -> tuple[int, int, bool]:
    """(ciphertexts encrypted, ciphertexts returned, packed?) of one direction of SPU CHEETAH's
    (m x k) by (k x n) secret product; the two directions cost the same.

    Packing is tried first; if a single block of results comes back it is dropped and the blocks
    are chosen again without it. The encrypting party sends the smaller operand,
    min(ceil(m/d0), ceil(n/d2)) * ceil(k/d1) ciphertexts. Results: without packing one per block of
    outputs, ceil(m/d0) * ceil(n/d2); packed, those blocks d1 to a ciphertext (d1 < m*n) or all
    outputs in ceil(m*n / degree) ciphertexts otherwise.

    Example:
        >>> cheetah_matmul(64, 27, 8)  # a 3x3 conv, 3 -> 8 channels, on 8x8 outputs: (M, K, N)
        (1, 2, False)
    """
    d0, d1, d2 = _blocks(m, k, n, True, degree)
    b0, b2 = -(-m // d0), -(-n // d2)
    if b0 * b2 <= 1:
        d0, d1, d2 = _blocks(m, k, n, False, degree)
        b0, b1, b2 = -(-m // d0), -(-k // d1), -(-n // d2)
        return min(b0, b2) * b1, b0 * b2, False
    b1 = -(-k // d1)
    out = -(-(b0 * b2) // d1) if d1 < m * n else -(-(m * n) // degree)
    return min(b0, b2) * b1, out, True


def matmul_heads(layer: LinearCount) -> int:
    """The independent products a batched matmul is made of, per sample (attention's heads); 1 otherwise.

    For ``(B, M, K) @ (B, K, N)`` the layer's sizes are input B*M*K, weight B*K*N, output B*M*N and
    macs B*M*K*N, so B = input * weight * output / macs**2; a matmul by a 2-D weight gives 1.

    Example:
        >>> matmul_heads(LinearCount("qk", "MatMul(activations)", 4 * 17 * 16, 4 * 16 * 17, 4 * 17 * 17, 4 * 17 * 16 * 17))
        4
    """
    if "matmul" not in layer.op.lower() or not layer.macs:
        return 1
    heads, rest = divmod(layer.input * layer.weight * layer.output, layer.macs * layer.macs)
    return heads if heads > 1 and not rest else 1


def linear_features(layer: LinearCount) -> dict[str, float]:
    """Features of a linear layer (conv, gemm, matmul): its input, weight and output sizes.

    A batched matmul of ``B`` heads (:func:`matmul_heads`: q @ k^T, attention @ v) is ``B``
    products, as SPU runs it, one after the other: its features are ``B`` times those of one head's.

    ``linear_patch`` is the im2col size, the input elements the outputs read (Hout*Wout*Cin*k*k
    for a conv, the input for a gemm): ``macs**2 / (weight * output)``. SPU opens it, not the input.
    The ``he_*`` features are SPU CHEETAH's ciphertexts for the layer as an (M x K) by (K x N)
    product (see :func:`cheetah_matmul`), ``linear_ot_workers`` the OT instances its truncation uses.
    """
    heads = matmul_heads(layer)
    if heads > 1:
        one = LinearCount(layer.name, layer.op, layer.input // heads, layer.weight // heads, layer.output // heads,
                          layer.macs // heads)
        return {k: v * heads for k, v in linear_features(one).items()}
    patch = layer.macs * layer.macs // (layer.weight * layer.output) if layer.weight and layer.output else layer.input
    out = {"linear_input": layer.input, "linear_patch": patch, "linear_weight": layer.weight,
           "linear_output": layer.output, "linear_layer": 1, "mac": layer.macs,
           "linear_ot_workers": ot_workers(layer.output)}
    if layer.weight and layer.output and layer.macs:
        k = layer.macs // layer.output
        n = layer.weight // k if k else 0
        m = layer.output // n if n else 0
        if m * k * n == layer.macs:  # an (M x K) by (K x N) product: convs (im2col), gemms
            ct_in, ct_out, packed = cheetah_matmul(m, k, n)
            out["he_ct_in"] = ct_in
            out["he_ct_out_packed" if packed else "he_ct_out"] = ct_out
    return out


def relu_features(kept: int) -> dict[str, float]:
    """Features of one ReLU site that evaluates ``kept`` ReLUs (0 kept: the layer is gone)."""
    return {"relu": kept, "relu_layer": 1, "relu_ot_workers": ot_workers(kept)} if kept else {}


def maxpool_features(window: int, outputs: int) -> dict[str, float]:
    """Features of a max-pool of ``outputs`` outputs over windows of ``window`` elements."""
    return {f"maxpool{window}_output": outputs, f"maxpool{window}_layer": 1, "comparison": outputs * (window - 1),
            f"maxpool{window}_ot_workers": ot_workers(outputs)}


def avgpool_features(outputs: int) -> dict[str, float]:
    """Features of an average pool (or spatial mean) of ``outputs`` outputs: one truncation each."""
    return {"avgpool_output": outputs, "avgpool_layer": 1}


def scale_features(elements: int) -> dict[str, float]:
    """Features of a product of ``elements`` secret elements by a public constant (attention's
    1/sqrt(d), a residual scaling): one fixed-point truncation each, the protocol step an average
    pool's division is made of, so priced with the same coefficients (``avgpool_*``)."""
    return avgpool_features(elements)


def nonlinearity_features(kind: str, elements: int, row: int | None = None) -> dict[str, float]:
    """Features of a layer of another nonlinearity (gelu, softmax, mul, ...): a feature named after
    its kind (its elements per sample), one per layer, and for the kinds that normalise rows
    (softmax, layernorm, rmsnorm) its rows. Softmax also has the depth of its row maximum's
    comparison tree: ``softmax_depth`` = ceil(log2(row)), and ``softmax_odd``, the levels SPU adds
    to it: SPU reduces a row of n by halving n (even) or n - 1 (odd, the element out compared once
    more), floor(log2 n) + popcount(n) - 1 levels in all (rows of 16: 4 + 0, 17: 5 + 0, 100: 7 + 1,
    197: 8 + 2; SPU SEMI2K: 8 rounds a level, measured). ``<kind>_ot_workers``: the OT instances SPU
    CHEETAH spreads the kind's comparisons and truncations over (:func:`ot_workers`; its rounds
    nearly double from one to two). A protocol prices the kind only once its table has measured
    coefficients for these; until then the layer is unpriced (``PiCost.unpriced``).
    """
    out = {kind: elements, f"{kind}_layer": 1, f"{kind}_ot_workers": ot_workers(elements)}
    if row:
        out[f"{kind}_rows"] = elements // row
        if kind == "softmax":
            depth = (row - 1).bit_length()  # ceil(log2(row))
            out["softmax_depth"] = depth
            out["softmax_odd"] = row.bit_length() + row.bit_count() - 2 - depth
    return out


def output_features(elements: int) -> dict[str, float]:
    """Features of one inference as a whole: revealing ``elements`` outputs, fixed costs."""
    return {"output": elements, "fixed": 1}


_COMPUTE_ONLY = {"mac", "comparison"}  # features that price compute time only


def price(features: dict[str, float], protocol: str | CostTable) -> tuple[float | None, int | None, float | None]:
    """(bytes, rounds, compute seconds) of features under ``protocol``; None where not known."""
    table = protocol if isinstance(protocol, CostTable) else cost_table(protocol)
    traffic = {k: v for k, v in features.items() if k not in _COMPUTE_ONLY}
    nbytes = table._dot(table.bytes, traffic)
    rounds = table._dot(table.rounds, traffic)
    rounds = None if rounds is None else int(round(rounds))
    if nbytes is None:
        return None, rounds, None
    timing = {k: v for k, v in features.items() if k in table.seconds}  # unlisted features: no compute time
    if rounds is not None and "round" in table.seconds:
        timing["round"] = rounds
    return nbytes, rounds, table._dot(table.seconds, timing)


def relu_site_cost(kept: int, protocol: str = "crypten") -> tuple[float, int | None]:
    """The traffic of one ReLU site that keeps ``kept`` ReLUs per sample, for cost-aware training.

    Args:
        kept: ReLUs per sample the site evaluates (0: the layer is gone and costs nothing).
        protocol: a name of :func:`protocols`.

    Returns:
        (bytes, rounds); rounds is None where the protocol does not give them.

    Example:
        >>> relu_site_cost(1000, "crypten")  # cost_table("crypten"): bytes["relu"] each, rounds["relu_layer"]
        (464000.0, 9)
    """
    nbytes, rounds, _ = price(relu_features(kept), protocol)
    return nbytes or 0.0, rounds


def linear_cost(layers: Iterable[LinearCount], protocol: str = "crypten") -> tuple[float | None, int | None]:
    """The traffic of linear layers, priced as :func:`pi_cost` prices them.

    Args:
        layers: :class:`LinearCount` rows, e.g. ``relu_count(model, x).linear``.
        protocol: a name of :func:`protocols`.

    Returns:
        (bytes, rounds) of them all; None where the protocol does not price linear layers.

    Example:
        >>> linear_cost(snl_fx.relu_count(model, x).linear, "spu-semi2k")
    """
    total_bytes, total_rounds = 0.0, 0
    for layer in layers:
        nbytes, rounds, _ = price(linear_features(layer), protocol)
        if nbytes is None or rounds is None:
            return nbytes, rounds
        total_bytes, total_rounds = total_bytes + nbytes, total_rounds + rounds
    return total_bytes, total_rounds


# ---- the result ----

@dataclass(frozen=True)
class LayerCost:
    """One layer's cost for one sample; None where the protocol does not say (see ``note``)."""

    name: str
    kind: str  # one of KINDS: linear, relu, maxpool, avgpool, gelu, softmax, ..., mul, other, output
    op: str
    elements: int  # kept ReLUs, linear/max-pool/avg-pool/other outputs, revealed outputs
    bytes: float | None
    rounds: int | None
    compute_seconds: float | None
    seconds: float | None  # compute + bytes / bandwidth + rounds * RTT
    note: str = ""


@dataclass
class PiCost:
    """Predicted private-inference cost of one inference of one sample (traffic both directions)."""

    protocol: str
    network: Network
    source: str
    layers: list[LayerCost]
    calibration: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def _sum(self, attr: str, kinds: Iterable[str] = KINDS) -> Any:
        values = [getattr(layer, attr) for layer in self.layers if layer.kind in kinds]
        known = [v for v in values if v is not None]
        return sum(known) if known or not values else None

    @property
    def bytes(self) -> float:
        """Known bytes: layers whose cost the protocol does not give are left out, so that when the
        cost is not :attr:`complete` this is a lower bound (see :attr:`unpriced`)."""
        return self._sum("bytes") or 0.0

    @property
    def unpriced(self) -> list[dict[str, str]]:
        """The layers whose bytes or rounds the protocol does not give: name, kind, op, and what is
        missing (``"bytes"``, ``"rounds"`` or ``"bytes, rounds"``). Totals leave them out."""
        out = []
        for la in self.layers:
            missing = [a for a in ("bytes", "rounds") if getattr(la, a) is None]
            if missing:
                out.append({"name": la.name, "kind": la.kind, "op": la.op, "missing": ", ".join(missing)})
        return out

    @property
    def complete(self) -> bool:
        """Whether every layer is priced (bytes and rounds): else the totals are lower bounds."""
        return not self.unpriced

    def lower_bound(self) -> str:
        """"" when :attr:`complete`, else one line naming what the totals leave out, e.g.
        ``lower bound: gelu (12 layers), softmax (4) not priced under spu-semi2k``; layers whose
        bytes are priced but whose rounds are not follow: ``; relu (3 layers) rounds not given``."""
        unpriced = self.unpriced
        if not unpriced:
            return ""
        parts = []
        for says, rows in ((f"not priced under {self.protocol}", [u for u in unpriced if "bytes" in u["missing"]]),
                           ("rounds not given", [u for u in unpriced if u["missing"] == "rounds"])):
            counts: dict[str, int] = {}
            for u in sorted(rows, key=lambda u: _kind_order(u["kind"])):
                counts[u["kind"]] = counts.get(u["kind"], 0) + 1
            shown = [f"{kind} ({n})" for kind, n in counts.items()]
            if shown:
                n = next(iter(counts.values()))
                shown[0] = shown[0][:-1] + (" layers)" if n != 1 else " layer)")
                parts.append(f"{', '.join(shown)} {says}")
        if not any("bytes" in u["missing"] for u in unpriced):
            parts[0] += f" under {self.protocol}"
        return f"lower bound: {'; '.join(parts)}"

    @property
    def rounds(self) -> int | None:
        """Rounds of all layers, added up: the backends run one op after another."""
        return self._sum("rounds")

    @property
    def compute_seconds(self) -> float:
        return self._sum("compute_seconds") or 0.0

    @property
    def seconds(self) -> float:
        """Estimated latency: compute + bytes / bandwidth + rounds * RTT."""
        return self.compute_seconds + self.network.seconds(self.bytes, self.rounds or 0)

    def by_kind(self) -> dict[str, dict[str, float | int | None]]:
        """Bytes, rounds and latency of each kind of layer present, in the order of :data:`KINDS`
        (linear, relu, maxpool, avgpool, gelu, ..., softmax, layernorm, ..., mul, other, output);
        None where the protocol prices no layer of that kind."""
        out = {}
        for kind in KINDS:
            if any(layer.kind == kind for layer in self.layers):
                out[kind] = {a: self._sum(a, (kind,)) for a in ("bytes", "rounds", "compute_seconds", "seconds")}
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: protocol, network, bytes, rounds, seconds (lower bounds unless ``complete``),
        complete, unpriced, by_kind, layers, source, notes."""
        return {
            "protocol": self.protocol,
            "network": asdict(self.network),
            "complete": self.complete,
            "unpriced": self.unpriced,
            "bytes": self.bytes,
            "rounds": self.rounds,
            "compute_seconds": self.compute_seconds,
            "seconds": self.seconds,
            "by_kind": self.by_kind(),
            "layers": [asdict(layer) for layer in self.layers],
            "source": self.source,
            "calibration": self.calibration,
            "notes": self.notes,
        }

    def headline(self) -> str:
        """One line for people: protocol, network, and the model's bytes, rounds and seconds.

        Example:
            >>> snl_fx.pi_cost(snl_fx.models.small_resnet().eval(), torch.randn(1, 1, 28, 28)).headline()
            'crypten, network wan (100 Mbit/s, 40 ms RTT): 22.772 MB, 65 rounds, 4.870 s per sample'
        """
        rounds = "? rounds" if self.rounds is None else f"{self.rounds:,} rounds"
        at_least = "" if self.complete else "at least "
        bound = "" if self.complete else f" ({self.lower_bound()})"
        return (f"{self.protocol}, network {self.network.describe()}: {at_least}{self.bytes / 1e6:,.3f} MB, {rounds}, "
                f"{self.seconds:.3f} s per sample{bound}")

    def table(self) -> str:
        """Per-layer rows, then totals per kind and the whole model, for people."""

        def fmt(v: Any, spec: str) -> str:
            return "?" if v is None else format(v, spec)

        rows = [("layer", "kind", "op", "elements", "bytes", "rounds", "seconds")]
        rows += [(c.name, c.kind, c.op, f"{c.elements:,}", fmt(c.bytes, ",.0f"), fmt(c.rounds, "d"),
                  fmt(c.seconds, ".4f")) for c in self.layers]
        widths = [max(len(r[i]) for r in rows) for i in range(7)]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        net = self.network
        lines.append(f"\nprivate inference under {self.protocol}, network {net.name} ({net.mbps:g} Mbit/s, "
                     f"{net.rtt_ms:g} ms RTT), one sample:")
        total_bytes, total_rounds = self.bytes, self.rounds
        for kind, c in self.by_kind().items():
            share = f" ({c['bytes'] / total_bytes:.1%} of bytes)" if c["bytes"] is not None and total_bytes else ""
            lines.append(f"  {kind:10s} {fmt(c['bytes'] and c['bytes'] / 1e6, '10.3f'):>10s} MB{share}  "
                         f"{fmt(c['rounds'], 'd')} rounds  {fmt(c['seconds'], '.3f')} s")
        at_least = "" if self.complete else "at least "
        lines.append(f"  total      {at_least}{total_bytes / 1e6:.3f} MB  {at_least}{fmt(total_rounds, 'd')} rounds  "
                     f"{at_least}{self.seconds:.3f} s (compute {self.compute_seconds:.3f} s)")
        if not self.complete:
            lines.append(f"  {self.lower_bound()}")
        lines.append(f"source: {self.source}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def pi_cost(
    model_or_onnx: Any,
    example_input: Any = None,
    protocol: str = "crypten",
    network: str | Network = "wan",
    *,
    input_shapes: list[tuple[int, ...]] | None = None,
    softmax_broadcast: bool | None = None,
) -> PiCost:
    """Predict bytes, rounds and latency of one private inference, per layer and in all.

    Args:
        model_or_onnx: a torch module (with ``example_input``), an ONNX file (torch is not
            imported for it), or a :class:`ReluReport` of either.
        example_input: for a module: an example batch; costs are for one sample whatever its size.
        protocol: one of :func:`protocols`: ``crypten``, ``spu-cheetah``, ``spu-semi2k``
            (calibrated on measured runs), ``delphi``, ``sci``, ``cheetah`` (literature, ReLUs only;
            each layer they leave out says so).
        network: ``"lan"``, ``"wan"``, ``"MBPS,RTT_MS"`` or a :class:`Network`.
        input_shapes: for an ONNX file whose inputs have dynamic dims beyond the batch dim.
        softmax_broadcast: SPU protocols: price softmax with SPU's denominator option (one
            reciprocal per row) as ``pi_bench`` runs it by default, or False for SPU's plain
            softmax; None: ``snl_fx.cost.tables.SOFTMAX_BROADCAST`` (on).

    Returns:
        A :class:`PiCost`: ``.bytes``, ``.rounds``, ``.seconds``, ``.layers`` (one
        :class:`LayerCost` each), ``.by_kind()``, ``.headline()``, ``.table()``, ``.to_dict()``.

    Example:
        >>> cost = snl_fx.pi_cost(model, x[:1], "crypten", "wan")
        >>> cost.bytes, cost.rounds, cost.seconds
    """
    table = cost_table(protocol, softmax_broadcast)
    net = parse_network(network)
    if isinstance(model_or_onnx, ReluReport):
        report = model_or_onnx
    else:
        from snl_fx.inspect import relu_count

        if isinstance(model_or_onnx, (str, os.PathLike)):
            report = relu_count(model_or_onnx, input_shapes=input_shapes)
        else:
            report = relu_count(model_or_onnx, example_input)
    return cost_from_report(report, table, net)


def layer_features(report: ReluReport) -> list[tuple[str, str, str, int, dict[str, float]]]:
    """(name, kind, op, elements, features) of every priced layer of ``report``, output last."""
    rows: list[tuple[str, str, str, int, dict[str, float]]] = []
    rows += [(la.name, "linear", la.op, la.output, linear_features(la)) for la in report.linear]
    rows += [(s.name, "relu", s.op, s.relus, relu_features(s.relus)) for s in report.sites if s.relus]
    rows += [(s.name, "scale", s.op, s.elements, scale_features(s.elements)) for s in report.scales]
    for other in report.others:
        outputs = _numel(other.shape)
        if other.kind == "maxpool":
            window = other.comparisons // max(1, outputs) + 1
            rows.append((other.name, "maxpool", f"maxpool{window}", outputs, maxpool_features(window, outputs)))
        elif other.kind == "avgpool":
            rows.append((other.name, "avgpool", "avgpool", outputs, avgpool_features(outputs)))
        else:
            kind = other.kind if other.kind in NONLINEAR_KINDS else "other"
            op = other.kind if other.row is None else f"{other.kind}(rows of {other.row})"
            rows.append((other.name, kind, op, other.comparisons,
                         nonlinearity_features(other.kind, other.comparisons, other.row)))
    rows.append(("output", "output", "reveal", report.outputs, output_features(report.outputs)))
    return rows


def cost_from_report(report: ReluReport, table: CostTable, network: Network) -> PiCost:
    """Price every layer of ``report`` under ``table`` and ``network``."""
    literature = table.measured is None
    layers: list[LayerCost] = []
    for name, kind, op, elements, features in layer_features(report):
        nbytes, rounds, compute = price(features, table)
        seconds = None if nbytes is None else compute + network.seconds(nbytes, rounds or 0)
        note = ""
        if nbytes is None:
            note = f"not known for {table.name}: {table.leaves_out or 'its source prices ReLUs only'}" if literature \
                else f"{op.split('(rows')[0]} not calibrated for {table.name}"
        layers.append(LayerCost(name, kind, op, elements, nbytes, rounds, compute, seconds, note))
    notes = sorted({f"{layer.kind} layers: {layer.note}" for layer in layers if layer.note})
    if table.rounds is None:
        notes.append(f"rounds: not known for {table.name}; latency counts no round trips")
    if table.softmax_broadcast is not None and any(la.kind == "softmax" for la in layers):
        notes.append(f"softmax priced {'with' if table.softmax_broadcast else 'without'} SPU's denominator option "
                     "(enable_optimize_denominator_with_broadcast; pi_cost/pi_bench softmax_broadcast=)")
    if table.measured and table.measured.get("quantity"):
        notes.append(f"{table.name} prices {table.measured['quantity']}")
    if table.measured and table.measured.get("setup"):
        notes.append(_setup_note(layers, table.measured["setup"], table.measured.get("refill") or {}))
    if report.ungateable:
        notes.append("ReLUs inside leaf modules (not gateable) are not priced")
    notes.append("adds, reshapes, gathers, concats, folded BatchNorms: local under secret sharing, free")
    return PiCost(table.name, network, table.source, layers, table.measured, notes)


def _setup_note(layers: list[LayerCost], setup: dict[str, Any], refill: dict[str, Any]) -> str:
    """CHEETAH's one-time set-up, paid by the first inference of a session (not in the totals)."""
    instances = 0  # OT instances opened: the most any op spreads over (elements: outputs, kept ReLUs)
    for la in layers:
        if la.kind in ("relu", "linear", "maxpool"):
            instances = max(instances, ot_workers(la.elements))
        elif la.kind == "avgpool":
            instances = max(instances, 1)
    he = setup["he_keys"] if any(la.kind == "linear" for la in layers) else 0
    per_instance = setup["ot_instance"] + setup.get("first_refills_per_instance", 0) * refill.get("bytes", 0)
    total = he + instances * per_instance
    return (f"one-time set-up, sent with the first inference of a session and not in the totals: about "
            f"{total / 1e6:.1f} MB ({he / 1e6:.1f} MB of HE public and Galois keys, {instances} OT instance(s) at "
            f"{per_instance / 1e6:.2f} MB each with their first silent-OT refills); later refills add "
            f"{refill.get('bytes', 0) / 1e6:.2f} MB in {refill.get('messages', 0):,} one-way messages per "
            f"{refill.get('ots', 0):,} OTs an instance uses in one direction")


def _kind_order(kind: str) -> int:
    return KINDS.index(kind) if kind in KINDS else len(KINDS)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
