"""The one table of protocols and backends, and each protocol's cost table.

:data:`PROTOCOLS` lists every protocol :func:`snl_fx.pi_cost` prices, once: whether its
coefficients were calibrated on a backend (``pi_constants.json``, written by
``benchmarks/pi_calibrate.py``) or come from the literature (per-ReLU figures only), which
``pi_bench`` backend runs it, SPU's name for it, and its source. Everything else that lists
protocols or backends (``pi_bench``'s backends, the SPU runner's protocol names, the CLIs'
help) is derived from it. :func:`cost_table` gives one protocol's coefficients per feature as
a :class:`CostTable`; a literature table prices ReLUs only and says what it leaves out.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from snl_fx.errors import SnlFxError

__all__ = [
    "BACKENDS",
    "CONSTANTS_PATH",
    "MEASURED_PROTOCOLS",
    "PROTOCOLS",
    "SOFTMAX_BROADCAST",
    "SPU_PROTOCOLS",
    "CostTable",
    "Protocol",
    "cost_table",
    "load_constants",
    "protocol_help",
    "protocols",
]

CONSTANTS_PATH = Path(__file__).with_name("pi_constants.json")

# SPU's softmax option (``enable_optimize_denominator_with_broadcast``: one reciprocal per row, then
# a product, instead of a division of every element): on by default in the SPU runs (``pi_bench``)
# and their prices (``pi_cost``), since its outputs stay within 1e-2 of ONNX Runtime; ``False``
# (``softmax_broadcast=False``, ``SNL_FX_SPU_OPTIMIZE_DENOMINATOR=0``) gives SPU's plain softmax.
SOFTMAX_BROADCAST = True


@dataclass(frozen=True)
class Protocol:
    """One protocol of the table: how it is priced, what runs it, where its figures come from.

    ``kind``: ``"calibrated"`` (coefficients per feature fitted on measured runs of ``backend``,
    read from ``pi_constants.json``) or ``"literature"`` (the per-ReLU figures below, from the
    papers; everything else is left out, as ``leaves_out`` says). ``backend``: the
    ``snl_fx.pi_bench`` backend that runs it (None: no runner here). ``spu``: SPU's protocol
    name (``ProtocolKind``) for the SPU backends. The per-ReLU fields are the literature's
    figures, None for calibrated protocols: use :func:`cost_table` for any protocol's coefficients.
    """

    name: str
    kind: Literal["calibrated", "literature"]
    source: str
    backend: str | None = None
    spu: str | None = None
    bytes_per_relu: float | None = None
    seconds_per_relu: float | None = None
    rounds_per_layer: int | None = None
    seconds_per_layer: float | None = None
    leaves_out: str = ""

    @property
    def calibrated(self) -> bool:
        return self.kind == "calibrated"


# The one table; each row's source says where its figures come from.
PROTOCOLS: tuple[Protocol, ...] = (
    Protocol("crypten", "calibrated", backend="crypten",
             source="measured: CrypTen 0.4.1 2PC, 2 processes on loopback, TFP Beaver triples (online traffic)"),
    Protocol("spu-cheetah", "calibrated", backend="spu-cheetah", spu="CHEETAH",
             source="measured: SecretFlow SPU 0.9.5 CHEETAH 2PC (dealer-free), SPU link statistics"),
    Protocol("spu-semi2k", "calibrated", backend="spu-semi2k", spu="SEMI2K",
             source="measured: SecretFlow SPU 0.9.5 SEMI2K 2PC, SPU link statistics"),
    Protocol("delphi", "literature", bytes_per_relu=1.2e3, seconds_per_relu=0.021 / 1000, seconds_per_layer=0.0,
             source="DELPHI garbled circuits: ~1.2 KB online per ReLU; SNL paper's 0.021 s per 1000 ReLUs",
             leaves_out="its source prices ReLUs only (linear layers run as HE preprocessing and "
                        "secret-shared products; pools, the output and rounds are not given)"),
    Protocol("sci", "literature", bytes_per_relu=532.0, seconds_per_relu=10e-6, seconds_per_layer=0.0,
             source="CrypTFlow2/SCI OT-based ReLU: ~532 B and ~10 us per ReLU (1 thread, loopback)",
             leaves_out="its source prices ReLUs only (HE or OT linear layers, pools, the output and rounds "
                        "are not given)"),
    Protocol("cheetah", "literature", bytes_per_relu=52.0, seconds_per_relu=1e-6, seconds_per_layer=0.0,
             source="Cheetah silent-OT ReLU: ~52-100 B per ReLU (low end used), 1-30 us",
             leaves_out="its source prices ReLUs only (HE linear layers, pools, the output and rounds are not "
                        "given; spu-cheetah prices a whole model)"),
)
_BY_NAME = {p.name: p for p in PROTOCOLS}

MEASURED_PROTOCOLS: tuple[str, ...] = tuple(p.name for p in PROTOCOLS if p.calibrated)
BACKENDS: tuple[str, ...] = tuple(p.backend for p in PROTOCOLS if p.backend)
SPU_PROTOCOLS: dict[str, str] = {p.backend: p.spu for p in PROTOCOLS if p.backend and p.spu}


@dataclass(frozen=True)
class CostTable:
    """One protocol's coefficients per feature: ``bytes``, ``rounds`` and compute ``seconds``.

    A feature missing from a table means its cost is not known for this protocol (``None``): the
    nonlinearities other than ReLU and pools (gelu, softmax, layernorm, mul, ...) stay so until a
    backend measures them, and a :class:`~snl_fx.cost.PiCost` lists such layers as ``unpriced``;
    ``rounds`` is None when the protocol's rounds are not known at all. ``measured``: the
    calibration's backend, date and command (None for a literature table); ``leaves_out``: what a
    literature table does not price, noted on each layer it leaves unpriced.

    Example:
        >>> cost_table("crypten").bytes["relu"]  # bytes per kept ReLU under CrypTen
        464.0
    """

    name: str
    bytes: dict[str, float]
    rounds: dict[str, float] | None
    seconds: dict[str, float]
    source: str
    measured: dict[str, Any] | None = None  # backend, date, command of the calibration
    leaves_out: str = ""
    softmax_broadcast: bool | None = None  # SPU's softmax option priced (None: the protocol has none)

    def _dot(self, table: dict[str, float] | None, features: dict[str, float]) -> float | None:
        if table is None or any(v and k not in table for k, v in features.items()):
            return None
        return sum(table[k] * v for k, v in features.items() if v)


@functools.cache
def load_constants() -> dict[str, dict[str, Any]]:
    """The calibrated protocols' entries of ``pi_constants.json`` by name ({} without the file)."""
    try:
        return json.loads(CONSTANTS_PATH.read_text())["protocols"]
    except FileNotFoundError:
        return {}


def protocols() -> tuple[str, ...]:
    """Every protocol :func:`snl_fx.pi_cost` prices: the calibrated ones (with constants), then the literature ones.

    Returns:
        Names in the order of :data:`PROTOCOLS`, leaving out calibrated protocols whose constants
        are not in ``pi_constants.json`` yet.

    Example:
        >>> protocols()
        ('crypten', 'spu-cheetah', 'spu-semi2k', 'delphi', 'sci', 'cheetah')
    """
    constants = load_constants()
    return tuple(p.name for p in PROTOCOLS if not p.calibrated or p.name in constants)


def protocol_help() -> str:
    """The protocols for a CLI's help: ``crypten, ... (calibrated), delphi, ... (literature, ReLUs only)``."""
    calibrated = ", ".join(p.name for p in PROTOCOLS if p.calibrated)
    literature = ", ".join(p.name for p in PROTOCOLS if not p.calibrated)
    return f"{calibrated} (calibrated), {literature} (literature, ReLUs only)"


def cost_table(protocol: str, softmax_broadcast: bool | None = None) -> CostTable:
    """The coefficients of ``protocol``: calibrated ones from ``pi_constants.json``, or a literature table.

    Args:
        protocol: a name of :data:`PROTOCOLS`.
        softmax_broadcast: SPU protocols: price softmax as SPU runs it with its denominator option
            (the entry's ``softmax_broadcast`` coefficients) or without; None: :data:`SOFTMAX_BROADCAST`.
            Ignored by protocols without the option (``CostTable.softmax_broadcast`` is then None).

    Returns:
        Its :class:`CostTable`. A one-line SnlFxError names the protocols known, or, for a
        calibrated protocol without constants, the command that measures them.

    Example:
        >>> table = cost_table("crypten")
        >>> table.bytes["relu"], table.rounds["relu_layer"]  # per kept ReLU; per ReLU layer
        (464.0, 9.0)
    """
    row = _BY_NAME.get(protocol)
    if row is None:
        raise SnlFxError(f"unknown protocol {protocol!r}; choose one of: {', '.join(protocols())}")
    if not row.calibrated:
        rounds = None if row.rounds_per_layer is None else \
            {"relu": 0.0, "relu_layer": float(row.rounds_per_layer), "relu_ot_workers": 0.0}
        return CostTable(row.name, {"relu": float(row.bytes_per_relu or 0.0), "relu_layer": 0.0, "relu_ot_workers": 0.0},
                         rounds, {"relu": row.seconds_per_relu or 0.0, "relu_layer": row.seconds_per_layer or 0.0},
                         row.source + " (literature; ReLU cost only)", None, row.leaves_out)
    entry = load_constants().get(protocol)
    if entry is None:
        raise SnlFxError(
            f"protocol {protocol!r} has no calibrated constants yet: run benchmarks/pi_calibrate.py --backend {row.backend}"
        )
    measured = {k: entry[k] for k in ("backend", "date", "command", "quantity", "setup", "refill") if k in entry}
    nbytes, rounds, seconds, broadcast = entry["bytes"], entry["rounds"], entry["seconds"], None
    option = entry.get("softmax_broadcast")
    if option is not None:  # the softmax coefficients measured with the option on
        broadcast = SOFTMAX_BROADCAST if softmax_broadcast is None else softmax_broadcast
        if broadcast:
            nbytes, rounds = nbytes | option["bytes"], rounds | option["rounds"]
            seconds = seconds | option.get("seconds", {})
            measured["softmax_broadcast"] = {k: option[k] for k in ("date", "command") if k in option}
    return CostTable(protocol, nbytes, rounds, seconds, entry["source"], measured, softmax_broadcast=broadcast)
