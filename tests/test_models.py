"""The model zoo: ReLU counts per sample, counted at the aten level, and output shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import dispatch_relus_per_sample

from snl_fx.app.models import (
    cifar_resnet18,
    cifar_resnet34,
    small_resnet,
    wrn22_8,
)


def relus_per_sample(model: nn.Module, shape: tuple[int, ...]) -> int:
    return dispatch_relus_per_sample(model, torch.randn(*shape))


@pytest.mark.parametrize("stem_relu", [False, True])
def test_cifar_resnet18_relus(stem_relu: bool) -> None:
    # two ReLUs per BasicBlock, two blocks per stage; stage i has 64*2^i channels at (32/2^i)^2
    blocks = sum(2 * 2 * (64 * 2**i) * (32 // 2**i) ** 2 for i in range(4))
    expected = blocks + (64 * 32 * 32 if stem_relu else 0)
    model = cifar_resnet18(stem_relu=stem_relu)
    assert relus_per_sample(model, (2, 3, 32, 32)) == expected
    names = {n for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
    assert {"layer1.0.relu1", "layer1.0.relu2", "layer4.1.relu2"} <= names
    assert ("stem_relu" in names) == stem_relu
    assert len(names) == 16 + stem_relu  # no ReLU module is reused


@pytest.mark.parametrize("stem_relu", [False, True])
def test_small_resnet_relus(stem_relu: bool) -> None:
    expected = 2 * 16 * 28 * 28 + 2 * 32 * 14 * 14 + 2 * 64 * 7 * 7 + (16 * 28 * 28 if stem_relu else 0)
    model = small_resnet(stem_relu=stem_relu)
    assert relus_per_sample(model, (3, 1, 28, 28)) == expected
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_small_resnet_rgb() -> None:
    assert small_resnet(num_classes=7, in_channels=3)(torch.randn(2, 3, 28, 28)).shape == (2, 7)


def test_wrn22_8_forward() -> None:
    model = wrn22_8(num_classes=100).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 1 + 3 * 3 * 2  # stem + 3 groups x 3 blocks x two 3x3 convs
    assert {m.out_channels for m in convs} == {16, 128, 256, 512}


def test_cifar_resnet34_forward() -> None:
    model = cifar_resnet34(num_classes=100).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
