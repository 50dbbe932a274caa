"""passes.decompose_attention: SDPA and nn.MultiheadAttention as explicit ops, numerically the same."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils._pytree import tree_leaves

import snl_fx
from snl_fx import passes
from snl_fx.app.models import vit_tiny_fm

SDPA = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)


def attention_nodes(gm):
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.target in SDPA
            or (n.op == "call_module" and isinstance(modules[n.target], nn.MultiheadAttention))]


def softmaxes(gm):
    return [n for n in gm.graph.nodes if n.target is torch.softmax]


def check(model: nn.Module, *inputs: torch.Tensor, attentions: int = 1) -> torch.fx.GraphModule:
    """Decomposed == original within 1e-5; no attention call left; one softmax per attention; shapes on every node."""
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gm = passes.trace(model, inputs)
    assert len(attention_nodes(gm)) == attentions
    keys = set(gm.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = passes.decompose_attention(gm)
    assert out is gm and not attention_nodes(gm)
    assert len(softmaxes(gm)) == attentions
    assert set(gm.state_dict()) == keys  # parameters stay where they were
    assert all("type" in n.meta for n in gm.graph.nodes if n.op != "output")  # shapes recorded again
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.target in (torch.softmax, torch.matmul))
    with torch.no_grad():
        want, got = model(*inputs), gm(*inputs)
    for a, b in zip(tree_leaves(want), tree_leaves(got), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the caller's model untouched
    return gm


class Sdpa(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **self.kwargs)


class MaskedSdpa(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def qkv(length=5, source=6):
    return torch.randn(2, 3, length, 8), torch.randn(2, 3, source, 8), torch.randn(2, 3, source, 8)


def test_sdpa_without_mask():
    check(Sdpa(), *qkv())


def test_sdpa_with_bool_mask():
    mask = torch.rand(5, 6) > 0.5
    mask[:, 0] = True  # no row fully masked
    check(MaskedSdpa(), *qkv(), mask)


def test_sdpa_with_float_mask():
    check(MaskedSdpa(), *qkv(), torch.randn(2, 3, 5, 6))


@pytest.mark.parametrize("length, source", [(5, 5), (4, 6)])
def test_sdpa_causal(length, source):
    gm = check(Sdpa(is_causal=True), *qkv(length, source))
    assert set(gm.state_dict()) == set()  # the causal mask is a non-persistent buffer


def test_sdpa_custom_scale_and_dropout_in_eval():
    check(Sdpa(scale=0.3), *qkv())


class Mha(nn.Module):
    """Self-attention (x, x, x); the masks, when given, are buffers (get_attr nodes in the graph)."""

    def __init__(self, batch_first=True, need_weights=True, average=True, kdim=None, bias=True,
                 padding=None, mask=None, **call):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias)
        self.need_weights, self.average, self.call = need_weights, average, call
        self.register_buffer("padding", padding)
        self.register_buffer("mask", mask)

    def attend(self, x, kv):
        out, weights = self.mha(x, kv, kv, key_padding_mask=self.padding, attn_mask=self.mask,
                                need_weights=self.need_weights, average_attn_weights=self.average, **self.call)
        return (out, weights) if self.need_weights else out

    def forward(self, x):
        return self.attend(x, x)


class CrossMha(Mha):
    def forward(self, x, memory):
        return self.attend(x, memory)


class MaskedMha(Mha):
    """The attention mask as an input (a placeholder)."""

    def forward(self, x, mask):
        out, _ = self.mha(x, x, x, attn_mask=mask)
        return out


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights, average", [(True, True), (True, False), (False, True)])
def test_mha_self_attention(batch_first, need_weights, average):
    x = torch.randn(2, 5, 8) if batch_first else torch.randn(5, 2, 8)
    check(Mha(batch_first, need_weights, average), x)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch's own, for the mixed case
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_masks(batch_first, need_weights):
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = padding[2, 4] = True
    bool_mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    float_mask = torch.randn(3 * 2, 5, 5)
    check(Mha(batch_first, need_weights, padding=padding), x)
    check(Mha(batch_first, need_weights, mask=bool_mask), x)
    check(Mha(batch_first, need_weights, mask=float_mask), x)
    check(Mha(batch_first, need_weights, padding=padding, mask=float_mask), x)
    check(Mha(batch_first, need_weights, padding=padding.float() * -3, mask=bool_mask), x)
    check(Mha(batch_first, need_weights, mask=bool_mask, is_causal=True), x)
    check(MaskedMha(batch_first), x, torch.randn(5, 5))


@pytest.mark.parametrize("kdim", [None, 6])
def test_mha_cross_attention(kdim):
    x, memory = torch.randn(2, 4, 8), torch.randn(2, 7, kdim or 8)
    check(CrossMha(kdim=kdim), x, memory)
    check(CrossMha(kdim=kdim, bias=False, need_weights=False), x, memory)


def test_mha_it_cannot_rewrite_is_left_with_a_warning():
    model = Mha()
    model.mha = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
    x = torch.randn(2, 5, 8)
    gm = passes.trace(model.eval(), x)
    with pytest.warns(UserWarning, match="mha left as it is: mha uses add_bias_kv"):
        passes.decompose_attention(gm)
    assert len(attention_nodes(gm)) == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_torchvision_vision_transformer():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64)
    check(model, torch.randn(2, 3, 32, 32), attentions=2)


def test_zoo_vit():
    torch.manual_seed(0)
    model = vit_tiny_fm()
    gm = check(model, torch.randn(2, 1, 28, 28), attentions=4)
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert [n.name for n in softmaxes(gm)][0].startswith("scaled_dot_product_attention")


def test_inspector_sees_softmax_and_the_attention_matmuls():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64)
    report = snl_fx.relu_count(model, torch.randn(1, 3, 32, 32))
    tokens = 4 * 4 + 1
    matmuls = [layer for layer in report.linear if layer.op == "matmul"]
    assert len(matmuls) == 2 * 2  # q @ k^T and weights @ v, per layer
    assert {m.output for m in matmuls} == {2 * tokens * tokens, 2 * tokens * 16}  # heads x L x S; heads x L x d
    qkv = [layer for layer in report.linear if layer.name.endswith("self_attention_qkv")]
    assert [layer.weight for layer in qkv] == [3 * 32 * 32] * 2
    assert report.total == 0
    model_copy = copy.deepcopy(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model_copy.state_dict().values()))


def test_zoo_vit_has_no_relu_and_is_refused_by_linearize():
    model, x = vit_tiny_fm(), torch.randn(2, 1, 28, 28)
    assert snl_fx.relu_count(model, x).total == 0
    with pytest.raises(snl_fx.SnlFxError, match="has no ReLU call site to linearize"):
        snl_fx.linearize(model, x, 0.5)


def test_sdpa_in_the_torch_export_fallback():
    class Branchy(nn.Module):
        def forward(self, q, k, v):
            if q.shape[-1] > 4:  # shape-dependent: symbolic_trace fails, torch.export handles it
                q = q * 2
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    with pytest.warns(UserWarning, match="torch.export"):
        gm = check(Branchy(), *qkv(5, 5))
    assert not any(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in gm.graph.nodes)


def test_grouped_query_attention_is_left_with_a_warning():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    gm = passes.trace(Sdpa(enable_gqa=True), (q, k, v))
    with pytest.warns(UserWarning, match="left as it is: grouped-query"):
        passes.decompose_attention(gm)
    assert len(attention_nodes(gm)) == 1
