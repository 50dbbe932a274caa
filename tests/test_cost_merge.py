"""Merge pricing (snl_fx.cost.merge) is pi_cost's pricing: same layers, same features, every protocol."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import snl_fx
from snl_fx import passes
from snl_fx.cost.merge import candidate_layers, merge_for_cost, merge_prices


class ConvChain(nn.Module):
    """conv-relu, then two convs no ReLU separates (3x3 then 1x1, mergeable), a BatchNorm, a shortcut, a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 8 * 8, 10)

    def forward(self, x):
        y = self.bn(self.conv3(self.conv2(torch.relu(self.conv1(x)))))
        return self.fc(torch.flatten(torch.relu(y), 1))


def traced() -> tuple[torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model, x = ConvChain().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return passes.trace(model, x), x


def candidates(gm: torch.fx.GraphModule) -> list[passes.MergeCandidate]:
    """Every candidate merge_linear offers on ``gm`` (none is done)."""
    seen: list[passes.MergeCandidate] = []
    passes.merge_linear(gm, should_merge=lambda c: seen.append(c) or False)
    return seen


def test_merged_layer_is_what_the_inspector_sees():
    gm, x = traced()
    found = candidates(gm)
    assert {c.ops for c in found} >= {("Conv2d", "Conv2d")}
    listed = snl_fx.relu_count(gm, x).linear
    for c in found:
        before, (after,) = candidate_layers(c, dict(gm.named_modules()))
        assert all(layer in listed for layer in before)  # the inspector's rows, names included
        assert after.macs == c.macs_after > 0 and after.weight == c.weights_after - c.merged.bias.numel()


@pytest.mark.parametrize("protocol", ["spu-semi2k", "spu-cheetah", "crypten"])
def test_merge_pricing_equals_pi_cost(protocol):
    """Each merge changes the model's pi_cost by exactly what the merge decision priced, in bytes."""
    gm, x = traced()
    budget = snl_fx.Cost(bytes=1e9, protocol=protocol, network="wan")
    full = snl_fx.pi_cost(gm, x, protocol, "wan")
    expected_drop, expected_merges = 0.0, 0
    for c in candidates(copy.deepcopy(gm)):
        before, after = merge_prices(c, dict(c.nodes[-1].graph.owning_module.named_modules()), budget)
        if after < before or (after == before and c.macs_after <= c.macs_before):
            expected_drop += before - after
            expected_merges += 1
    merged, n = merge_for_cost(copy.deepcopy(gm), budget, x)
    assert n == expected_merges >= 1  # the conv chain merges under every protocol
    after = snl_fx.pi_cost(merged, x, protocol, "wan")
    assert full.bytes - after.bytes == pytest.approx(expected_drop, rel=1e-9, abs=1e-6)
    assert after.by_kind()["relu"] == full.by_kind()["relu"]  # only linear layers changed
    merged_rows = [la for la in after.layers if la.name.startswith("snl_merged")]
    assert merged_rows and all(la.kind == "linear" and la.bytes for la in merged_rows)


def test_spu_merge_pricing_counts_the_multiply_accumulates():
    """SEMI2K's im2col term and CHEETAH's HE ciphertexts come from the layer's macs: never priced as 0."""
    gm, x = traced()
    (chain,) = [c for c in candidates(gm) if c.ops == ("Conv2d", "Conv2d")]
    modules = dict(gm.named_modules())
    _, (after,) = candidate_layers(chain, modules)
    features = snl_fx.cost.model.linear_features(after)
    assert features["linear_patch"] == 8 * 8 * 8 * 9  # Hout*Wout*Cin*k*k of the merged 3x3 conv
    assert features["he_ct_in"] > 0
    for protocol in ("spu-semi2k", "spu-cheetah"):
        budget = snl_fx.Cost(bytes=1e9, protocol=protocol)
        zero_macs = after.__class__(**{**after.__dict__, "macs": 0})
        nbytes, _, _ = snl_fx.cost.model.price(snl_fx.cost.model.linear_features(zero_macs), protocol)
        assert merge_prices(chain, modules, budget)[1] > nbytes  # the old copy's macs=0 priced less
