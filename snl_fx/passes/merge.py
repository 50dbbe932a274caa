"""Merging: linear ops left adjacent by removed ReLU layers become one op, when exactly equivalent.

Runs after :func:`passes.lower_gates` (or on any traced model whose nodes carry shapes). Every
rewrite is exact (same outputs up to float rounding); ops that are not exactly equivalent as one
op are left alone rather than approximated.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from .errors import PassError

MERGED_PREFIX = "snl_merged"
_ADDS = (operator.add, torch.add)


@dataclass(frozen=True)
class MergeCandidate:
    """One merge the pass could do, with what a cost model needs to price it before and after.

    ``kind`` is ``"chain"`` (``nodes[0]`` feeds ``nodes[1]``) or ``"shortcut"`` (``nodes`` are the
    two branches and the add; an identity branch is the input node itself). ``ops`` names each
    op (module class names, ``"add"``, ``"identity"``). Shapes exclude the batch dim; MACs
    (multiply-accumulates; a BatchNorm is one per element, an add none) and weights are per sample.
    """

    kind: str
    nodes: tuple[Node, ...]
    ops: tuple[str, ...]
    merged: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    inner_shapes: tuple[tuple[int, ...], ...]  # activations that disappear
    macs_before: int
    macs_after: int
    weights_before: int
    weights_after: int

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the merged op's weight (Conv2d: out, in/groups, kh, kw; Linear: out, in)."""
        return tuple(self.merged.weight.shape)


def default_should_merge(candidate: MergeCandidate) -> bool:
    """The default rule: merge when the merged op has no more multiply-accumulates than the ops it replaces."""
    return candidate.macs_after <= candidate.macs_before


@dataclass(frozen=True)
class _Conv:
    """A Conv2d or an eval-mode BatchNorm2d (a depthwise 1x1 conv) as plain tensors."""

    weight: torch.Tensor  # (out, in/groups, kh, kw)
    bias: torch.Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel(self) -> tuple[int, int]:
        return tuple(self.weight.shape[2:])

    @property
    def diagonal(self) -> bool:
        """Channel c only reads channel c (BatchNorm, identity)."""
        return self.groups == self.in_channels == self.out_channels

    def dense(self) -> torch.Tensor:
        """The weight as a groups=1 tensor (out, in, kh, kw), zero outside the group blocks."""
        out_g, in_g = self.out_channels // self.groups, self.weight.shape[1]
        w = self.weight.new_zeros(self.out_channels, self.in_channels, *self.kernel)
        for g in range(self.groups):
            w[g * out_g : (g + 1) * out_g, g * in_g : (g + 1) * in_g] = self.weight[g * out_g : (g + 1) * out_g]
        return w

    def module(self, like: torch.Tensor) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel, self.stride, self.padding,
            groups=self.groups, bias=self.bias is not None,
        ).to(like)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv


@dataclass(frozen=True)
class _Linear:
    weight: torch.Tensor  # (out, in)
    bias: torch.Tensor | None

    def module(self, like: torch.Tensor) -> nn.Linear:
        lin = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None).to(like)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def _add_bias(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _grouped(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """The diagonal blocks of a dense (out, in, kh, kw) weight, as a grouped conv weight."""
    out_g, in_g = dense.shape[0] // groups, dense.shape[1] // groups
    return torch.cat([dense[g * out_g : (g + 1) * out_g, g * in_g : (g + 1) * in_g] for g in range(groups)])


def _joint_groups(a: _Conv, b: _Conv) -> int:
    """Groups of an op combining a and b: a diagonal op keeps the other's groups; equal groups stay."""
    if a.diagonal:
        return b.groups
    if b.diagonal or a.groups == b.groups:
        return a.groups
    return 1


def _as_conv(module: nn.Module) -> _Conv | None:
    """Conv2d (dilation 1, zero padding) or eval-mode BatchNorm2d with running stats, in float64."""
    if isinstance(module, nn.Conv2d) and type(module) is nn.Conv2d:
        if module.dilation != (1, 1) or module.padding_mode != "zeros":
            return None
        padding = module.padding
        if isinstance(padding, str):  # "valid", or "same" with odd kernels (symmetric)
            if padding == "same" and any(k % 2 == 0 for k in module.kernel_size):
                return None
            padding = tuple((k - 1) // 2 for k in module.kernel_size) if padding == "same" else (0, 0)
        bias = None if module.bias is None else module.bias.detach().double()
        return _Conv(module.weight.detach().double(), bias, tuple(module.stride), tuple(padding), module.groups)
    if isinstance(module, nn.BatchNorm2d) and type(module) is nn.BatchNorm2d:
        if module.training or module.running_mean is None:
            return None  # training-mode BatchNorm normalises by batch statistics: not a fixed linear map
        scale = (module.running_var.detach().double() + module.eps).rsqrt()
        shift = -module.running_mean.detach().double() * scale
        if module.affine:
            scale = scale * module.weight.detach().double()
            shift = shift * module.weight.detach().double() + module.bias.detach().double()
        channels = scale.numel()
        return _Conv(scale.view(channels, 1, 1, 1), shift, (1, 1), (0, 0), channels)
    return None


def _as_linear(module: nn.Module) -> _Linear | None:
    if isinstance(module, nn.Linear) and type(module) is nn.Linear:
        bias = None if module.bias is None else module.bias.detach().double()
        return _Linear(module.weight.detach().double(), bias)
    return None


def _compose_convs(a: _Conv, b: _Conv, in_hw: tuple[int, ...], mid_hw: tuple[int, ...]) -> _Conv | None:
    """b(a(x)) as one conv, or None when no conv equals it exactly.

    The merged conv reads the input padded by ``pa + sa*pb``. Where b pads a's output with zeros,
    the merged conv instead sees a evaluated off the border; that is exactly zero only when those
    positions read nothing but padding and a has no bias. Otherwise the pair is not merged.
    """
    if a.out_channels != b.in_channels:
        return None
    for d in range(2):
        if b.padding[d] == 0:
            continue
        reads_input = a.kernel[d] > a.stride[d] + a.padding[d] or a.stride[d] * mid_hw[d] - a.padding[d] < in_hw[d]
        if reads_input or (a.bias is not None and bool(a.bias.any())):
            return None
    sa, wa, wb = a.stride, a.dense(), b.dense()
    kernel = tuple(a.kernel[d] + sa[d] * (b.kernel[d] - 1) for d in range(2))
    w = wa.new_zeros(b.out_channels, a.in_channels, *kernel)
    for i in range(b.kernel[0]):
        for j in range(b.kernel[1]):
            w[:, :, sa[0] * i : sa[0] * i + a.kernel[0], sa[1] * j : sa[1] * j + a.kernel[1]] += torch.einsum(
                "om,mchw->ochw", wb[:, :, i, j], wa
            )
    bias = b.bias
    if a.bias is not None:
        bias = _add_bias(bias, torch.einsum("omhw,m->o", wb, a.bias))
    groups = _joint_groups(a, b)
    stride = (sa[0] * b.stride[0], sa[1] * b.stride[1])
    padding = (a.padding[0] + sa[0] * b.padding[0], a.padding[1] + sa[1] * b.padding[1])
    return _Conv(_grouped(w, groups), bias, stride, padding, groups)


def _sum_convs(a: _Conv, b: _Conv) -> _Conv | None:
    """a(x) + b(x) as one conv (the smaller kernel placed inside the larger), or None."""
    if a.stride != b.stride or a.in_channels != b.in_channels or a.out_channels != b.out_channels:
        return None
    for big, small in ((a, b), (b, a)):
        offset = [big.padding[d] - small.padding[d] for d in range(2)]
        if all(0 <= offset[d] and offset[d] + small.kernel[d] <= big.kernel[d] for d in range(2)):
            w = big.dense().clone()
            w[:, :, offset[0] : offset[0] + small.kernel[0], offset[1] : offset[1] + small.kernel[1]] += small.dense()
            groups = _joint_groups(big, small)
            return _Conv(_grouped(w, groups), _add_bias(big.bias, small.bias), big.stride, big.padding, groups)
    return None


def _identity_conv(channels: int, like: torch.Tensor) -> _Conv:
    return _Conv(like.new_ones(channels, 1, 1, 1), None, (1, 1), (0, 0), channels)


def _shape(node: Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise PassError(f"node {node.format_node()} has no shape: trace with passes.trace or run ShapeProp first")
    return tuple(meta.shape)[1:]


def _conv_macs(c: _Conv, out_shape: tuple[int, ...]) -> int:
    return math.prod(out_shape) * c.weight.shape[1] * c.kernel[0] * c.kernel[1]


def _linear_macs(lin: _Linear, out_shape: tuple[int, ...]) -> int:
    return math.prod(out_shape) * lin.weight.shape[1]


class _Merger:
    """Finds candidates in one graph and applies the accepted ones."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.refused: set[tuple[str, ...]] = set()  # node names of candidates should_merge declined

    def op(self, node: Node) -> tuple[nn.Module | None, _Conv | _Linear | None]:
        """The module of a single-input call_module node and its linear form, if it has one."""
        if node.op != "call_module" or node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], Node):
            return None, None
        module = self.modules[str(node.target)]
        return module, _as_conv(module) or _as_linear(module)

    def _only_feeds(self, node: Node, user: Node) -> bool:
        return list(node.users) == [user]

    def chain(self, b_node: Node) -> MergeCandidate | None:
        b_mod, b = self.op(b_node)
        if b is None:
            return None
        a_node = b_node.args[0]
        a_mod, a = self.op(a_node)
        if a is None or type(a) is not type(b) or not self._only_feeds(a_node, b_node):
            return None
        if (a_node.name, b_node.name) in self.refused:
            return None
        x = a_node.args[0]
        in_shape, mid_shape, out_shape = _shape(x), _shape(a_node), _shape(b_node)
        if isinstance(a, _Conv):
            if len(in_shape) != 3:
                return None
            merged = _compose_convs(a, b, in_shape[1:], mid_shape[1:])
            if merged is None:
                return None
            before = _conv_macs(a, mid_shape) + _conv_macs(b, out_shape)
            after = _conv_macs(merged, out_shape)
        else:
            if a.weight.shape[0] != b.weight.shape[1]:
                return None
            bias = b.bias if a.bias is None else _add_bias(b.bias, b.weight @ a.bias)
            merged = _Linear(b.weight @ a.weight, bias)
            before = _linear_macs(a, mid_shape) + _linear_macs(b, out_shape)
            after = _linear_macs(merged, out_shape)
        nodes, mods = (a_node, b_node), (a_mod, b_mod)
        return self._candidate("chain", nodes, mods, merged, in_shape, out_shape, (mid_shape,), before, after)

    def _branch(self, node: Node, add: Node) -> tuple[nn.Module | None, _Conv | _Linear | None, Node]:
        """(module, linear form, input) of one operand of an add; an identity operand is its own input."""
        module, form = self.op(node)
        if form is not None and self._only_feeds(node, add):
            return module, form, node.args[0]
        return None, None, node

    def shortcut(self, add: Node) -> MergeCandidate | None:
        is_add = (add.op == "call_function" and add.target in _ADDS) or (
            add.op == "call_method" and add.target == "add"
        )
        if not is_add or add.kwargs or len(add.args) != 2 or not all(isinstance(n, Node) for n in add.args):
            return None
        (m1, f1, x), (m2, f2, x2) = (self._branch(n, add) for n in add.args)
        if x is not x2 or (f1 is None and f2 is None) or add.args[0] is add.args[1]:
            return None
        if (*(n.name for n in add.args), add.name) in self.refused:
            return None
        out_shape, in_shape = _shape(add), _shape(x)
        if any(_shape(n) != out_shape for n in add.args):
            return None
        like = (f1 or f2).weight
        if isinstance(f1 or f2, _Conv):
            if len(in_shape) != 3:
                return None
            g1, g2 = (f or _identity_conv(in_shape[0], like) for f in (f1, f2))
            if not isinstance(g1, _Conv) or not isinstance(g2, _Conv):
                return None
            merged = _sum_convs(g1, g2)
            macs = _conv_macs
        else:
            eye = _Linear(torch.eye(in_shape[-1], dtype=like.dtype, device=like.device), None)
            g1, g2 = (f or eye for f in (f1, f2))
            if not isinstance(g1, _Linear) or not isinstance(g2, _Linear) or g1.weight.shape != g2.weight.shape:
                return None
            merged = _Linear(g1.weight + g2.weight, _add_bias(g1.bias, g2.bias))
            macs = _linear_macs
        if merged is None:
            return None
        before = sum(macs(f, out_shape) for f in (f1, f2) if f is not None)
        inner = tuple(_shape(n) for n, f in zip(add.args, (f1, f2)) if f is not None)
        nodes, mods, after = (*add.args, add), (m1, m2, "add"), macs(merged, out_shape)
        return self._candidate("shortcut", nodes, mods, merged, in_shape, out_shape, inner, before, after)

    def _candidate(self, kind, nodes, mods, merged, in_shape, out_shape, inner, before, after) -> MergeCandidate:
        ops = tuple(m if isinstance(m, str) else "identity" if m is None else type(m).__name__ for m in mods)
        real = [m for m in mods if isinstance(m, nn.Module)]
        weights = [p for m in real for p in m.parameters(recurse=False)]
        module = merged.module(next(t for m in real for t in (*m.parameters(), *m.buffers())))
        return MergeCandidate(
            kind, nodes, ops, module, in_shape, out_shape, inner, before, after,
            sum(w.numel() for w in weights), sum(p.numel() for p in module.parameters()),
        )

    def apply(self, c: MergeCandidate) -> None:
        last = c.nodes[-1]
        path = f"{MERGED_PREFIX}.{last.name}"
        while path in self.modules:  # a second run over the same graph
            path += "_"
        if not self.gm.add_submodule(path, c.merged):
            raise PassError(f"could not add merged submodule {path}")
        self.modules[path] = c.merged
        first = c.nodes[0]
        source = first if c.ops[0] == "identity" else first.args[0]
        with self.gm.graph.inserting_before(last):
            new = self.gm.graph.call_module(path, (source,))
        new.meta.update(last.meta)
        last.replace_all_uses_with(new)
        for node in reversed(c.nodes):
            if not node.users and node is not source:
                self.gm.graph.erase_node(node)


def merge_linear(gm: GraphModule, should_merge: Callable[[MergeCandidate], bool] | None = None) -> GraphModule:
    """Merge adjacent linear ops that no nonlinearity separates into one op, in place; returns ``gm``.

    Merged, pair by pair until nothing changes (so conv -> BN -> conv becomes one conv):

    * chains where the first op's output feeds only the second: Conv2d/BatchNorm2d -> Conv2d/
      BatchNorm2d (kernels compose: k1 then k2 at stride s1 is ``k1 + s1*(k2-1)`` wide, strides
      multiply; grouped and depthwise convs stay grouped when the groups line up, else dense),
      and Linear -> Linear;
    * a shortcut ``a(x) + b(x)`` or ``a(x) + x`` into one op: the smaller kernel (or a centred
      delta for the identity) is placed inside the larger, given equal strides and output shapes.

    Only exact rewrites: Conv2d with dilation 1 and zero padding; BatchNorm2d only in eval mode
    (a BN in training mode is left alone). When the second conv pads the first's output, the pair
    merges only if the first conv has no bias and its off-border outputs read only padding, so
    e.g. 3x3 -> 3x3 with padding 1 on both is not merged. The ``call_module`` nodes of these
    ``nn`` classes are merged; functional calls and subclasses are not. Nodes need shapes
    (``tensor_meta``, from :func:`passes.trace` or ShapeProp).

    ``should_merge(candidate)`` decides each :class:`MergeCandidate`; by default
    (:func:`default_should_merge`) a pair merges when the merged op has no more
    multiply-accumulates than the ops it replaces. Merged ops are new submodules under
    ``snl_merged``; the old ones go when nothing else calls them.
    """
    decide = should_merge or default_should_merge
    merger = _Merger(gm)
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            candidate = merger.chain(node) or merger.shortcut(node)
            if candidate is None:
                continue
            if not decide(candidate):
                merger.refused.add(tuple(n.name for n in candidate.nodes))
                continue
            merger.apply(candidate)
            changed = True
            break
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm
