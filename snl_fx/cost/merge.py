"""Merging linear layers where the cost model says the merged op is cheaper (after lowering a Cost budget).

A merge is priced as :func:`snl_fx.pi_cost` prices the model: the layers it replaces and the one
it makes are described by the inspector's :func:`snl_fx.inspect.torch_model.linear_layer` (sizes
and multiply-accumulates, so SPU SEMI2K's im2col term and SPU CHEETAH's HE ciphertexts count),
and priced by the same features and tables.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch.nn as nn
from torch.fx import GraphModule

from snl_fx import passes
from snl_fx.passes.merge import MERGED_PREFIX
from snl_fx.cost.model import linear_features, price
from snl_fx.cost.network import parse_network
from snl_fx.cost.tables import cost_table
from snl_fx.errors import InternalError
from snl_fx.gated import max_abs_diff
from snl_fx.inspect.report import LinearCount
from snl_fx.inspect.torch_model import linear_layer, module_layer

__all__ = ["candidate_layers", "merge_for_cost", "merge_prices"]


def candidate_layers(
    candidate: passes.MergeCandidate, modules: Mapping[str, nn.Module]
) -> tuple[list[LinearCount], list[LinearCount]]:
    """The linear layers a merge replaces, and the one it makes, as ``relu_count(...).linear`` lists them.

    Args:
        candidate: a :class:`snl_fx.passes.MergeCandidate` of a traced graph (nodes with shapes).
        modules: ``dict(gm.named_modules())`` of that graph.

    Returns:
        (before, after): the replaced convs and linear layers (BatchNorms, identities and the add
        cost nothing), and the merged op with its true multiply-accumulates.

    Example:
        >>> before, after = candidate_layers(candidate, dict(gm.named_modules()))
        >>> after[0].macs == candidate.macs_after
        True
    """
    batch = int(candidate.nodes[-1].meta["tensor_meta"].shape[0])
    replaced = [node for node, op in zip(candidate.nodes, candidate.ops) if op not in ("identity", "add")]
    before = [layer for layer in (linear_layer(node, modules, batch) for node in replaced) if layer is not None]
    name = f"{MERGED_PREFIX}.{candidate.nodes[-1].name}"
    after = [module_layer(name, candidate.merged, math.prod(candidate.in_shape), math.prod(candidate.out_shape))]
    return before, after


def merge_prices(candidate: passes.MergeCandidate, modules: Mapping[str, nn.Module], budget: Any) -> tuple[float, float]:
    """What the layers of a merge cost before and after it, in a Cost budget's unit.

    Args:
        candidate: a :class:`snl_fx.passes.MergeCandidate` (see :func:`candidate_layers`).
        modules: ``dict(gm.named_modules())`` of its graph.
        budget: a :class:`snl_fx.Cost` (its ``protocol``, ``network`` and ``unit``).

    Returns:
        (before, after): bytes, rounds or seconds, each the sum of the layers' rows that
        :func:`snl_fx.pi_cost` would give them.

    Example:
        >>> merge_prices(candidate, dict(gm.named_modules()), snl_fx.Cost(bytes=2e6, protocol="spu-semi2k"))
    """
    table, network = cost_table(budget.protocol), parse_network(budget.network)

    def total(layers: list[LinearCount]) -> float:
        out = 0.0
        for layer in layers:
            nbytes, rounds, compute = price(linear_features(layer), table)
            values = {"bytes": nbytes or 0.0, "rounds": rounds or 0,
                      "seconds": (compute or 0.0) + network.seconds(nbytes or 0.0, rounds or 0)}
            out += values[budget.unit]
        return out

    before, after = candidate_layers(candidate, modules)
    return total(before), total(after)


def merge_for_cost(lowered: GraphModule, budget: Any, example_input: Any) -> tuple[GraphModule, int]:
    """``passes.merge_linear`` on ``lowered`` (in place) where the merged op is predicted cheaper.

    A merge is done when its linear layers cost less in the budget's unit (:func:`merge_prices`),
    or the same with no more multiply-accumulates (BatchNorm folds). Checks the output within
    1e-4 of the unmerged model.

    Args:
        lowered: a lowered model (``convert``'s output: traced, nodes with shapes).
        budget: the :class:`snl_fx.Cost` it was linearized to.
        example_input: an example batch, for the output check.

    Returns:
        The merged model and the number of merges done.

    Example:
        >>> merged, n = merge_for_cost(snl_fx.convert(gm), snl_fx.Cost(seconds=2.0), x)
    """
    reference = copy.deepcopy(lowered)
    modules = dict(lowered.named_modules())
    done = []

    def should_merge(c: passes.MergeCandidate) -> bool:
        modules.update(lowered.named_modules())  # merged ops added since
        cost_before, cost_after = merge_prices(c, modules, budget)
        ok = cost_after < cost_before or (cost_after == cost_before and c.macs_after <= c.macs_before)
        if ok:
            done.append(c.kind)
        return ok

    merged = passes.merge_linear(lowered, should_merge=should_merge)
    diff = max_abs_diff(reference, merged, example_input)
    if diff > 1e-4:
        raise InternalError(f"the merged model differs from the unmerged one by {diff:.3g}")
    return merged, len(done)
