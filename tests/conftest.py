"""Shared test helpers: tiny models in every ReLU spelling, and an independent ReLU oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


class DispatchReluCounter(TorchDispatchMode):
    """The tests' one ReLU oracle: during a real forward pass, counts the elements fed to aten relu ops
    (``elements``), the relu calls (``calls``, one per site), and apart from them the elements fed to
    aten hardtanh (``relu6``: ReLU6 is no ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0
        self.calls = 0
        self.relu6 = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.relu.default, torch.ops.aten.relu_.default):
            self.elements += args[0].numel()
            self.calls += 1
        elif func in (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default):
            self.relu6 += args[0].numel()
        return func(*args, **(kwargs or {}))


class ReluAsIdentity(TorchDispatchMode):
    """Runs a model with every aten relu replaced by identity (the all-gates-closed oracle)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.relu.default:
            return args[0].clone()
        if func is torch.ops.aten.relu_.default:
            return args[0]
        return func(*args, **(kwargs or {}))


def dispatch_relus_per_sample(model: nn.Module, x: torch.Tensor) -> int:
    counter = DispatchReluCounter()
    model.eval()
    with torch.no_grad(), counter:
        model(x)
    return counter.elements // x.shape[0]


class TinyCNN(nn.Module):
    """conv-bn-relu(inplace module) -> conv -> functional relu -> residual add -> linear."""

    def __init__(self, in_ch: int = 1, width: int = 4, size: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width * size * size, classes)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        y = F.relu(self.conv2(x))
        return self.fc(torch.flatten(x + y, 1))


class TwoLayers(nn.Module):
    """conv-relu1-conv-relu2-linear on 1x8x8: two ReLU layers of 2*8*8 = 128 elements."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(2 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.relu2(self.conv2(self.relu1(self.conv1(x)))), 1))


TWO_LAYERS_SITE = 2 * 8 * 8  # elements of each ReLU layer of TwoLayers


class Spellings(nn.Module):
    """Every ReLU spelling once, plus one module reused at two sites (7 sites of 4x6x6)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.shared = nn.ReLU()

    def forward(self, x):
        a = self.shared(x)  # nn.ReLU, site 1
        b = F.relu(input=a + 1)  # keyword call
        c = torch.relu(self.conv(b))
        d = c.relu()
        e = self.shared(d - 1)  # same module, second site
        f = F.relu(e * 2, inplace=True)
        g = torch.relu_(f + 0.5)
        return g.relu_() + x


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()
