"""Decompose attention into explicit ops, so that every softmax is a site and every matmul is visible.

``F.scaled_dot_product_attention`` hides its softmax inside one fused call, and
``nn.MultiheadAttention`` (a leaf module to FX) hides its projections, its two
activation-by-activation matmuls and its softmax. :func:`decompose_attention` rewrites both into
``linear -> q @ k^T -> * scale -> mask -> torch.softmax -> @ v -> merge heads -> out_proj``.

The pass is for eval graphs (what :func:`passes.trace` records): attention dropout is dropped.
"""

from __future__ import annotations

import inspect
import math
import operator
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from .trace import propagate_shapes

# every spelling of scaled_dot_product_attention in an FX graph, with one signature
_SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
                 torch.ops.aten.scaled_dot_product_attention.default)
_SDPA_PARAMS = {"query": None, "key": None, "value": None, "attn_mask": None, "dropout_p": 0.0,
                "is_causal": False, "scale": None, "enable_gqa": False}


class _Refused(Exception):
    """An attention call this pass leaves as it is; the message says why."""


def decompose_attention(gm: GraphModule) -> GraphModule:
    """Rewrite every scaled-dot-product attention and ``nn.MultiheadAttention`` call into explicit ops.

    Numerically the same as the original in eval mode (within float rounding). The parameters
    stay where they were (``state_dict`` unchanged): the projections read the module's weights
    through ``get_attr``, the output projection calls its ``out_proj``. ``need_weights`` calls
    get their (head-averaged or per-head) attention weights back from the decomposed softmax.
    Calls it cannot rewrite (``add_bias_kv``, ``add_zero_attn``, unbatched inputs, grouped
    heads, non-constant flags, ...) are left as they are, with one warning each. Shapes are
    recorded again afterwards when the inputs carry them (:func:`passes.trace`).
    """
    modules = dict(gm.named_modules())
    changed = False
    for node in list(gm.graph.nodes):
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        try:
            if node.op == "call_function" and node.target in _SDPA_TARGETS:
                _rewrite_sdpa(gm, node)
            elif isinstance(module, nn.MultiheadAttention):
                _rewrite_mha(gm, node, module)
            else:
                continue
        except _Refused as reason:
            warnings.warn(f"decompose_attention: {node.name} left as it is: {reason}", stacklevel=2)
            continue
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
        _reshape(gm)
    return gm


def _attend(e: _Emitter, q: Node, k: Node, v: Node, mask: Node | None, scale: float,
            causal: tuple[int, int] | None) -> tuple[Node, Node]:
    """softmax(q @ k^T * scale + mask) @ v over the last two dims; returns (output, weights).

    A bool ``mask`` keeps where True (SDPA's convention); a float one is added. ``causal``, the
    (query, key) lengths, masks the upper triangle (top-left aligned, as SDPA does).
    """
    scores = e.fn(operator.mul, e.fn(torch.matmul, q, e.method("transpose", k, -2, -1)), scale, name="scores")
    if causal:
        scores = e.method("masked_fill", scores, e.constant_mask(*causal), -math.inf)
    if mask is not None and _dtype(mask) == torch.bool:
        scores = e.method("masked_fill", scores, e.fn(torch.logical_not, mask), -math.inf)
    elif mask is not None:
        scores = e.fn(operator.add, scores, mask)
    weights = e.fn(torch.softmax, scores, dim=-1, name="softmax")
    return e.fn(torch.matmul, weights, v, name="attend"), weights


def _rewrite_sdpa(gm: GraphModule, node: Node) -> None:
    p = dict(_SDPA_PARAMS)
    p.update(zip(_SDPA_PARAMS, node.args))
    p.update(node.kwargs)
    q, k, v, mask = p["query"], p["key"], p["value"], p["attn_mask"]
    if any(isinstance(p[f], Node) for f in ("dropout_p", "is_causal", "scale", "enable_gqa")):
        raise _Refused("dropout_p, is_causal, scale and enable_gqa must be constants")
    _check_shapes(q, k, v, mask)
    if _shape(q)[-3:-2] != _shape(k)[-3:-2]:
        raise _Refused("grouped-query attention (enable_gqa) with fewer key/value heads")
    if p["dropout_p"]:
        warnings.warn(f"decompose_attention: {node.name}: dropout_p={p['dropout_p']} dropped (the pass is "
                      "for eval graphs)", stacklevel=3)
    scale = p["scale"] if p["scale"] is not None else 1 / math.sqrt(_shape(q)[-1])
    with gm.graph.inserting_before(node):
        causal = (_shape(q)[-2], _shape(k)[-2]) if p["is_causal"] else None
        out, _ = _attend(_Emitter(gm, node), q, k, v, mask, scale, causal)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def _rewrite_mha(gm: GraphModule, node: Node, m: nn.MultiheadAttention) -> None:
    a = inspect.signature(m.forward).bind(*node.args, **node.kwargs)
    a.apply_defaults()
    a = a.arguments
    if m.bias_k is not None or m.add_zero_attn:
        raise _Refused(f"{node.target} uses add_bias_kv or add_zero_attn")
    if any(isinstance(a[f], Node) for f in ("need_weights", "average_attn_weights", "is_causal")):
        raise _Refused("need_weights, average_attn_weights and is_causal must be constants")
    _check_shapes(a["query"], a["key"], a["value"], a["attn_mask"], a["key_padding_mask"])
    if len(_shape(a["query"])) != 3:
        raise _Refused("unbatched inputs")
    uses = {u: u.args[1] for u in node.users}
    if not all(u.op == "call_function" and u.target is operator.getitem and i in (0, 1) for u, i in uses.items()):
        raise _Refused("its output tuple is used other than by [0] and [1]")
    if not a["need_weights"] and any(i == 1 and u.users for u, i in uses.items()):
        raise _Refused("its None weights (need_weights=False) are used")
    mask, padding = a["attn_mask"], a["key_padding_mask"]
    causal = None
    if a["is_causal"] and padding is None and not a["need_weights"]:  # torch's MHA then ignores attn_mask too
        mask, seq = None, 1 if m.batch_first else 0
        causal = (_shape(a["query"])[seq], _shape(a["key"])[seq])
    heads, dim, e = m.num_heads, m.head_dim, _Emitter(gm, node)
    with gm.graph.inserting_before(node):
        inputs = {x: x if m.batch_first else e.method("transpose", x, 0, 1)  # batch first from here on
                  for x in dict.fromkeys((a["query"], a["key"], a["value"]))}
        if m._qkv_same_embed_dim and a["query"] is a["key"] is a["value"]:  # self-attention: one qkv layer
            bias = e.attr(f"{node.target}.in_proj_bias") if m.in_proj_bias is not None else None
            qkv = e.fn(F.linear, inputs[a["query"]], e.attr(f"{node.target}.in_proj_weight"), bias, name="qkv")
            chunks = e.method("chunk", qkv, 3, dim=-1)
            q, k, v = (e.fn(operator.getitem, chunks, i, name="qkv"[i]) for i in range(3))
        else:
            path = str(node.target)
            q, k, v = (e.fn(F.linear, inputs[a[f]], _in_weight(e, m, path, i), _in_bias(e, m, path, i), name=f[0])
                       for i, f in enumerate(("query", "key", "value")))
        q, k, v = (e.method("transpose", e.method("unflatten", t, -1, (heads, dim)), 1, 2) for t in (q, k, v))
        masks = [e.additive(mask, _dtype(a["query"]))] if mask is not None else []
        if mask is not None and len(_shape(mask)) == 3:  # (batch * heads, L, S) -> (batch, heads, L, S)
            masks[0] = e.method("unflatten", masks[0], 0, (-1, heads))
        if padding is not None:  # (batch, S) -> (batch, 1, 1, S)
            masks.append(e.fn(operator.getitem, e.additive(padding, _dtype(a["query"])),
                              (slice(None), None, None, slice(None))))
        merged = e.fn(operator.add, *masks) if len(masks) == 2 else (masks[0] if masks else None)
        out, weights = _attend(e, q, k, v, merged, 1 / math.sqrt(dim), causal)
        out = e.method("flatten", e.method("transpose", out, 1, 2), 2)
        out = e.module(f"{node.target}.out_proj", out)
        if not m.batch_first:
            out = e.method("transpose", out, 0, 1)
        if a["need_weights"] and a["average_attn_weights"]:
            weights = e.method("mean", weights, dim=1)
    for user, index in uses.items():
        if index == 0 or a["need_weights"]:
            user.replace_all_uses_with(out if index == 0 else weights)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    if weights.target == "mean" and not weights.users:  # weights asked for, never read
        gm.graph.erase_node(weights)


def _check_shapes(*tensors: Any) -> None:
    for t in tensors:
        if isinstance(t, Node) and t.meta.get("type") is type(None):
            raise _Refused(f"{t.name} was None in the example input (trace with it given, or fixed by concrete_args)")
        if t is not None and not _shape(t):
            raise _Refused("no recorded shapes (run passes.trace first)")


def _in_weight(e: _Emitter, m: nn.MultiheadAttention, path: str, i: int) -> Node:
    if not m._qkv_same_embed_dim:  # kdim/vdim differ from embed_dim: three separate weights
        return e.attr(f"{path}.{('q', 'k', 'v')[i]}_proj_weight")
    return e.fn(operator.getitem, e.attr(f"{path}.in_proj_weight"), slice(i * m.embed_dim, (i + 1) * m.embed_dim))


def _in_bias(e: _Emitter, m: nn.MultiheadAttention, path: str, i: int) -> Node | None:
    if m.in_proj_bias is None:
        return None
    return e.fn(operator.getitem, e.attr(f"{path}.in_proj_bias"), slice(i * m.embed_dim, (i + 1) * m.embed_dim))


class _Emitter:
    """Creates nodes at the graph's insertion point, named after and scoped like the call they replace."""

    def __init__(self, gm: GraphModule, anchor: Node) -> None:
        self.gm, self.graph, self.anchor = gm, gm.graph, anchor

    def _node(self, op: str, target: Any, args: tuple, kwargs: dict, name: str) -> Node:
        node: Node = self.graph.create_node(op, target, args, kwargs, name=f"{self.anchor.name}_{name}")
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        return node

    def fn(self, target: Any, *args: Any, name: str | None = None, **kwargs: Any) -> Node:
        return self._node("call_function", target, args, kwargs, name or getattr(target, "__name__", "op"))

    def method(self, target: str, *args: Any, **kwargs: Any) -> Node:
        return self._node("call_method", target, args, kwargs, target)

    def module(self, target: str, *args: Any) -> Node:
        return self._node("call_module", target, args, {}, target.rsplit(".", 1)[-1])

    def attr(self, target: str) -> Node:
        return self._node("get_attr", target, (), {}, target.rsplit(".", 1)[-1])

    def additive(self, mask: Node, dtype: torch.dtype) -> Node:
        """A bool mask (True = masked out, nn.MultiheadAttention's convention) as 0/-inf; a float one as is."""
        if _dtype(mask) != torch.bool:
            return mask
        zeros = self.fn(torch.zeros_like, mask, dtype=dtype)
        return self.method("masked_fill", zeros, mask, -math.inf)

    def constant_mask(self, length: int, source: int) -> Node:
        """The causal mask's masked-out part (True above the diagonal), a non-persistent buffer of the root."""
        name = f"attention_causal_mask_{length}x{source}"
        if not hasattr(self.gm, name):
            device = next((t.device for t in (*self.gm.parameters(), *self.gm.buffers())), torch.device("cpu"))
            upper = torch.ones(length, source, dtype=torch.bool, device=device).triu(1)
            self.gm.register_buffer(name, upper, persistent=False)
        return self.attr(name)


def _shape(node: Any) -> tuple[int, ...]:
    tm = node.meta.get("tensor_meta") if isinstance(node, Node) else None
    return tuple(int(d) for d in tm.shape) if hasattr(tm, "shape") else ()


def _dtype(node: Node) -> torch.dtype | None:
    tm = node.meta.get("tensor_meta")
    return getattr(tm, "dtype", None)


def _reshape(gm: GraphModule) -> None:
    """Record shapes again (new nodes have none), from inputs made to the placeholders' recorded shapes."""
    args = []
    device = next((t.device for t in (*gm.parameters(), *gm.buffers())), torch.device("cpu"))
    for p in (n for n in gm.graph.nodes if n.op == "placeholder"):
        tm = p.meta.get("tensor_meta")
        if hasattr(tm, "shape"):
            args.append(torch.zeros(tuple(tm.shape), dtype=tm.dtype, device=device))
        elif p.args:
            args.append(p.args[0])  # an input left at its default value
        else:
            return  # not traced by passes.trace: no shapes to keep up to date
    propagate_shapes(gm, tuple(args))
