"""Models users bring today (timm, torchvision, HuggingFace transformers built from a config, random
weights, nothing downloaded): every nonlinearity the inspector reports equals the dispatch-level
oracle of ``test_nonlinearities_torch`` per kind, at batch 1 and 2, softmax included (found inside
SDPA or eager attention); and ``pi_cost`` names what it leaves unpriced.

timm and transformers are the optional extra ``hf`` (``pip install -e .[hf]``; scripts/setup.sh
installs it); without them those models are skipped.
"""

from __future__ import annotations

import pytest
import torch

import snl_fx
from test_nonlinearities_torch import _ORACLE_KINDS, count, oracle, rows

ORACLE_KINDS = set(_ORACLE_KINDS.values())  # kinds the oracle counts; "avgpool" is checked apart


def _timm():
    return pytest.importorskip("timm")


def _transformers():
    return pytest.importorskip("transformers")


def vit_tiny():
    model = _timm().create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10)
    return model, lambda b: (torch.randn(b, 3, 32, 32),), {"softmax": 12, "seq": (32 // 4) ** 2 + 1}


def efficientnet_b0():
    model = _timm().create_model("efficientnet_b0", pretrained=False, num_classes=10)
    return model, lambda b: (torch.randn(b, 3, 64, 64),), {}


def convnext_atto():
    model = _timm().create_model("convnext_atto", pretrained=False, num_classes=10)
    return model, lambda b: (torch.randn(b, 3, 64, 64),), {}


def torchvision_vit():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    return model, lambda b: (torch.randn(b, 3, 32, 32),), {"softmax": 2, "seq": (32 // 4) ** 2 + 1}


def _bert_config(impl: str):
    return _transformers().BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, attn_implementation=impl)


def _vit_config(impl: str):
    return _transformers().ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, num_labels=10,
                                     attn_implementation=impl)


def _ids(b):
    return (torch.randint(0, 100, (b, 16), dtype=torch.int64),)


def _hf(cls_name: str, config, inputs, seq: int):
    model = getattr(_transformers(), cls_name)(config)
    impl = config._attn_implementation
    assert model.config._attn_implementation == impl  # the attention path asked for is the one run
    return model, inputs, {"softmax": 2, "seq": seq}


HF = {
    f"hf-{cls}-{impl}": (lambda cls=cls, impl=impl, make=make, inputs=inputs, seq=seq: _hf(cls, make(impl), inputs, seq))
    for impl in ("sdpa", "eager")
    for cls, make, inputs, seq in (
        ("BertModel", _bert_config, _ids, 16),
        ("BertForSequenceClassification", _bert_config, _ids, 16),
        ("ViTModel", _vit_config, lambda b: (torch.randn(b, 3, 32, 32),), (32 // 8) ** 2 + 1),
        ("ViTForImageClassification", _vit_config, lambda b: (torch.randn(b, 3, 32, 32),), (32 // 8) ** 2 + 1),
    )
}
MODELS = {
    "timm-vit_tiny_patch16_224": vit_tiny,
    "timm-efficientnet_b0": efficientnet_b0,
    "timm-convnext_atto": convnext_atto,
    "torchvision-VisionTransformer": torchvision_vit,
    **HF,
}


def _avgpool_per_sample(name: str, model) -> int | None:
    """Average-pool output elements per sample, from the architecture (the oracle has no pooling)."""
    if name == "timm-efficientnet_b0":  # one 1x1 squeeze-excitation mean per MBConv block, then the head's
        se = [m for n, m in model.named_modules() if n.endswith(".se")]
        return sum(m.conv_reduce.in_channels for m in se) + model.num_features
    if name == "timm-convnext_atto":
        return model.num_features  # the head's global average pool
    return None


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def counted(request):
    """(name, model, inputs, expectations, report at batch 1, report at batch 2)."""
    torch.manual_seed(0)
    model, inputs, expect = MODELS[request.param]()
    model.eval()
    return request.param, model, inputs, expect, count(model, *inputs(1)), count(model, *inputs(2))


def test_per_kind_counts_equal_the_dispatch_oracle_at_batch_1_and_2(counted):
    name, model, inputs, expect, one, two = counted
    assert one.other_totals() == two.other_totals()
    assert one.others == two.others  # names, shapes, counts and rows whatever the batch
    elements, oracle_rows = oracle(model, *inputs(2))
    totals = one.other_totals()
    assert {k: v for k, v in totals.items() if k in ORACLE_KINDS} == elements
    assert set(totals) - ORACLE_KINDS == ({"avgpool"} if _avgpool_per_sample(name, model) else set())
    if "avgpool" in totals:
        assert totals["avgpool"] == _avgpool_per_sample(name, model)
    got_rows = rows(one)
    assert {k: got_rows[k] for k in ("softmax", "layernorm") if k in got_rows} == \
        {k: oracle_rows[k] for k in ("softmax", "layernorm") if k in oracle_rows}
    assert one.total == 0 and one.sites == []  # none of these has a ReLU


def test_attention_softmax_is_found(counted):
    """One softmax site per attention layer, over rows of the sequence length (SDPA or eager)."""
    name, model, inputs, expect, one, two = counted
    if "softmax" not in expect:
        pytest.skip("no attention")
    softmaxes = [o for o in one.others if o.kind == "softmax"]
    assert len(softmaxes) == expect["softmax"]
    assert {o.row for o in softmaxes} == {expect["seq"]}


@pytest.mark.parametrize("protocol", ["crypten", "spu-semi2k", "spu-cheetah", "delphi"])
def test_pi_cost_names_each_unpriced_kind_and_says_lower_bound(counted, protocol):
    """Whatever a protocol does not price is listed by name and the totals say "at least". The
    measured protocols price more kinds as their coefficients land; delphi (literature, ReLUs
    only) prices none of these models' nonlinearities, so there every kind must be named."""
    name, model, inputs, expect, one, two = counted
    cost = snl_fx.pi_cost(one, protocol=protocol)
    kinds = set(one.other_totals())
    assert kinds <= {la.kind for la in cost.layers}  # no kind left out of the bill's layers
    unpriced = {u["kind"] for u in cost.unpriced}
    for kind in kinds - unpriced:  # a priced kind has bytes and rounds on every one of its layers
        assert all(la.bytes is not None and la.rounds is not None for la in cost.layers if la.kind == kind)
    if protocol == "delphi":
        assert kinds <= unpriced
    assert cost.complete == (not unpriced)
    if unpriced:
        line = cost.lower_bound()
        assert line.startswith("lower bound:") and all(kind in line for kind in unpriced)
        assert "at least" in cost.headline()


class DefaultedAttention(torch.nn.Module):
    """timm's ``VisionTransformer.forward(x, attn_mask=None, is_causal=False)`` in small: the flags
    are forward parameters the caller leaves at their defaults."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x, attn_mask=None, is_causal=False):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4).unbind(0)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


@pytest.mark.parametrize("batch", [1, 2])
def test_forward_defaults_left_out_are_traced_as_their_values(batch):
    """Unsupplied plain defaults are specialised (passes.trace): the SDPA's is_causal is then a
    constant, so decompose_attention writes its softmax out."""
    model, x = DefaultedAttention().eval(), torch.randn(batch, 5, 8)
    report = count(model, x)
    assert report.other_totals() == oracle(model, x)[0] == {"softmax": 2 * 5 * 5}
    assert rows(report) == {"softmax": {5}}


class DefaultedFlag(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

    def forward(self, x, flag=False, mask=None):
        h = torch.relu(self.a(x))
        return h if flag else self.b(h if mask is None else h * mask)


def test_specialised_defaults_leave_no_asserts_to_break_onnx_export(tmp_path):
    """FX's checks on the specialised values (``flag == False``) are erased: TorchScript's ONNX
    exporter cannot trace them, and they would make the train graph look different."""
    import warnings

    model, x = DefaultedFlag().eval(), torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "different graph in train mode"
        gm = snl_fx.passes.trace(model, x)
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "assert" in str(n.target)]
    assert torch.equal(gm(x), model(x))
    assert count(model, x).total == 8
    snl_fx.export_onnx(snl_fx.prepare(model, x), x[:1], tmp_path / "m.onnx", profile="pi")
