"""The graph passes: tracing, site discovery, de-inplacing, gating and lowering."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from conftest import ReluAsIdentity, Spellings, TinyCNN, dispatch_relus_per_sample

import snl_fx
from snl_fx import passes


def gated(model, x, granularity="pixel", skip=()):
    gm = passes.find_relus(passes.trace(model, x))
    return passes.insert_gates(passes.make_out_of_place(gm), granularity, skip)


def set_gates(gm, fn):
    for g in passes.gates(gm).values():
        g.weight.data = fn(g.weight)


def test_every_spelling_is_a_site():
    x = torch.randn(2, 4, 6, 6)
    gm = passes.find_relus(passes.trace(Spellings(), x))
    sites = passes.get_meta(gm).sites
    assert [s.op for s in sites] == [
        "nn.ReLU", "F.relu", "torch.relu", "Tensor.relu", "nn.ReLU", "F.relu", "torch.relu_", "Tensor.relu_",
    ]
    assert [s.inplace for s in sites] == [False, False, False, False, False, True, True, True]
    assert all(s.shape == (4, 6, 6) for s in sites)
    assert sites[0].name == "shared" and sites[4].name == "shared_1"
    assert sum(s.numel for s in sites) == 8 * 4 * 6 * 6 == dispatch_relus_per_sample(Spellings(), x)


@pytest.mark.parametrize("share_weights", [False, True])
def test_trace_leaves_caller_model_untouched(share_weights):
    model = TinyCNN().train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 1, 8, 8)
    x_copy = x.clone()
    gm = passes.trace(model, x, share_weights=share_weights)
    assert model.training and not gm.training
    assert all(m.training for m in model.modules())
    assert torch.equal(x, x_copy)  # the in-place ReLU ran on a clone
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm statistics not updated
    shared = {id(p) for p in model.parameters()} & {id(p) for p in gm.parameters()}
    assert len(shared) == (len(list(model.parameters())) if share_weights else 0)


def test_user_subclass_of_relu_is_found_and_relu6_is_not_a_site():
    class MyReLU(nn.ReLU):
        pass

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.pool = MyReLU(), nn.ReLU6(), nn.MaxPool2d(2)

        def forward(self, x):
            return self.pool(self.b(self.a(x))) + torch.clamp(x, min=0).sum()

    gm = passes.find_relus(passes.trace(M(), torch.randn(1, 2, 4, 4)))
    meta = passes.get_meta(gm)
    # clamp(min=0) computes a ReLU: a site, as the ONNX inspector counts its Clip(min=0) (snl_fx.relu_rule)
    assert [(s.op, s.numel) for s in meta.sites] == [("F.relu", 2 * 4 * 4), ("torch.clamp(min=0)", 2 * 4 * 4)]
    kinds = {o.kind: o.comparisons for o in meta.others}
    assert kinds == {"relu6": 2 * 4 * 4, "maxpool": 2 * 2 * 2 * (2 * 2 - 1)}


class EncoderThenRelu(nn.Module):
    """A leaf module that hides a ReLU (TransformerEncoderLayer), then one gateable F.relu."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)

    def forward(self, x):
        return F.relu(self.enc(x))


def test_relu_inside_leaf_module_is_reported_not_gated():
    gm = passes.find_relus(passes.trace(EncoderThenRelu(), torch.randn(2, 5, 8)))
    meta = passes.get_meta(gm)
    assert [s.numel for s in meta.sites] == [5 * 8]
    assert [(u.name, u.relus) for u in meta.ungateable] == [("enc", 5 * 16)]


def test_untraceable_model_names_the_line():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: nothing can trace this
                return torch.relu(x)
            return x

    with pytest.raises(passes.PassError, match=r"test_passes.py:\d+: if x.sum\(\) > 0"):
        passes.trace(Branchy(), torch.randn(1, 3))


def test_shape_dependent_branch_falls_back_to_torch_export():
    class ShapeBranch(nn.Module):
        def forward(self, x):
            if x.shape[1] > 2:
                return torch.relu(x) * 2
            return x

    x = torch.randn(2, 3, 4)
    with pytest.warns(UserWarning, match="torch.export"):
        gm = passes.find_relus(passes.trace(ShapeBranch(), x))
    assert [s.numel for s in passes.get_meta(gm).sites] == [3 * 4]


@pytest.mark.parametrize("granularity", ["pixel", "channel"])
@pytest.mark.parametrize("name", ["resnet18", "googlenet", "densenet121"])
def test_all_open_is_original_and_all_closed_is_identity(name, granularity):
    torch.manual_seed(0)
    kwargs = {"init_weights": False, "aux_logits": False} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=5, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = gated(model, x, granularity).eval()
    n_gates = len(passes.gates(gm))
    assert n_gates == len(passes.get_meta(gm).sites) == {"resnet18": 17, "googlenet": 57, "densenet121": 121}[name]
    assert torch.allclose(gm(x), model(x), atol=1e-5)

    set_gates(gm, torch.zeros_like)
    with torch.no_grad(), ReluAsIdentity():
        expected = model(x)
    assert torch.allclose(gm(x), expected, atol=1e-4)


def test_gradients_match_with_open_gates(tiny_cnn):
    x = torch.randn(4, 1, 8, 8)
    gm = gated(tiny_cnn, x).train()
    model = copy.deepcopy(tiny_cnn).train()
    gm(x).square().sum().backward()
    model(x).square().sum().backward()
    assert torch.allclose(gm.get_submodule("conv1").weight.grad, model.conv1.weight.grad, atol=1e-5)


def test_inplace_trap_is_linearized_correctly():
    class Trap(nn.Module):
        def forward(self, x):
            y = torch.relu_(x)
            return x + y

    x = torch.randn(3, 10)
    gm = gated(Trap(), x)
    assert torch.allclose(gm(x.clone()), Trap()(x.clone()))  # all open: 2*relu(x)
    mask = torch.rand(10) > 0.5
    set_gates(gm, lambda w: mask.float())
    expected = torch.where(mask, torch.relu(x), x) * 2
    assert torch.allclose(gm(x.clone()), expected)
    lowered = passes.lower_gates(copy.deepcopy(gm))
    assert torch.allclose(lowered(x.clone()), expected)


@pytest.mark.parametrize("granularity", ["pixel", "channel"])
def test_lowered_equals_gated_and_structure(granularity):
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(3, 3, 32, 32)
    gm = gated(model, x, granularity).eval()
    gate_list = list(passes.gates(gm).values())
    set_gates(gm, lambda w: (torch.rand_like(w) > 0.5).float())
    gate_list[0].weight.data.fill_(1.0)  # one site all kept -> plain ReLU
    gate_list[1].weight.data.fill_(0.0)  # one site none kept -> removed
    kept = passes.kept_counts(gm)
    lowered = passes.lower_gates(copy.deepcopy(gm))
    assert (lowered(x) - gm(x)).abs().max() <= 1e-5
    modules = [lowered.get_submodule(n.target) for n in lowered.graph.nodes if n.op == "call_module"]
    assert not any(isinstance(m, passes.Gate) for m in modules)
    assert sum(isinstance(m, nn.ReLU) for m in modules) == 1
    assert sum(isinstance(m, passes.PartialReLU) for m in modules) == 17 - 2
    assert dispatch_relus_per_sample(lowered, x) == sum(kept.values())


def test_gate_state_roundtrips(tiny_cnn):
    x = torch.randn(2, 1, 8, 8)
    gm = gated(tiny_cnn, x, "channel")
    assert passes.gates(gm)["act"].weight.shape == (4, 1, 1)
    set_gates(gm, torch.rand_like)
    clone = copy.deepcopy(gm)
    assert torch.equal(clone(x), gm(x))
    fresh = gated(tiny_cnn, x, "channel")
    fresh.load_state_dict(gm.state_dict())
    assert torch.equal(fresh(x), gm(x))
    assert any("snl_gates.act.weight" == k for k in gm.state_dict())


def test_skip_leaves_site_as_plain_relu(tiny_cnn):
    x = torch.randn(2, 1, 8, 8)
    gm = gated(tiny_cnn, x, skip=["act"])
    assert list(passes.gates(gm)) == ["relu"]
    set_gates(gm, torch.zeros_like)
    assert dispatch_relus_per_sample(gm, x) == 4 * 8 * 8  # the gated site runs no aten.relu
    assert passes.site_counts(gm) == {"act": 4 * 8 * 8, "relu": 0}
    assert passes.site_counts(gm, None) == {"act": 4 * 8 * 8, "relu": 4 * 8 * 8}


def test_lowering_refuses_soft_gates(tiny_cnn):
    x = torch.randn(2, 1, 8, 8)
    gm = gated(tiny_cnn, x)
    set_gates(gm, lambda w: torch.full_like(w, 0.5))
    with pytest.raises(passes.PassError, match="not binary"):
        passes.lower_gates(gm)


# --- relu_count on every spelling (the inspector over the passes) ------------------------------
class OneCall(nn.Module):
    """Applies ``fn`` once; modules given to it become submodules, so they are traced as call sites."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x + 1)


class MyReLU(nn.ReLU):
    """A user subclass of nn.ReLU."""


SPELLINGS = {
    "nn.ReLU": (nn.ReLU(), "nn.ReLU"),
    "nn.ReLU(inplace=True)": (nn.ReLU(inplace=True), "nn.ReLU"),
    "subclass of nn.ReLU": (MyReLU(), "F.relu"),
    "F.relu": (lambda x: F.relu(x), "F.relu"),
    "F.relu(inplace=True)": (lambda x: F.relu(x, inplace=True), "F.relu"),
    "F.relu(x, True)": (lambda x: F.relu(x, True), "F.relu"),
    "F.relu(input=x)": (lambda x: F.relu(input=x), "F.relu"),
    "F.relu_": (lambda x: F.relu_(x), "torch.relu_"),  # F.relu_ is torch.relu_: one function
    "torch.relu": (lambda x: torch.relu(x), "torch.relu"),
    "torch.relu(input=x)": (lambda x: torch.relu(input=x), "torch.relu"),
    "torch.relu_": (lambda x: torch.relu_(x), "torch.relu_"),
    "Tensor.relu": (lambda x: x.relu(), "Tensor.relu"),
    "Tensor.relu_": (lambda x: x.relu_(), "Tensor.relu_"),
}


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_relu_count_of_each_spelling(spelling):
    fn, op = SPELLINGS[spelling]
    model = OneCall(fn)
    x = torch.randn(2, 4, 6, 6)
    report = snl_fx.relu_count(model, x)
    assert report.total == 4 * 6 * 6 == dispatch_relus_per_sample(model, x)
    assert [(s.op, s.shape) for s in report.sites] == [(op, (4, 6, 6))]
    assert (report.relu_layers, report.relu_depth) == (1, 1)


def test_relu_count_of_all_spellings_and_a_module_reused_at_two_sites():
    x = torch.randn(3, 4, 6, 6)
    report = snl_fx.relu_count(Spellings(), x)
    assert report.total == 8 * 4 * 6 * 6 == dispatch_relus_per_sample(Spellings(), x)
    assert [s.name for s in report.sites if s.op == "nn.ReLU"] == ["shared", "shared_1"]
    assert report.relu_depth == 8


def test_relu_count_leaves_out_relus_inside_leaf_modules():
    report = snl_fx.relu_count(EncoderThenRelu(), torch.randn(2, 5, 8))
    assert report.total == 5 * 8  # the gateable F.relu only
    assert report.ungateable == [{"name": "enc", "module_type": "TransformerEncoderLayer", "relus": 5 * 16}]
    assert f"not gateable: enc (TransformerEncoderLayer) computes {5 * 16:,} ReLUs" in report.table()


def test_relu_count_of_a_model_without_relu():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 2), nn.Sigmoid())
    x = torch.randn(2, 3, 5, 5)
    report = snl_fx.relu_count(model, x)
    assert (report.total, report.sites, report.relu_layers, report.relu_depth) == (0, [], 0, 0)
    assert dispatch_relus_per_sample(model, x) == 0
    assert report.other_totals() == {"gelu": 4 * 5 * 5, "sigmoid": 2}
    assert report.to_dict()["total"] == 0
    assert "total: 0 ReLUs per sample" in report.table()


def test_data_dependent_op_gets_shapes_from_a_real_run():
    class Nonzero(nn.Module):
        def forward(self, x):
            k = torch.nonzero(x > 0).shape[0]  # output size depends on values: fake tensors cannot follow
            return torch.relu(x) * k

    x = torch.randn(2, 3, 5)
    report = snl_fx.relu_count(Nonzero(), x)
    assert report.total == 3 * 5 == dispatch_relus_per_sample(Nonzero(), x)


def test_failing_model_names_the_node_in_one_line():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU())
    with pytest.raises(passes.PassError) as info:
        snl_fx.relu_count(model, torch.randn(2, 13))
    assert "failed at %_1 : " in str(info.value) and "\n" not in str(info.value)
