"""Rewrite passes: make ReLUs out-of-place, then put a trainable gate at every ReLU site."""

from __future__ import annotations

import fnmatch
import operator
import warnings
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_leaves

from .errors import PassError
from .families import NonlinearGate, check_choice, family_of, unit_shape
from .meta import Site, get_meta

GATES_PREFIX = "snl_gates"
Granularity = Literal["pixel", "channel"]  # one gate per activation element, or per channel
GRANULARITIES: tuple[Granularity, ...] = get_args(Granularity)


class _GateFunction(torch.autograd.Function):
    """The gate as ``z`` where ``z > 0``, ``(1-c)*z`` elsewhere: 1 kernel forward, 5 backward.

    ``torch.lerp(z, torch.relu(z), c)`` takes 2 kernels forward and 7 backward, and saves ``z``
    and ``relu(z)``; this saves ``z`` only. Subgradient at ``z == 0``: the negative side
    (``da/dz = 1-c``, ``da/dc = 0``), as with lerp, whose ReLU has gradient 0 there.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        w = 1 - c
        ctx.save_for_backward(z, w)
        # prelu with one slope per element of a sample: z if z > 0 else w*z
        return F.prelu(z.reshape(z.shape[0], -1), w.expand(z.shape[1:]).reshape(-1)).view_as(z)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        z, w = ctx.saved_tensors
        buf = torch.clamp_max(z, 0.0)
        grad_c = buf.mul_(grad).sum_to_size(w.shape).neg_() if ctx.needs_input_grad[1] else None
        if not ctx.needs_input_grad[0]:
            return None, grad_c
        # buf = grad where z > 0 else 0, then buf + w*(grad - buf): grad where z > 0, w*grad elsewhere
        torch.ops.aten.threshold_backward.grad_input(grad, z, 0, grad_input=buf)
        return buf.lerp_(grad, w), grad_c


class Gate(nn.Module):
    """``a = c*relu(z) + (1-c)*z`` with a learnable ``c``: 1 keeps the ReLU, 0 makes it identity.

    Pixel-wise, ``c`` has the activation's shape without the batch dim; channel-wise, ``(C, 1, ...)``.
    Computed as ``z - c*min(z, 0)`` by :class:`_GateFunction`. Against the reference
    ``torch.lerp(z, torch.relu(z), c)``: the gradient for ``c`` and, where ``z <= 0``, for ``z``
    are bit-identical; where ``z > 0`` the gradient for ``z`` is exactly the incoming one (lerp's
    ``g*(1-c) + g*c`` may be 1 ulp off); the output is bit-identical when ``1-c`` is exact in
    float (``c`` in {0, 1} or >= 0.5, or any ``torch.rand`` value), else within 1 ulp.
    """

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(tuple(shape)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _GateFunction.apply(z, self.weight)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"


def site_key(site: Site) -> str:
    """Attribute-safe key of a site, used for its gate and its lowered ReLU submodule."""
    return site.name.replace(".", "_")


def gate_shape(site: Site, granularity: Granularity) -> tuple[int, ...]:
    """Gate shape: the sample shape (pixel) or one entry per channel, broadcastable (channel)."""
    if granularity == "pixel":
        return site.shape
    if granularity == "channel":
        if not site.shape:
            raise PassError(f"site {site.name} has no channel dim (activation shape {site.shape})")
        return (site.shape[0],) + (1,) * (len(site.shape) - 1)
    raise PassError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def make_out_of_place(gm: GraphModule) -> GraphModule:
    """Turn every in-place ReLU site into ``torch.relu`` and point later readers of its input at it.

    FX does not model aliasing: after ``y = torch.relu_(x)`` a later ``x + y`` reads the ReLU'd
    ``x``; once the site becomes a gate that no longer overwrites ``x``, that reader must read ``y``.
    Other tensors sharing ``x``'s memory (``x`` a view of ``h``, as in ``torch.relu_(h[:, :2])``)
    would change too, which no out-of-place op can express: when such a tensor is read after the
    site, this raises PassError naming the site (found by one fake-tensor run, no real compute;
    if that run fails, ``snl_fx.prepare`` still compares the gated model with the original).
    """
    meta = get_meta(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    inplace = [(site, nodes[site.node]) for site in meta.sites if site.inplace]
    if inplace:
        _refuse_aliased_writes(gm, inplace, order)
    for site in meta.sites:
        if not site.inplace:
            continue
        node = nodes[site.node]
        source = node.all_input_nodes[0]
        for user in list(source.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(source, node)
        node.op, node.target, node.args, node.kwargs = "call_function", torch.relu, (source,), {}
    gm.graph.lint()
    gm.recompile()
    return gm


def _refuse_aliased_writes(gm: GraphModule, inplace: list[tuple[Site, Node]], order: dict[Node, int]) -> None:
    """Raise for an in-place site whose input shares elements with another tensor read after it."""
    memory = _tensor_memory(gm)
    if memory is None:
        return  # the model cannot run on fake tensors; prepare's output check still holds
    for site, node in inplace:
        source = node.all_input_nodes[0]
        written = memory.get(source, [])[:1]
        for other in gm.graph.nodes:
            if order[other] >= order[node]:
                break
            if other is source:
                continue
            if any(_overlap(w, m) for w in written for m in _read_after(other, node, order, memory)):
                raise PassError(
                    f"site {site.name} applies an in-place ReLU ({site.op}) to `{source.name}`, which shares "
                    f"memory with `{other.name}` (a view or an alias), and `{other.name}` is read after it: the "
                    f"ReLU changes `{other.name}` too, which a gate cannot do; write the ReLU out of place and "
                    "read its result, e.g. h = torch.cat([torch.relu(h[:, :2]), h[:, 2:]], 1) instead of "
                    "torch.relu_(h[:, :2])"
                )


_Memory = tuple[Any, int, tuple[int, ...], tuple[int, ...]]  # storage, offset, shape, strides


def _read_after(other: Node, node: Node, order: dict[Node, int], memory: dict[Node, list[_Memory]]) -> list[_Memory]:
    """The memory of ``other``'s value that nodes after ``node`` read: all of it, or only the items
    taken by ``getitem`` from a tuple of tensors (``a, b = h.chunk(2)`` reads ``b`` alone later)."""
    leaves = memory.get(other, [])
    read: list[_Memory] = []
    for user in other.users:
        if order[user] <= order[node]:
            continue
        index = user.args[1] if user.op == "call_function" and user.target is operator.getitem else None
        if type(index) is not int or len(leaves) != _items(other) or not -len(leaves) <= index < len(leaves):
            return leaves
        read.append(leaves[index])
    return read


def _items(node: Node) -> int:
    """How many tensors a node's tuple value holds (from its recorded metadata), or -1."""
    tm = node.meta.get("tensor_meta")
    if hasattr(tm, "shape") or not isinstance(tm, (tuple, list)):  # one tensor's metadata is a NamedTuple too
        return -1
    return len(tm) if all(hasattr(t, "shape") for t in tm) else -1


def _tensor_memory(gm: GraphModule) -> dict[Node, list[_Memory]] | None:
    """Where every node's tensors live (storage, offset, shape, strides), from one fake-tensor run.

    The inputs are fake tensors made from the placeholders' recorded shapes. Every value is kept
    alive for the run, so no storage is reused. None when the graph cannot run on fake tensors.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx import Interpreter
    from torch.multiprocessing.reductions import StorageWeakRef

    from .trace import _torch_logs_off

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    device = next((t.device for t in (*gm.parameters(), *gm.buffers())), torch.device("cpu"))
    memory: dict[Node, list[_Memory]] = {}

    class Recorder(Interpreter):
        def run_node(self, n: Node) -> Any:
            result = super().run_node(n)
            memory[n] = [(StorageWeakRef(t.untyped_storage()), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
                         for t in tree_leaves(result) if isinstance(t, torch.Tensor)]
            return result

    was_training = gm.training
    gm.eval()
    try:
        with _torch_logs_off(), torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            args = []
            for p in placeholders:
                tm = p.meta.get("tensor_meta")
                if hasattr(tm, "shape"):
                    args.append(torch.empty_strided(tuple(tm.shape), tuple(tm.stride), dtype=tm.dtype, device=device))
                elif p.args:
                    args.append(p.args[0])  # a default value
                else:
                    return None
            Recorder(gm, garbage_collect_values=False).run(*args)
    except Exception:  # noqa: BLE001 - no fake run, no alias check: prepare compares outputs instead
        return None
    finally:
        gm.train(was_training)
    return memory


def _overlap(a: _Memory, b: _Memory) -> bool:
    """Whether two strided tensors in memory share an element."""
    if a[0] != b[0] or 0 in a[2] or 0 in b[2]:
        return False
    spans = [(m[1], m[1] + sum((n - 1) * abs(st) for n, st in zip(m[2], m[3]))) for m in (a, b)]
    if spans[0][1] < spans[1][0] or spans[1][1] < spans[0][0]:
        return False
    marks = torch.zeros(max(spans[0][1], spans[1][1]) + 1, dtype=torch.bool)
    marks.as_strided(a[2], a[3], a[1]).fill_(True)
    return bool(marks.as_strided(b[2], b[3], b[1]).any())


def insert_gates(gm: GraphModule, granularity: Granularity = "pixel", skip: Sequence[str] = (),
                 families: dict[str, tuple[str | None, str | None]] | None = None) -> GraphModule:
    """Replace every ReLU site with a call to its own :class:`Gate` submodule.

    ``skip`` holds fnmatch patterns of site names left as plain ReLUs (e.g. ``"relu"`` for a
    stem ReLU). Needs :func:`make_out_of_place` first. ``families`` (family -> (unit, replacement),
    None for the defaults; see :mod:`.families`) gates the sites of those families too, each with a
    :class:`NonlinearGate`; without ``"relu"`` in it, the ReLU sites stay as they are.
    """
    meta = get_meta(gm)
    families = dict(families) if families is not None else {"relu": (granularity, None)}
    if set(families) - {"relu"}:
        _add_family_sites(gm, families)
    if "relu" not in families:
        skip = list(skip) + [s.name for s in meta.sites if s.family == "relu"]
    gate_shapes = {s.name: gate_shape(s, granularity) if s.family == "relu" else unit_shape(s.shape, meta.units[s.family])
                   for s in meta.sites}  # validates granularity
    if isinstance(skip, str):
        raise PassError(f"skip must be a list of site-name patterns, not the string {skip!r}: use [{skip!r}]")
    unmatched = [p for p in skip if not any(fnmatch.fnmatchcase(s.name, p) for s in meta.sites)]
    if unmatched:
        names = ", ".join(s.name for s in meta.sites[:6]) + (", ..." if len(meta.sites) > 6 else "")
        warnings.warn(f"skip pattern(s) {unmatched} match no ReLU site (sites: {names})", stacklevel=2)
    nodes = {n.name: n for n in gm.graph.nodes}
    for site in meta.sites:
        if any(fnmatch.fnmatchcase(site.name, p) for p in skip):
            continue
        node = nodes.get(site.node)
        if node is None:
            raise PassError(f"site {site.name} is no longer in the graph (was the graph gated already?)")
        if site.inplace and node.target is not torch.relu:
            raise PassError(f"site {site.name} is in-place: run make_out_of_place before insert_gates")
        path = f"{GATES_PREFIX}.{site_key(site)}"
        gate: nn.Module = Gate(gate_shapes[site.name]) if site.family == "relu" else NonlinearGate(
            site.kind, site.family, families[site.family][1], gate_shapes[site.name], site.shape[-1] if site.shape else 1)
        if not gm.add_submodule(path, gate):
            raise PassError(f"could not add gate submodule {path}")
        source = node.all_input_nodes[0]
        with gm.graph.inserting_after(node):
            gate_node = gm.graph.call_module(path, (source,))
        gate_node.meta.update(node.meta)
        node.replace_all_uses_with(gate_node)
        gm.graph.erase_node(node)
        meta.gates[site.name] = path
    meta.granularity = granularity
    gm.graph.lint()
    gm.recompile()
    return gm


def gates(gm: GraphModule, family: str | None = "relu") -> dict[str, Gate]:
    """Site name -> its gate module, in graph order: the ReLU gates, those of another ``family``
    (:class:`NonlinearGate`), or every gate (``family=None``)."""
    meta = get_meta(gm)
    return {name: gm.get_submodule(path) for name, path in meta.gates.items()
            if family is None or meta.site(name).family == family}


def element_weights(gm: GraphModule, family: str | None = "relu") -> dict[str, int]:
    """Elements per sample that one gate element stands for, per gated site: 1 for pixel gates,
    H*W (the elements of one channel) for channel gates, the last dim for token and row gates."""
    meta = get_meta(gm)
    return {name: meta.site(name).numel // gate.weight.numel() for name, gate in gates(gm, family).items()}


COUNT_EPS = 0.01
"""The one threshold of the ReLU count: a gate element counts as a ReLU while ``c > COUNT_EPS``
(``TrainConfig.eps``'s default). Binary gates count the same at any threshold in [0, 1)."""


def site_counts(gm: GraphModule, threshold: float | None = COUNT_EPS, family: str = "relu") -> dict[str, int]:
    """ReLUs (or elements of another ``family``) per sample at every site of a gated model, in graph order.

    A gated site counts its gate elements ``c > threshold``, a channel element weighing H*W; a
    site without a gate (skipped) counts all its elements. ``threshold=None`` counts every
    element of every site: the model's ReLUs before linearization.
    """
    meta = get_meta(gm)
    gate_modules = gates(gm, family) if threshold is not None else {}
    weight = element_weights(gm, family) if gate_modules else {}
    counts = {}
    for site in meta.sites:
        if site.family != family:
            continue
        gate = gate_modules.get(site.name)
        if gate is None:
            counts[site.name] = site.numel
        else:
            counts[site.name] = int((gate.weight.detach() > threshold).sum()) * weight[site.name]
    return counts


def _add_family_sites(gm: GraphModule, families: dict[str, tuple[str | None, str | None]]) -> None:
    """Move the other nonlinearities of the requested families into ``meta.sites`` (their ``family``
    and ``kind`` set), fill in each family's unit and replacement, and record the units in
    ``meta.units``. A softmax not over its last dim, a log-softmax and an in-place op stay where
    they are, with a warning naming them."""
    meta = get_meta(gm)
    for family, (unit, replacement) in list(families.items()):
        families[family] = check_choice(family, unit, replacement)
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = dict(gm.named_modules())
    kept, refused = [], []
    for other in meta.others:
        family = family_of(other.kind)
        if family is None or family == "relu" or family not in families:
            kept.append(other)
            continue
        node = nodes.get(other.node or "")
        why = _why_not_gateable(node, other.kind, modules)
        if why:
            refused.append(f"{other.name} ({why})")
            kept.append(other)
            continue
        meta.sites.append(Site(other.name, other.node, _spelling(node, modules), other.shape, family=family,
                               kind=other.kind))
        meta.units[family] = families[family][0]
    if refused:
        warnings.warn(f"left ungated: {', '.join(refused)}", stacklevel=3)
    meta.others = kept
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    meta.sites.sort(key=lambda s: order.get(s.node, -1))


def _spelling(node: Node, modules: dict[str, nn.Module]) -> str:
    """``nn.GELU``, ``F.gelu``/``torch.softmax`` (by name), ``Tensor.softmax``."""
    if node.op == "call_module":
        return f"nn.{type(modules[str(node.target)]).__name__}"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def _why_not_gateable(node: Node | None, kind: str, modules: dict[str, nn.Module]) -> str | None:
    """Why an op of a gateable kind cannot be a site, or None: it must be the plain op on its first
    input, out of place, and a softmax must normalise its last dim."""
    if node is None:
        return "not in the graph"
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    if node.kwargs.get("inplace") or getattr(module, "inplace", False) or str(node.target).endswith("_"):
        return "in place"
    if kind != "softmax":
        return None
    names = {"softmax", "Softmax"}
    spelled = (type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target)))
    if spelled not in names or type(module) not in (type(None), nn.Softmax):
        return "not a plain softmax"
    if module is not None:
        dim = module.dim
    else:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    rank = len(getattr(node.meta.get("tensor_meta"), "shape", ()))
    if not isinstance(dim, int) or rank == 0 or dim % rank != rank - 1:
        return "softmax not over the last dim"
    if node.kwargs.get("dtype") is not None:
        return "softmax with a dtype"
    return None
