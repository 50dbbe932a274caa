"""The cost model's parts for a calibration script (``benchmarks/pi_calibrate.py``).

``pi_cost`` (in ``snl_fx``) prices a model; calibrating it needs the pieces below it: the
constants file, the features of each layer of a report, a coefficient table, and pricing a
report under a table that is not yet in the file.
"""

from snl_fx.cost.model import CHEETAH_OT_INSTANCES, cost_from_report, layer_features
from snl_fx.cost.network import parse_network
from snl_fx.cost.tables import CONSTANTS_PATH, PROTOCOLS, CostTable

__all__ = ["CHEETAH_OT_INSTANCES", "CONSTANTS_PATH", "PROTOCOLS", "CostTable", "cost_from_report", "layer_features",
           "parse_network"]
