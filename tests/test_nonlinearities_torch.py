"""Every non-ReLU nonlinearity a private-inference bill pays for, in every spelling FX gives.

Counts per sample (elements of the output; rows for softmax, LayerNorm and RMSNorm) are checked
against an independent oracle: a TorchDispatchMode that counts the output elements of the ATen
ops of a real forward (grad enabled, as ``passes.count_aten_relus`` runs, so that no fused fast
path hides an op), and follows which tensors a batched input flows into.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict

import pytest
import torch
import torch.nn as nn
import torch.nn.attention
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import snl_fx
from snl_fx import passes
from snl_fx.inspect.torch_model import report_from_graph

aten = torch.ops.aten

# the oracle's table: ATen overload -> kind; independent of snl_fx.passes.spellings
_ORACLE_KINDS = {
    aten.gelu.default: "gelu",
    aten.gelu_.default: "gelu",
    aten.silu.default: "silu",
    aten.silu_.default: "silu",  # nn.SiLU(inplace=True), as in EfficientNet
    aten.sigmoid.default: "sigmoid",
    aten.sigmoid_.default: "sigmoid",
    aten.tanh.default: "tanh",
    aten.tanh_.default: "tanh",
    aten._softmax.default: "softmax",
    aten._safe_softmax.default: "softmax",
    aten._log_softmax.default: "softmax",
    aten.native_layer_norm.default: "layernorm",
    aten.exp.default: "exp",
    aten.exp_.default: "exp",
    aten.div.Tensor: "div",
    aten.div_.Tensor: "div",
    aten.reciprocal.default: "div",  # 2.0 / x reaches the dispatcher as x.reciprocal() * 2.0
    aten.mul.Tensor: "mul",
    aten.mul_.Tensor: "mul",
}


def _is_weight(value) -> bool:
    """A tensor of more than one element (a weight): the server's weights are secret-shared."""
    return isinstance(value, torch.Tensor) and value.numel() > 1


class _Oracle(TorchDispatchMode):
    """Output elements and row lengths of each nonlinear ATen op whose inputs a batched input flows into."""

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.keep = list(inputs)  # held, so that no id is reused meanwhile
        self.secret = {id(t) for t in inputs}
        self.elements: dict[str, int] = defaultdict(int)
        self.rows: dict[str, set[int]] = defaultdict(set)
        self.quiet = 0  # inside an op counted at the function level (rms_norm)

    def _is_secret(self, value) -> bool:
        return isinstance(value, torch.Tensor) and id(value) in self.secret

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tainted = any(self._is_secret(a) for a in tree_leaves((args, kwargs)))
        if not tainted:
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in self.secret:
                self.secret.add(id(t))
                self.keep.append(t)
        if func._schema.is_mutable and args and isinstance(args[0], torch.Tensor):
            self.secret.add(id(args[0]))
            self.keep.append(args[0])
        kind = _ORACLE_KINDS.get(func)
        if kind is None or self.quiet:
            return out
        if kind == "div" and func is not aten.reciprocal.default and not self._is_secret(args[1]):
            return out
        if kind == "mul" and not ((self._is_secret(args[0]) and (self._is_secret(args[1]) or _is_weight(args[1])))
                                  or (self._is_secret(args[1]) and _is_weight(args[0]))):
            return out  # a product counts with a per-sample factor and another, or a weight (secret-shared)
        if kind == "gelu" and kwargs.get("approximate", "none") == "tanh":
            kind = "gelu_tanh"
        first = out[0] if isinstance(out, (tuple, list)) else out
        self.elements[kind] += first.numel()
        if kind == "softmax":
            self.rows[kind].add(args[0].shape[args[1]])
        elif kind == "layernorm":
            self.rows[kind].add(math.prod(args[1]))
        return out


class _RmsNormCounter(TorchFunctionMode):
    """RMSNorm has no ATen kernel of its own on CPU (it decomposes into pow, mean, rsqrt, mul):
    count it where it is called, and keep its inner ops out of the dispatch counts."""

    def __init__(self, oracle: _Oracle) -> None:
        super().__init__()
        self.oracle = oracle

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in (F.rms_norm, torch.rms_norm):
            return func(*args, **kwargs)
        self.oracle.quiet += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.oracle.quiet -= 1
        if self.oracle._is_secret(args[0]):
            self.oracle.elements["rmsnorm"] += out.numel()
            shape = kwargs.get("normalized_shape", args[1] if len(args) > 1 else None)
            self.oracle.rows["rmsnorm"].add(math.prod([shape] if isinstance(shape, int) else shape))
        return out


def oracle(model: nn.Module, *inputs: torch.Tensor) -> tuple[dict[str, int], dict[str, set[int]]]:
    """Per-sample elements and the row lengths of each kind, counted at the dispatcher."""
    batch = inputs[0].shape[0]
    inputs = tuple(t.clone() for t in inputs)
    counter = _Oracle(list(inputs))
    was_training = model.training
    model.eval()
    try:
        # the math kernel of scaled_dot_product_attention: fused kernels hide the softmax
        with torch.enable_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), \
                counter, _RmsNormCounter(counter):
            model(*inputs)
    finally:
        model.train(was_training)
    assert all(n % batch == 0 for n in counter.elements.values())
    return {k: n // batch for k, n in counter.elements.items()}, dict(counter.rows)


def count(model: nn.Module, *inputs: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torch.export fallback says it was taken
        return snl_fx.relu_count(model, inputs[0] if len(inputs) == 1 else inputs)


def rows(report) -> dict[str, set[int]]:
    found: dict[str, set[int]] = defaultdict(set)
    for o in report.others:
        if o.row is not None:
            found[o.kind].add(o.row)
    return dict(found)


# --- a tiny MLP with each activation in each spelling ----------------------------------------
class Act(nn.Module):
    """Linear(6, 16) -> the activation -> Linear(16, 4); ``branch`` adds a shape-dependent branch
    that symbolic_trace cannot follow, so the graph comes from torch.export in ATen ops."""

    def __init__(self, act, branch: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 4)
        self.act = act if isinstance(act, nn.Module) else None
        self.fn = None if isinstance(act, nn.Module) else act
        self.branch = branch

    def forward(self, x):
        h = self.fc1(x)
        if self.branch and x.shape[0] > 0:
            h = h + 0
        return self.fc2(self.act(h) if self.act is not None else self.fn(h))


W = 16  # the activation's width
SPELLINGS = [
    # (id, activation, kind, row)
    ("nn.GELU", lambda: nn.GELU(), "gelu", None),
    ("F.gelu", lambda: F.gelu, "gelu", None),
    ("F.gelu(none)", lambda: lambda h: F.gelu(h, approximate="none"), "gelu", None),
    ("nn.GELU(tanh)", lambda: nn.GELU(approximate="tanh"), "gelu_tanh", None),
    ("F.gelu(tanh)", lambda: lambda h: F.gelu(h, approximate="tanh"), "gelu_tanh", None),
    ("nn.SiLU", lambda: nn.SiLU(), "silu", None),
    ("F.silu", lambda: F.silu, "silu", None),
    ("nn.Sigmoid", lambda: nn.Sigmoid(), "sigmoid", None),
    ("torch.sigmoid", lambda: torch.sigmoid, "sigmoid", None),
    ("F.sigmoid", lambda: F.sigmoid, "sigmoid", None),
    ("Tensor.sigmoid", lambda: lambda h: h.sigmoid(), "sigmoid", None),
    ("torch.special.expit", lambda: torch.special.expit, "sigmoid", None),
    ("nn.Tanh", lambda: nn.Tanh(), "tanh", None),
    ("torch.tanh", lambda: torch.tanh, "tanh", None),
    ("F.tanh", lambda: F.tanh, "tanh", None),
    ("Tensor.tanh", lambda: lambda h: h.tanh(), "tanh", None),
    ("nn.Softmax(-1)", lambda: nn.Softmax(dim=-1), "softmax", W),
    ("nn.Softmax(1)", lambda: nn.Softmax(1), "softmax", W),
    ("nn.LogSoftmax", lambda: nn.LogSoftmax(dim=1), "softmax", W),
    ("F.softmax", lambda: lambda h: F.softmax(h, dim=-1), "softmax", W),
    ("torch.softmax", lambda: lambda h: torch.softmax(h, 1), "softmax", W),
    ("F.log_softmax", lambda: lambda h: F.log_softmax(h, -1), "softmax", W),
    ("Tensor.softmax", lambda: lambda h: h.softmax(-1), "softmax", W),
    ("Tensor.softmax(dim=)", lambda: lambda h: h.softmax(dim=1), "softmax", W),
    ("Tensor.log_softmax", lambda: lambda h: h.log_softmax(-1), "softmax", W),
    ("torch.log_softmax", lambda: lambda h: torch.log_softmax(h, dim=1), "softmax", W),
    ("nn.Softmin", lambda: nn.Softmin(dim=1), "softmax", W),
    ("F.softmin", lambda: lambda h: F.softmin(h, -1), "softmax", W),
    ("nn.Softmax(None)", lambda: nn.Softmax(), "softmax", W),  # legacy implicit dim: 1 for 2-d input
    ("nn.LayerNorm", lambda: nn.LayerNorm(W), "layernorm", W),
    ("F.layer_norm", lambda: lambda h: F.layer_norm(h, (W,)), "layernorm", W),
    ("F.layer_norm(kw)", lambda: lambda h: F.layer_norm(h, normalized_shape=[W]), "layernorm", W),
    ("torch.layer_norm", lambda: lambda h: torch.layer_norm(h, [W]), "layernorm", W),
    ("nn.RMSNorm", lambda: nn.RMSNorm(W), "rmsnorm", W),
    ("F.rms_norm", lambda: lambda h: F.rms_norm(h, (W,)), "rmsnorm", W),
    ("torch.rms_norm", lambda: lambda h: torch.rms_norm(h, [W]), "rmsnorm", W),
    ("torch.exp", lambda: torch.exp, "exp", None),
    ("Tensor.exp", lambda: lambda h: h.exp(), "exp", None),
]


@pytest.mark.parametrize("path", ["fx", "export"])
@pytest.mark.parametrize("make, kind, row", [s[1:] for s in SPELLINGS], ids=[s[0] for s in SPELLINGS])
def test_each_spelling_counts_its_kind_as_the_dispatcher_does(make, kind, row, path):
    model = Act(make(), branch=path == "export")
    x1, x3 = torch.randn(1, 6), torch.randn(3, 6)
    one, three = count(model, x1), count(model, x3)
    assert one.other_totals() == three.other_totals() == {kind: W}
    assert one.others == three.others  # names, shapes, counts and rows whatever the batch
    assert [o.row for o in one.others] == [row]
    assert one.total == 0 and one.sites == []
    elements, oracle_rows = oracle(model, x3)
    assert elements == {kind: W}
    if row is not None:
        assert oracle_rows == {kind: {row}}
    assert f"other nonlinearity (not counted above): {kind}: {W:,} elements per sample" in one.table()


class Rows3d(nn.Module):
    """Softmax and norms over (batch, 5, 6) tokens: the row follows the dim, negative or not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.ln, self.rms = nn.LayerNorm([5, 8]), nn.RMSNorm(8)
        self.sm = nn.Softmax(dim=-2)

    def forward(self, x):
        h = self.fc(x)
        return (torch.softmax(h, dim=1) + h.softmax(-1) + self.sm(h) + F.log_softmax(h, dim=2)
                + self.ln(h) + self.rms(h) + F.layer_norm(h, (8,)))


@pytest.mark.parametrize("batch", [1, 3])
def test_rows_follow_the_dim_and_the_normalized_shape(batch):
    x = torch.randn(batch, 5, 6)
    report = count(Rows3d(), x)
    got = [(o.kind, o.row, o.comparisons) for o in report.others]
    assert got == [("softmax", 5, 40), ("softmax", 8, 40), ("softmax", 5, 40), ("softmax", 8, 40),
                   ("layernorm", 5 * 8, 40), ("rmsnorm", 8, 40), ("layernorm", 8, 40)]
    elements, oracle_rows = oracle(Rows3d(), x)
    assert elements == report.other_totals() == {"softmax": 4 * 40, "layernorm": 2 * 40, "rmsnorm": 40}
    assert oracle_rows == rows(report) == {"softmax": {5, 8}, "layernorm": {40, 8}, "rmsnorm": {8}}


# --- products and divisions: only secret x secret, and division by a secret -------------------
class Arith(nn.Module):
    def __init__(self, branch: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.w = nn.Parameter(torch.rand(16) + 1)
        self.one = nn.Parameter(torch.ones(1))  # a one-element weight: a scale, free
        self.branch = branch

    def forward(self, x):
        h = self.fc(x)
        if self.branch and x.shape[0] > 0:
            h = h + 0
        a, b = torch.tanh(h), torch.sigmoid(h)
        free = a * 2.0 + a / 2.0 + h / self.w + 3.0 * a + torch.mul(a, 0.5) + a.div(4.0) + h * self.one
        free = free + self.w * self.w.exp()  # weights only: not per sample, and free
        muls = a * b + torch.mul(a, b) + a.mul(b) + h * h + torch.multiply(a, b) + h * self.w  # w: a weight, secret
        divs = a / b + torch.div(a, b) + a.div(b) + torch.true_divide(a, b) + 2.0 / b + b.reciprocal()
        return free + muls + divs


@pytest.mark.parametrize("path", ["fx", "export"])
def test_secret_products_and_divisions_count_and_scales_do_not(path):
    model = Arith(branch=path == "export")
    one, three = count(model, torch.randn(1, 6)), count(model, torch.randn(3, 6))
    expected = {"tanh": W, "sigmoid": W, "mul": 6 * W, "div": 6 * W}
    assert one.other_totals() == three.other_totals() == expected
    assert one.others == three.others
    elements, _ = oracle(model, torch.randn(3, 6))
    assert elements == expected
    assert any("exp" in note for note in one.notes)  # exp of a weight: named, not per sample


def test_a_nonlinearity_on_weights_alone_is_not_per_sample():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.w = nn.Linear(4, 8), nn.Parameter(torch.randn(8))

        def forward(self, x):
            return self.fc(x) * F.softmax(self.w, 0) + F.layer_norm(self.w, (8,)) + torch.exp(self.w) / self.w

    gm = passes.find_relus(passes.trace(M(), torch.randn(2, 4)))
    meta = passes.get_meta(gm)
    assert [(o.kind, o.comparisons) for o in meta.others] == [("mul", 8)]  # fc(x) times a weight-derived tensor: secret
    assert [(c.kind, c.comparisons, c.row) for c in meta.constant] == [("softmax", 8, 8), ("layernorm", 8, 8), ("exp", 8, None)]


# --- torchvision models -----------------------------------------------------------------------
def _compare(model, x_small, x_big, kinds=None):
    one, three = count(model, x_small), count(model, x_big)
    assert one.others == three.others
    elements, oracle_rows = oracle(model, x_big)
    got = one.other_totals()
    if kinds is not None:
        elements = {k: v for k, v in elements.items() if k in kinds}
        got = {k: v for k, v in got.items() if k in kinds}
        oracle_rows = {k: v for k, v in oracle_rows.items() if k in kinds}
    assert got == elements
    assert {k: v for k, v in rows(one).items() if kinds is None or k in kinds} == oracle_rows
    return one


def test_efficientnet_b0_silu_sigmoid_and_excitation_products():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.efficientnet_b0(num_classes=10).eval()
    report = _compare(model, torch.randn(1, 3, 64, 64), torch.randn(3, 3, 64, 64), {"silu", "sigmoid", "mul"})
    totals = report.other_totals()
    assert totals["silu"] > 0 and totals["sigmoid"] > 0 and totals["mul"] > 0
    assert sum(o.kind == "sigmoid" for o in report.others) == 16  # one squeeze-excitation per MBConv block
    assert sum(o.kind == "mul" for o in report.others) == 16  # its scale * input


class ConvNeXtBlock(nn.Module):
    """A ConvNeXt block as torchvision writes it: depthwise conv, LayerNorm over channels-last,
    Linear, GELU, Linear, a layer scale (a product with a secret weight), a residual; then a LayerNorm2d-style
    F.layer_norm on permuted channels."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))
        self.dim = dim

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.fc2(self.act(self.fc1(self.ln(h)))).permute(0, 3, 1, 2)
        y = x + self.scale * h
        return F.layer_norm(y.permute(0, 2, 3, 1), (self.dim,)).permute(0, 3, 1, 2)


def test_convnext_block_gelu_and_layernorm():
    model = ConvNeXtBlock()
    report = _compare(model, torch.randn(1, 16, 8, 8), torch.randn(3, 16, 8, 8))
    assert report.other_totals() == {"layernorm": 2 * 16 * 8 * 8, "gelu": 64 * 8 * 8, "mul": 16 * 8 * 8}  # layer scale
    assert rows(report) == {"layernorm": {16}}


def test_torchvision_convnext_tiny():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.convnext_tiny(num_classes=10).eval()
    report = _compare(model, torch.randn(1, 3, 64, 64), torch.randn(3, 3, 64, 64), {"layernorm", "gelu", "mul", "div"})
    totals = report.other_totals()
    assert set(totals) == {"layernorm", "gelu", "avgpool", "mul"}  # layer scales: products with secret weights
    assert sum(o.kind == "gelu" for o in report.others) == 3 + 3 + 9 + 3
    assert rows(report)["layernorm"] == {96, 192, 384, 768}


def _small_vit():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10).eval()


SEQ = (32 // 8) ** 2 + 1  # patches + class token


def test_small_vit_gelu_and_layernorm():
    model = _small_vit()
    report = _compare(model, torch.randn(1, 3, 32, 32), torch.randn(3, 3, 32, 32), {"gelu", "layernorm"})
    totals = report.other_totals()
    assert totals["gelu"] == 2 * SEQ * 64 and totals["layernorm"] == (2 * 2 + 1) * SEQ * 32
    assert rows(report)["layernorm"] == {32}


def test_small_vit_softmax_after_decompose_attention():
    """nn.MultiheadAttention hides its softmax from FX until passes.decompose_attention writes it out."""
    if not hasattr(passes, "decompose_attention"):
        pytest.skip("passes.decompose_attention has not landed")
    model = _small_vit()
    one, three = (count(model, torch.randn(batch, 3, 32, 32)) for batch in (1, 3))
    assert one.others == three.others
    explicit = passes.find_relus(passes.decompose_attention(passes.trace(model, torch.randn(3, 3, 32, 32))))
    assert report_from_graph(explicit, "VisionTransformer").others == one.others  # relu_count runs the pass
    elements, oracle_rows = oracle(model, torch.randn(3, 3, 32, 32))
    totals = one.other_totals()
    assert totals["softmax"] == elements["softmax"] == 2 * 2 * SEQ * SEQ  # layers x heads x queries x keys
    assert rows(one)["softmax"] == oracle_rows["softmax"] == {SEQ}
    assert sum(o.kind == "softmax" for o in one.others) == 2
    assert {k: totals[k] for k in ("gelu", "layernorm")} == {k: elements[k] for k in ("gelu", "layernorm")}
    assert "mul" not in totals and "div" not in totals  # the scale is a Python number: free


class PreActivation(nn.Module):
    """conv-BN-ReLU (the BatchNorm folds into the conv) and a BatchNorm after an add (it cannot)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.c1(x)))
        return self.fc(torch.relu(self.bn2(self.c2(h) + h)).flatten(1))


@pytest.mark.parametrize("profile", ["pi", "default"])
def test_a_batchnorm_that_cannot_fold_is_a_secret_product_in_both_inspectors(tmp_path, profile):
    model, x = PreActivation().eval(), torch.randn(2, 2, 8, 8)
    assert snl_fx.relu_count(model, x).other_totals() == {"mul": 4 * 8 * 8}
    path = tmp_path / "m.onnx"
    snl_fx.export_onnx(model, x[:1], path, profile=profile)
    assert snl_fx.relu_count(str(path)).other_totals() == {"mul": 4 * 8 * 8}
