"""passes.merge_linear: exact merges of adjacent linear ops, node counts, ReLU counts, ONNX round trips."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import symbolic_trace

import snl_fx
from snl_fx import passes
from snl_fx.app.models import small_resnet


def kinds(gm: torch.fx.GraphModule) -> Counter:
    """Node counts by kind: module class names for call_module, 'add' for additions."""
    out: Counter = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out[type(gm.get_submodule(n.target)).__name__] += 1
        elif n.target in (torch.add, "add") or getattr(n.target, "__name__", "") == "add":
            out["add"] += 1
    return out


def randomize_bn(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so that folding them is tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data = torch.randn(m.num_features, generator=g)
            m.bias.data = torch.randn(m.num_features, generator=g)


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


def merged(model: nn.Module, x: torch.Tensor, **kw) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """(traced model, merged copy); asserts outputs agree within 1e-4 and ReLU counts are equal."""
    torch.manual_seed(0)
    randomize_bn(model)
    gm = passes.trace(model.eval(), x)
    out = passes.merge_linear(copy.deepcopy(gm), **kw)
    assert max_diff(gm, out, x) <= 1e-4
    assert snl_fx.relu_count(out, x).total == snl_fx.relu_count(gm, x).total
    return gm, out


class Chain(nn.Module):
    def __init__(self, *ops: nn.Module) -> None:
        super().__init__()
        self.ops = nn.Sequential(*ops)

    def forward(self, x):
        return self.ops(x)


def test_conv_bn_conv_with_stride_and_padding_becomes_one_conv():
    model = Chain(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 5, 3, stride=2))
    gm, out = merged(model, torch.randn(2, 3, 17, 17))
    assert kinds(gm) == {"Conv2d": 2, "BatchNorm2d": 1} and kinds(out) == {"Conv2d": 1}
    (conv,) = [m for m in out.modules() if isinstance(m, nn.Conv2d)]
    # 3x3 at stride 2, then 3x3: a (3 + 2*2)-wide kernel at stride 4, padding of the first conv
    assert (conv.kernel_size, conv.stride, conv.padding) == ((7, 7), (4, 4), (1, 1))


def test_padded_second_conv_merges_only_when_the_border_is_exact():
    x = torch.randn(2, 4, 9, 9)
    # 1x1 without bias: its off-border outputs are exactly the zeros the second conv pads with
    _, out = merged(Chain(nn.Conv2d(4, 6, 1, bias=False), nn.Conv2d(6, 6, 3, padding=1)), x)
    assert kinds(out) == {"Conv2d": 1}
    # with a bias, or a 3x3 that reads the input at the border: not one conv, left alone
    for first in (nn.Conv2d(4, 6, 1), nn.Conv2d(4, 6, 3, padding=1, bias=False)):
        _, out = merged(Chain(first, nn.Conv2d(6, 6, 3, padding=1)), x)
        assert kinds(out) == {"Conv2d": 2}
    # BN before a padded conv: only when its shift is zero; before an unpadded conv always
    gm, out = merged(Chain(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)), x)
    assert kinds(out) == {"BatchNorm2d": 1, "Conv2d": 1}
    _, out = merged(Chain(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3)), x)
    assert kinds(out) == {"Conv2d": 1}


def test_grouped_depthwise_and_1x1_convs_stay_grouped():
    x = torch.randn(2, 8, 10, 10)
    model = Chain(
        nn.Conv2d(8, 8, 3, groups=8),  # depthwise
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, groups=8),  # depthwise again: depthwise 5x5
        nn.Conv2d(8, 12, 1, groups=4),  # grouped 1x1
        nn.Conv2d(12, 12, 1, groups=4),
    )
    gm, out = merged(model, x)
    assert kinds(gm) == {"Conv2d": 4, "BatchNorm2d": 1}
    convs = [m for m in out.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.groups) for c in convs] == [((5, 5), 8), ((1, 1), 4)]
    # depthwise 5x5 -> grouped 1x1 would be a grouped 5x5 with more MACs: refused by default, exact if asked
    _, out = merged(model, x, should_merge=lambda c: True)
    assert [(c.kernel_size, c.groups) for c in out.modules() if isinstance(c, nn.Conv2d)] == [((5, 5), 4)]
    # groups that do not line up (2 then 4) give a dense conv (more MACs: 8*8 > 8*4 + 8*2 per pixel)
    pair = Chain(nn.Conv2d(8, 8, 1, groups=2), nn.Conv2d(8, 8, 1, groups=4))
    assert kinds(merged(pair, x)[1]) == {"Conv2d": 2}
    _, out = merged(pair, x, should_merge=lambda c: True)
    assert [c.groups for c in out.modules() if isinstance(c, nn.Conv2d)] == [1]


def test_default_rule_refuses_merges_with_more_macs_and_should_merge_sees_the_candidate():
    x = torch.randn(2, 16, 12, 12)
    model = Chain(nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 3))
    _, out = merged(model, x)
    assert kinds(out) == {"Conv2d": 2}  # 16*16*9*(10*10 + 8*8) < 16*16*25*8*8
    seen = []
    _, out = merged(model, x, should_merge=lambda c: seen.append(c) or True)
    assert kinds(out) == {"Conv2d": 1}
    (c,) = seen
    assert c.kind == "chain" and c.ops == ("Conv2d", "Conv2d") and [n.name for n in c.nodes] == ["ops_0", "ops_1"]
    assert (c.in_shape, c.inner_shapes, c.out_shape) == ((16, 12, 12), ((16, 10, 10),), (16, 8, 8))
    assert (c.macs_before, c.macs_after) == (16 * 16 * 9 * (100 + 64), 16 * 16 * 25 * 64)
    assert c.weight_shape == (16, 16, 5, 5) and c.weights_after == 16 * 16 * 25 + 16
    assert c.weights_before == 2 * (16 * 16 * 9 + 16)


class Shortcuts(nn.Module):
    """3x3(x) + 1x1(x) (both stride 2), then 3x3(y) + y, then linear(z) + z."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 8, 1, stride=2)
        self.c = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8 * 5 * 5, 200)
        self.fc2 = nn.Linear(200, 200)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        z = torch.flatten(self.c(y) + y, 1)
        h = self.fc(z)
        return self.fc2(h) + h


def test_shortcut_adds_fold_into_one_op():
    gm, out = merged(Shortcuts(), torch.randn(3, 4, 10, 10))
    assert kinds(gm) == {"Conv2d": 3, "Linear": 2, "add": 3}
    assert kinds(out) == {"Conv2d": 2, "Linear": 1}  # the two linears merge after the shortcut folds
    convs = [m for m in out.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.groups) for c in convs] == [((3, 3), (2, 2), 1), ((3, 3), (1, 1), 2)]
    asked = []
    _, kept = merged(Shortcuts(), torch.randn(3, 4, 10, 10), should_merge=lambda c: asked.append(c) and False)
    assert kinds(kept) == kinds(gm)  # each candidate declined, and asked once
    assert [(c.kind, c.ops) for c in asked] == [
        ("shortcut", ("Conv2d", "Conv2d", "add")), ("shortcut", ("Conv2d", "identity", "add")),
        ("shortcut", ("Linear", "identity", "add")),
    ]


class Blocked(nn.Module):
    """Linear ops separated by ReLUs, or whose intermediate has a second user."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.c3, self.c4 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.l1, self.l2 = nn.Linear(4 * 36, 8), nn.Linear(8, 8)

    def forward(self, x):
        y = F.relu(self.c2(F.relu(self.c1(x))))
        t = self.c3(y)  # used twice
        z = self.c4(t) * t
        return self.l2(torch.relu(self.l1(z.flatten(1))))


def test_nothing_merges_across_a_relu_or_from_a_node_used_twice():
    gm, out = merged(Blocked(), torch.randn(2, 3, 6, 6))
    assert kinds(out) == kinds(gm) == {"Conv2d": 4, "Linear": 2}


def test_nothing_merges_across_a_partial_relu_or_a_training_bn():
    x = torch.randn(2, 3, 6, 6)
    gm = snl_fx.prepare(Chain(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), x)
    snl_fx.binarize(gm, 50)  # 50 of 144: a PartialReLU between the convs
    lowered = snl_fx.convert(gm).eval()
    lowered.get_submodule("ops.3").train()
    out = passes.merge_linear(copy.deepcopy(lowered))
    assert kinds(out) == kinds(lowered) == {"Conv2d": 2, "PartialReLU": 1, "BatchNorm2d": 1}
    out.eval()
    assert kinds(passes.merge_linear(out)) == {"Conv2d": 2, "PartialReLU": 1}


def test_a_graph_without_shapes_is_a_clear_error():
    gm = symbolic_trace(Chain(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)))
    with pytest.raises(passes.PassError, match="has no shape: trace with passes.trace or run ShapeProp"):
        passes.merge_linear(gm)


def lowered_small_resnet(removed: tuple[str, ...], x: torch.Tensor) -> torch.fx.GraphModule:
    """small_resnet with random BN statistics, the ReLU sites ``removed`` made identity, all others kept."""
    torch.manual_seed(0)
    model = small_resnet()
    randomize_bn(model)
    gm = snl_fx.prepare(model, x)
    sites = passes.get_meta(gm).sites
    scores = {s.name: torch.full(s.shape, 0.0 if s.name in removed else 1.0) for s in sites}
    snl_fx.binarize(gm, sum(s.numel for s in sites if s.name not in removed), scores)
    return snl_fx.convert(gm).eval()


@pytest.mark.parametrize("removed", [("layer1.0.relu1", "layer1.0.relu2"), ("layer2.0.relu1",)])
def test_small_resnet_with_removed_relu_layers(tmp_path, removed):
    x = torch.randn(2, 1, 28, 28)
    lowered = lowered_small_resnet(removed, x)
    out = passes.merge_linear(copy.deepcopy(lowered))
    assert max_diff(lowered, out, x) <= 1e-4
    before, after = kinds(lowered), kinds(out)
    assert before["ReLU"] == 6 - len(removed)  # sites all kept lower to plain ReLUs, removed ones to nothing
    # every BN follows a conv and folds; the 3x3 -> 3x3 pairs (both padded) stay apart
    assert after == {"Conv2d": before["Conv2d"], "ReLU": before["ReLU"], "AdaptiveAvgPool2d": 1, "Linear": 1, "add": 3}
    assert snl_fx.relu_count(out, x).total == snl_fx.relu_count(lowered, x).total


@pytest.mark.parametrize("profile", ["default", "pi"])
def test_onnx_round_trip_of_merged_graphs(tmp_path, profile):
    x = torch.randn(1, 4, 10, 10)
    models = {
        "shortcuts": merged(Shortcuts(), x)[1],
        "chain": merged(Chain(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 5, 1)), x)[1],
        "small_resnet": passes.merge_linear(lowered_small_resnet(("layer1.0.relu1",), torch.randn(1, 1, 28, 28))),
    }
    for name, model in models.items():
        xin = torch.randn(1, 1, 28, 28) if name == "small_resnet" else x
        path = tmp_path / f"{name}.onnx"
        result = snl_fx.export_onnx(model, xin, path, profile=profile)
        assert result.relu_count == snl_fx.relu_count(model, xin).total
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: xin.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, model(xin).numpy(), atol=1e-4, rtol=0)
