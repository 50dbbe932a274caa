"""The private-inference cost model: bytes, rounds and latency of one inference, per layer.

``pi_cost`` prices a torch module, an ONNX file or a :class:`snl_fx.inspect.ReluReport` under a
protocol and a network. The parts: ``network`` (the link: bandwidth, round-trip time),
``tables`` (the one table of protocols and backends, :data:`PROTOCOLS`, and each protocol's
coefficients, :func:`cost_table`: calibrated ones from ``pi_constants.json``, written by
``benchmarks/pi_calibrate.py``, or literature ones that price ReLUs only), ``model`` (per-layer
features, their prices, the result :class:`PiCost`), ``merge`` (merging linear layers where the
model says it is cheaper) and ``calibration`` (what the calibration script needs).
"""

from snl_fx.cost.model import (
    LayerCost,
    PiCost,
    cheetah_matmul,
    linear_cost,
    pi_cost,
    relu_site_cost,
)
from snl_fx.cost.network import NETWORKS, Network, parse_network
from snl_fx.cost.tables import (
    BACKENDS,
    MEASURED_PROTOCOLS,
    PROTOCOLS,
    CostTable,
    Protocol,
    cost_table,
    protocols,
)

__all__ = [
    "BACKENDS",
    "MEASURED_PROTOCOLS",
    "NETWORKS",
    "PROTOCOLS",
    "CostTable",
    "LayerCost",
    "Network",
    "PiCost",
    "Protocol",
    "cheetah_matmul",
    "cost_table",
    "linear_cost",
    "parse_network",
    "pi_cost",
    "protocols",
    "relu_site_cost",
]
