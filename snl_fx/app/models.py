"""A small model zoo for SNL experiments: CIFAR ResNets, WRN-22-8, a tiny CPU ResNet and a tiny ViT.

Every ReLU is its own ``nn.ReLU`` module (never reused, never functional), so each ReLU site
has a stable dotted name such as ``layer1.0.relu1`` that the passes and reports can refer to.

ReLU counts per sample (the number SNL budgets against):

* ``cifar_resnet18`` at 32x32: 491,520 (557,056 with ``stem_relu=True``).
* ``cifar_resnet34`` at 32x32: 901,120 (966,656 with ``stem_relu=True``).
* ``wrn22_8`` at 32x32: 1,392,640.
* ``small_resnet`` at 28x28: 43,904 (56,448 with ``stem_relu=True``).

Following the SNL paper the CIFAR ResNets leave out the ReLU after the stem by default.

``vit_tiny_fm`` (a ViT for 1x28x28 Fashion-MNIST) has no ReLU: its nonlinearities are GELU,
softmax and LayerNorm, and its attention calls ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "MODELS",
    "BasicBlock",
    "CifarResNet",
    "PreActBlock",
    "ViT",
    "WideResNet",
    "cifar_resnet18",
    "cifar_resnet34",
    "small_resnet",
    "vit_tiny_fm",
    "wrn22_8",
]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation ResNet block: conv-BN-relu1-conv-BN, add the shortcut, relu2."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """ResNet of :class:`BasicBlock` stages for small images: 3x3 stride-1 stem, no max-pool.

    ``widths[i]`` channels and ``layers[i]`` blocks in stage ``layer{i+1}``; the first stage
    keeps the resolution, each later one halves it.
    """

    def __init__(
        self,
        layers: list[int],
        widths: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
        stem_channels: int = 64,
        stem_relu: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError("layers and widths must have the same length")
        self.conv1 = _conv3x3(in_channels, stem_channels)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        if stem_relu:
            self.stem_relu = nn.ReLU()
        channels = stem_channels
        for i, (blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(blocks):
                stage.append(BasicBlock(channels, width, stride if j == 0 else 1))
                channels = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        if hasattr(self, "stem_relu"):
            x = self.stem_relu(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class PreActBlock(nn.Module):
    """Wide-ResNet block: BN-relu1-conv-BN-relu2-(dropout)-conv, plus the shortcut.

    When the shape changes the 1x1 shortcut conv reads the activated input, as in the
    reference WRN.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(act)
        out = self.conv1(act)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + identity


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``: 16-channel stem, three groups of pre-activation blocks, BN-ReLU head."""

    def __init__(self, depth: int = 22, widen: int = 8, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.conv1 = _conv3x3(3, 16)
        channels = 16
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(channels, width, stride if j == 0 else 1, dropout))
                channels = width
            self.add_module(f"block{i + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = self.relu(self.bn(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def cifar_resnet18(num_classes: int = 10, stem_relu: bool = False) -> nn.Module:
    """ResNet-18 for 32x32 inputs: 491,520 ReLUs per sample (557,056 with ``stem_relu``)."""
    return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, stem_relu=stem_relu)


def cifar_resnet34(num_classes: int = 10, stem_relu: bool = False) -> nn.Module:
    """ResNet-34 for 32x32 inputs: 901,120 ReLUs per sample (966,656 with ``stem_relu``)."""
    return CifarResNet([3, 4, 6, 3], [64, 128, 256, 512], num_classes, stem_relu=stem_relu)


def wrn22_8(num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    """Wide ResNet 22-8 for 32x32 inputs: 1,392,640 ReLUs per sample."""
    return WideResNet(22, 8, num_classes, dropout)


def small_resnet(num_classes: int = 10, in_channels: int = 1, stem_relu: bool = False) -> nn.Module:
    """A three-block ResNet (widths 16/32/64) for 28x28 CPU demos.

    43,904 ReLUs per sample at 28x28 (56,448 with ``stem_relu``).
    """
    return CifarResNet([1, 1, 1], [16, 32, 64], num_classes, in_channels, stem_channels=16, stem_relu=stem_relu)


class Attention(nn.Module):
    """Multi-head self-attention: one qkv projection, ``F.scaled_dot_product_attention``, out projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, d)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) with a GELU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small Vision Transformer: conv patch embedding, class token, learned positions, pre-norm blocks."""

    def __init__(self, image_size: int = 28, patch: int = 7, in_channels: int = 1, num_classes: int = 10,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 2) -> None:
        super().__init__()
        if image_size % patch or dim % heads:
            raise ValueError("image_size must be a multiple of patch, dim a multiple of heads")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, tokens, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def vit_tiny_fm(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A ViT for 1x28x28 inputs (Fashion-MNIST): patch 7 (16 tokens + class token), dim 64,
    4 blocks of 4 heads, MLP ratio 2 with GELU; about 140k parameters, no ReLU.

    Per sample: 4 blocks x 4 heads x 17 softmax rows of 17, and 4 x 17 x 128 GELU elements.
    """
    return ViT(28, 7, in_channels, num_classes, dim=64, depth=4, heads=4, mlp_ratio=2)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet18": cifar_resnet18,
    "cifar_resnet34": cifar_resnet34,
    "wrn22_8": wrn22_8,
    "small_resnet": small_resnet,
    "vit_tiny_fm": vit_tiny_fm,
}
