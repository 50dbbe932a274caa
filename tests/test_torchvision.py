"""relu_count on torchvision classification models, against a dispatch-level count of a real forward.

CI runs a representative subset at small input sizes; ``-m slow`` runs every classification
model in torchvision, and the ONNX round trip of the subset through both exporters.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import DispatchReluCounter, dispatch_relus_per_sample

import snl_fx

ALL_MODELS = torchvision.models.list_models(module=torchvision.models)  # classification only
AUX_HEADS = {"googlenet", "inception_v3"}  # aux classifiers run in train mode only
CI_MODELS = [
    "resnet18", "googlenet", "densenet121", "mobilenet_v2", "squeezenet1_0", "shufflenet_v2_x0_5",
    "regnet_x_400mf", "mnasnet0_5", "inception_v3", "alexnet",
]


def image_size(name: str) -> int:
    """The smallest input side the model supports (torchvision's ``min_size``), at least 32."""
    if name.startswith("vit_"):
        return 2 * int(name.rsplit("_", 1)[1])  # built for 2x2 patches, see build()
    meta = next(iter(torchvision.models.get_model_weights(name))).meta
    return max(32, *meta["min_size"])


def build(name: str) -> nn.Module:
    """An untrained torchvision model with 10 classes, sized for :func:`image_size` inputs."""
    kwargs: dict = {"weights": None, "num_classes": 10}
    if name in AUX_HEADS:
        kwargs["init_weights"] = False  # weights do not change counts; the default init is slow
    if name.startswith("vit_"):
        kwargs["image_size"] = image_size(name)
    torch.manual_seed(0)
    return torchvision.models.get_model(name, **kwargs).eval()


def check_against_oracle(name: str, batch: int = 2) -> None:
    model = build(name)
    size = image_size(name)
    x = torch.randn(batch, 3, size, size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = snl_fx.relu_count(model, x)
    oracle = DispatchReluCounter()
    with torch.no_grad(), oracle:
        model(x)
    constant = []  # ReLUs on weights and constants alone (swin_v2's position-bias MLP): once per forward, not per sample
    if len(report.sites) != oracle.calls:
        gm = snl_fx.passes.find_relus(snl_fx.passes.trace(model, x, share_weights=True))
        constant = [c for c in snl_fx.passes.get_meta(gm).constant if c.kind == "relu"]
        assert "not per sample" in " ".join(report.notes)
    assert report.total * batch + sum(c.comparisons for c in constant) == oracle.elements
    assert len(report.sites) + len(constant) == oracle.calls
    assert report.other_totals().get("relu6", 0) == oracle.relu6 // batch  # ReLU6 is no ReLU: apart
    assert report.ungateable == []
    train_warnings = [w for w in caught if "train mode" in str(w.message)]
    assert bool(train_warnings) == (name in AUX_HEADS)


@pytest.mark.parametrize("name", CI_MODELS)
def test_count_matches_dispatch_oracle(name):
    check_against_oracle(name)


def test_mobilenet_v2_has_no_relu_only_relu6():
    model = build("mobilenet_v2")
    x = torch.randn(1, 3, 32, 32)
    report = snl_fx.relu_count(model, x)
    assert (report.total, report.sites, report.relu_depth) == (0, [], 0)
    # one ReLU6 per conv-bn-act: stem, first block (no expansion), 16 blocks with two, final 1x1
    relu6_sites = 1 + 1 + 16 * 2 + 1
    assert len([m for m in model.modules() if isinstance(m, nn.ReLU6)]) == relu6_sites
    assert len([o for o in report.others if o.kind == "relu6"]) == relu6_sites


def test_resnet18_at_224_with_maxpool_apart():
    model = torchvision.models.resnet18(weights=None)
    x = torch.randn(1, 3, 224, 224)
    report = snl_fx.relu_count(model, x)
    stem = 64 * 112 * 112
    # two ReLUs per BasicBlock, two blocks per stage; stage i has 64*2^i channels at (56/2^i)^2
    blocks = sum(2 * 2 * (64 * 2**i) * (56 // 2**i) ** 2 for i in range(4))
    assert report.total == stem + blocks == dispatch_relus_per_sample(model, x)
    assert (len(report.sites), report.relu_layers, report.relu_depth) == (17, 17, 17)
    # 3x3 windows, 8 comparisons each; the global average pool: 512 outputs
    assert report.other_totals() == {"maxpool": 64 * 56 * 56 * (3 * 3 - 1), "avgpool": 512}
    assert f"maxpool: {64 * 56 * 56 * 8:,} comparisons per sample" in report.table()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(ALL_MODELS) - set(CI_MODELS)))
def test_count_matches_dispatch_oracle_all_models(name):
    check_against_oracle(name, batch=1)


# --- ONNX: both exporters, counted from the file --------------------------------------------
def export(model: nn.Module, x: torch.Tensor, path, dynamo: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), path, dynamo=True, verbose=False)
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, do_constant_folding=True)


# the legacy exporter needs adaptive pooling by an integer factor: AlexNet's 6x6 features at 224
ONNX_SIZES = {"alexnet": 224}


def check_onnx(name: str, dynamo: bool, tmp_path) -> None:
    model = build(name)
    size = ONNX_SIZES.get(name, image_size(name))
    x = torch.randn(2, 3, size, size)
    path = tmp_path / f"{name}.onnx"
    export(model, x, path, dynamo)
    report = snl_fx.relu_count(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the aux-head warning is tested above
        torch_report = snl_fx.relu_count(model, x)
    assert report.total == torch_report.total == dispatch_relus_per_sample(model, x)
    assert report.other_totals().get("relu6", 0) == torch_report.other_totals().get("relu6", 0)
    assert report.other_totals().get("maxpool", 0) == torch_report.other_totals().get("maxpool", 0)
    assert report.other_totals().get("avgpool", 0) == torch_report.other_totals().get("avgpool", 0)


ONNX_CI = [("resnet18", False), ("mobilenet_v2", False), ("resnet18", True), ("squeezenet1_0", True)]


@pytest.mark.parametrize("name, dynamo", ONNX_CI)
def test_onnx_count_matches(name, dynamo, tmp_path):
    check_onnx(name, dynamo, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, dynamo", [(n, d) for n in CI_MODELS for d in (False, True) if (n, d) not in ONNX_CI]
)
def test_onnx_count_matches_both_exporters(name, dynamo, tmp_path):
    check_onnx(name, dynamo, tmp_path)
