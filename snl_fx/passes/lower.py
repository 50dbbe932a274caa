"""Lowering: fold binarized gates into a static graph that computes only the kept ReLUs."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.fx import GraphModule

from .errors import PassError
from .families import lowered_module
from .gate import Gate, gates, site_counts, site_key
from .meta import get_meta

LOWERED_PREFIX = "snl_relu"
FORMS = ("scatter", "gather")  # PartialReLU forms


class PartialReLU(nn.Module):
    """ReLU on exactly the kept elements (pixel) or channels (channel); identity elsewhere.

    No mask arithmetic: select the kept elements, ReLU them, put them back. Two forms with
    bit-identical outputs (``form``; by default the faster one in eager torch and ONNX Runtime):

    * ``"scatter"`` (default for pixels): scatter the ReLU'd values into a copy of the input
      (ONNX Gather, Relu, ScatterElements).
    * ``"gather"`` (default for channels, whose gathers copy whole H*W blocks): concat them after
      the input, then gather with a fixed permutation (ONNX Gather, Relu, Concat, Gather only),
      which CrypTen 0.4.1 can load (it has no ScatterElements).

    Under secret sharing the selection and the placement are local, so a private inference
    backend evaluates exactly ``len(kept)`` ReLUs (times H*W for channels) per sample.
    """

    def __init__(
        self, kept: torch.Tensor, size: int, sample_shape: tuple[int, ...], per_channel: bool, form: str | None = None
    ) -> None:
        super().__init__()
        form = form or ("gather" if per_channel else "scatter")
        if form not in FORMS:
            raise PassError(f"PartialReLU form must be one of {FORMS}, got {form!r}")
        perm = torch.arange(size, dtype=torch.long)
        perm[kept] = size + torch.arange(len(kept), dtype=torch.long)
        self.register_buffer("kept", kept.to(torch.long))
        self.register_buffer("perm", perm)
        self.sample_shape = tuple(sample_shape)
        self.per_channel = per_channel
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if self.per_channel else x.flatten(1)
        kept = torch.relu(torch.index_select(flat, 1, self.kept))
        if self.form == "gather":
            out = torch.index_select(torch.cat([flat, kept], 1), 1, self.perm)
        else:
            index = self.kept.view((1, -1) + (1,) * (kept.dim() - 2)).expand_as(kept)
            out = flat.scatter(1, index, kept)
        # reshape_as, not reshape((-1,) + sample_shape): with a dynamic batch the legacy ONNX
        # exporter loses every dim of a Reshape to [-1, C, H, W], and ops that need H, W
        # (AdaptiveAvgPool2d(k > 1)) then fail to export.
        return out if self.per_channel else out.reshape_as(x)

    def extra_repr(self) -> str:
        unit = "channels" if self.per_channel else "elements"
        return f"kept {len(self.kept)} of {len(self.perm)} {unit}, form={self.form}"


def set_form(module: nn.Module, form: str) -> None:
    """Set the form of every :class:`PartialReLU` in ``module`` (in place; outputs do not change)."""
    if form not in FORMS:
        raise PassError(f"PartialReLU form must be one of {FORMS}, got {form!r}")
    for m in module.modules():
        if isinstance(m, PartialReLU):
            m.form = form


def binary_mask(gate: Gate, name: str) -> torch.Tensor:
    """The gate's values as a bool mask; raises unless every value is exactly 0 or 1."""
    c = gate.weight.detach()
    if not bool(((c == 0) | (c == 1)).all()):
        raise PassError(f"gate of site {name} is not binary: binarize the gates before lowering")
    return c.bool()


def lower_gates(gm: GraphModule) -> GraphModule:
    """Replace every binarized gate: all kept -> ReLU, none kept -> removed, some kept -> PartialReLU;
    a gate of another family -> its :class:`PartialNonlinear` (the op on the kept units, the replacement elsewhere)."""
    meta = get_meta(gm)
    per_channel = meta.granularity == "channel"
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for name, path in meta.gates.items():
        site = meta.site(name)
        mask = binary_mask(gm.get_submodule(path), name).flatten()
        node = nodes[path]
        if site.family != "relu":
            _replace_node(gm, node, f"{LOWERED_PREFIX}.{site_key(site)}", lowered_module(site, gm.get_submodule(path), mask))
            continue
        if not bool(mask.any()):
            node.replace_all_uses_with(node.all_input_nodes[0])
            gm.graph.erase_node(node)
            continue
        new_path = f"{LOWERED_PREFIX}.{site_key(site)}"
        if bool(mask.all()):
            module: nn.Module = nn.ReLU()
        else:
            size = site.shape[0] if per_channel else math.prod(site.shape)
            module = PartialReLU(mask.nonzero().flatten().cpu(), size, site.shape, per_channel)
            module.to(mask.device)
        _replace_node(gm, node, new_path, module)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    meta.gates = {}
    return gm


def _replace_node(gm: GraphModule, node: torch.fx.Node, path: str, module: nn.Module) -> None:
    """Put a call of ``module`` (registered at ``path``) on ``node``'s input in place of ``node``."""
    if not gm.add_submodule(path, module):
        raise PassError(f"could not add lowered submodule {path}")
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(path, (node.all_input_nodes[0],))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def kept_counts(gm: GraphModule) -> dict[str, int]:
    """ReLUs per sample that each gated site keeps, read from its binary gate (channel: times H*W)."""
    for name, gate in gates(gm).items():
        binary_mask(gate, name)  # raises unless the gate is binary
    counts = site_counts(gm)
    return {name: counts[name] for name in get_meta(gm).gates}
