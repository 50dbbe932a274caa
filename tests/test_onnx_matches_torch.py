"""The ONNX inspector counts what the torch inspector counts, for the models users bring (issue 18).

Each model of ``test_hf_models`` (timm, torchvision, HuggingFace from configs; random weights) is
exported with ``snl_fx.export_onnx`` (the default profile; the ``pi`` profile for one CNN and one
ViT) and the file's report is held equal to ``snl_fx.relu_count(model, x)`` kind by kind, ReLUs
and softmax/LayerNorm row lengths included. Where they differ the gap is named:

* HF ``BertModel``: the legacy (TorchScript) exporter fills the forward's defaults in
  positionally and transformers' wrapper then gets ``use_cache`` twice: no file to compare.
"""

from __future__ import annotations

import pytest
import torch
from test_hf_models import MODELS, DefaultedAttention
from test_nonlinearities_torch import count, rows

import snl_fx

pytestmark = pytest.mark.filterwarnings("ignore:symbolic_trace failed")  # HF models: the torch.export fallback

ROW_KINDS = ("softmax", "layernorm")

BERT_EXPORT = ("export_onnx cannot export HF BertModel: the legacy exporter passes forward defaults "
               "positionally -> TypeError: BertModel.forward() got multiple values for argument 'use_cache'")


def _marks(name: str, profile: str):
    if name.startswith("hf-BertModel-"):
        return [pytest.mark.xfail(strict=True, raises=TypeError, reason=BERT_EXPORT)]
    return []


PI = ("timm-efficientnet_b0", "timm-vit_tiny_patch16_224")  # one CNN, one ViT
CASES = [pytest.param(name, "default", marks=_marks(name, "default"), id=f"{name}-default") for name in MODELS] + \
    [pytest.param(name, "pi", marks=_marks(name, "pi"), id=f"{name}-pi") for name in PI]


def _both(name: str, profile: str, tmp_path):
    """(model, torch report, ONNX report) at batch 1."""
    torch.manual_seed(0)
    model, inputs, _ = MODELS[name]()
    model.eval()
    x = inputs(1)
    torch_side = count(model, *x)
    path = tmp_path / "m.onnx"
    snl_fx.export_onnx(model.eval(), x[:1], path, profile=profile)
    return model, torch_side, snl_fx.relu_count(str(path))


def _assert_equal(torch_side, onnx_side) -> None:
    assert onnx_side.other_totals() == torch_side.other_totals()
    assert onnx_side.total == torch_side.total
    got, want = rows(onnx_side), rows(torch_side)
    assert {k: got[k] for k in ROW_KINDS if k in got} == {k: want[k] for k in ROW_KINDS if k in want}


@pytest.mark.parametrize(("name", "profile"), CASES)
def test_onnx_counts_equal_torch_counts(name, profile, tmp_path):
    _, torch_side, onnx_side = _both(name, profile, tmp_path)
    _assert_equal(torch_side, onnx_side)


def test_convnext_layer_scales_are_secret_products_on_both_sides(tmp_path):
    """A layer scale ``x * gamma`` multiplies by the server's secret weights: ``mul`` in both inspectors."""
    model, torch_side, onnx_side = _both("timm-convnext_atto", "default", tmp_path)
    scaled = []
    hooks = [m.register_forward_hook(lambda m, i, out: scaled.append(out[0].numel()))
             for m in model.modules() if getattr(m, "gamma", None) is not None]
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert scaled and torch_side.other_totals()["mul"] == onnx_side.other_totals()["mul"] == sum(scaled)


def test_pi_profile_traces_left_out_forward_defaults_as_their_values(tmp_path):
    """The pi profile's FX trace (for BN folding) made ``is_causal`` a placeholder, which the
    exporter fed in as a tensor: ``scaled_dot_product_attention(): argument 'is_causal' must be
    bool, not Tensor``. It is traced as its value, as ``passes.trace`` does."""
    model, x = DefaultedAttention().eval(), torch.randn(1, 5, 8)
    path = tmp_path / "m.onnx"
    snl_fx.export_onnx(model, x, path, profile="pi")
    assert snl_fx.relu_count(str(path)).other_totals() == count(model, x).other_totals() == {"softmax": 2 * 5 * 5}
