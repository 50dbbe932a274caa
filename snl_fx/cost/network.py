"""The link between the two parties of a private inference: bandwidth and round-trip time."""

from __future__ import annotations

import math
from dataclasses import dataclass

from snl_fx.errors import SnlFxError

__all__ = ["NETWORKS", "Network", "parse_network"]


@dataclass(frozen=True)
class Network:
    """A link between the two parties: bandwidth in Mbit/s and round-trip time in ms.

    Example:
        >>> Network("wan", 100.0, 40.0).seconds(1e6, 10)  # 1 MB and 10 round trips
        0.48
    """

    name: str
    mbps: float
    rtt_ms: float

    def __post_init__(self) -> None:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (self.mbps, self.rtt_ms))
        if not (ok and self.mbps > 0 and self.rtt_ms >= 0):
            raise SnlFxError(f"network {self.name!r}: bandwidth must be a finite number > 0 Mbit/s and the RTT a "
                             f"finite number >= 0 ms, got {self.mbps!r} Mbit/s and {self.rtt_ms!r} ms")

    def seconds(self, nbytes: float, rounds: float) -> float:
        """Time on the wire: ``bytes / bandwidth + rounds * RTT``."""
        return nbytes * 8 / (self.mbps * 1e6) + rounds * self.rtt_ms / 1e3

    def describe(self) -> str:
        """``"wan (100 Mbit/s, 40 ms RTT)"``: the name and what it stands for."""
        return f"{self.name} ({self.mbps:g} Mbit/s, {self.rtt_ms:g} ms RTT)"


NETWORKS = {"lan": Network("lan", 1000.0, 0.5), "wan": Network("wan", 100.0, 40.0)}


def parse_network(spec: str | Network) -> Network:
    """The network a name or a ``"MBPS,RTT_MS"`` string stands for.

    Args:
        spec: ``"lan"`` (1 Gbit/s, 0.5 ms RTT), ``"wan"`` (100 Mbit/s, 40 ms RTT), ``"MBPS,RTT_MS"``
            (e.g. ``"50,20"``), or a :class:`Network` (returned as it is).

    Returns:
        The :class:`Network`; a one-line :class:`SnlFxError` for anything else.

    Example:
        >>> parse_network("50,20")
        Network(name='50,20', mbps=50.0, rtt_ms=20.0)
    """
    if isinstance(spec, Network):
        return spec
    text = str(spec).strip().lower()
    if text in NETWORKS:
        return NETWORKS[text]
    parts = text.split(",")
    try:
        mbps, rtt = (float(p) for p in parts)
    except ValueError:
        raise SnlFxError(f"network must be lan, wan or MBPS,RTT_MS (e.g. 100,40), got {spec!r}") from None
    return Network(f"{mbps:g},{rtt:g}", mbps, rtt)  # validated there: finite, bandwidth > 0, RTT >= 0
