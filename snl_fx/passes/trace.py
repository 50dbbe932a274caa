"""Front end: any nn.Module + example input -> GraphModule with shapes on every node."""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import os
import traceback
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx import GraphModule, Interpreter, Node, Tracer
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

from .errors import PassError
from .meta import META_KEY, SNLMeta
from .spellings import RELU_FUNCTIONS, RELU_MODULES

_TORCH_DIR = os.path.dirname(torch.__file__)


class _Tracer(Tracer):
    """symbolic_trace's tracer, plus user-chosen leaf module types."""

    def __init__(self, leaf_types: tuple[type[nn.Module], ...] = ()) -> None:
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


def as_args(example_input: Any) -> tuple:
    """The example input as a tuple of positional arguments."""
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def trace(
    model: nn.Module,
    example_input: Any,
    *,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    share_weights: bool = False,
) -> GraphModule:
    """Deep-copy ``model``, trace its eval-mode graph, and record shapes (:func:`propagate_shapes`).

    The caller's model and example input are never modified (their mode and tensors are left
    as they were): shapes come from fake tensors, and any real run is on copies. Models with
    shape-dependent Python control flow fall back to ``torch.export(strict=False)``.
    The returned graph carries an empty :class:`SNLMeta` in ``gm.meta["snl_fx"]``, whose
    ``batch_size`` follows :func:`batched_inputs`.
    ``share_weights=True`` copies the modules and buffers but not the parameters, which the
    graph then shares with ``model``: for read-only uses such as counting (ResNet-50: ~0.3 s
    less), never for training.
    """
    if not isinstance(model, nn.Module):
        raise PassError(f"expected an nn.Module, got {type(model).__name__}")
    args = as_args(example_input)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise PassError("example_input must be a tensor or a tuple of tensors (batch first)")
    batch, _ = batched_inputs([tuple(a.shape) for a in args])
    shared = {id(t): t for t in model.parameters()} if share_weights else {}  # buffers are copied: a forward may write them
    model = copy.deepcopy(model, shared).eval()
    concrete_args = _with_unsupplied_defaults(model, len(args), concrete_args)
    gm = _symbolic_trace(model, args, concrete_args, tuple(leaf_modules))
    _check_input_count(gm, len(args))
    _warn_if_train_graph_differs(model, gm, concrete_args, tuple(leaf_modules))
    propagate_shapes(gm, args)
    gm.meta[META_KEY] = SNLMeta(batch_size=batch)
    return gm


def batched_inputs(shapes: Sequence[tuple[int, ...]]) -> tuple[int, tuple[bool, ...]]:
    """The batch size, and which inputs carry it in dim 0: the one rule of both inspectors.

    Inputs of rank >= 2 (images, token ids, feature rows) are batch first; inputs of rank <= 1
    (option vectors, lengths, scalars) are not batched, unless no input has rank >= 2 (then the
    rank-1 inputs are). The batch size is dim 0 of the first batched input; an input whose dim 0
    differs is not batched either. A value is per sample only when a batched input flows into it
    (:func:`snl_fx.passes.find.batched_nodes`). The ONNX inspector, which cannot import torch,
    applies the same rule (``snl_fx.inspect.onnx_model._batched_inputs``; a test holds them equal).

    Example:
        >>> batched_inputs([(2,), (4, 3, 32, 32)])
        (4, (False, True))
    """
    shapes = [tuple(int(d) for d in s) for s in shapes]
    min_rank = 2 if any(len(s) >= 2 for s in shapes) else 1
    first = next((s for s in shapes if len(s) >= min_rank), None)
    if first is None:
        raise PassError("example_input needs a batch dimension (dim 0)")
    return first[0], tuple(len(s) >= min_rank and s[0] == first[0] for s in shapes)


_PLAIN_DEFAULTS = (type(None), bool, int, float, str)


def _with_unsupplied_defaults(model: nn.Module, given: int, concrete_args: dict[str, Any] | None) -> dict[str, Any] | None:
    """``concrete_args`` plus the plain defaults (None, bool, number, str) of the forward's
    parameters after the ``given`` positional inputs: the graph is that of ``model(*inputs)``.

    Without this, FX makes each such parameter a placeholder, and every flag or optional mask it
    feeds becomes a graph value: e.g. timm's ``VisionTransformer.forward(x, attn_mask=None,
    is_causal=False)`` hands ``is_causal`` to ``F.scaled_dot_product_attention`` as a Node, and
    :func:`decompose_attention` cannot see that it is False. FX keeps the placeholders and asserts
    the specialised values.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return concrete_args
    filled = dict(concrete_args or {})
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind not in positional for p in params[:given]):
        return concrete_args  # *args take the inputs: leave the signature as it is
    for p in params[given:]:
        if (p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
                and p.default is not inspect.Parameter.empty and type(p.default) in _PLAIN_DEFAULTS
                and p.name not in filled):
            filled[p.name] = p.default
    return filled or concrete_args


def trace_as_called(model: nn.Module, inputs: int) -> GraphModule:
    """A plain ``symbolic_trace`` of ``model`` called with ``inputs`` positional arguments: the forward
    arguments left out are fixed at their defaults, as :func:`trace` does (no copy, no shapes, no
    metadata: for a step that needs the bare FX graph, such as export's BatchNorm fusion)."""
    graph = Tracer().trace(model, _with_unsupplied_defaults(model, inputs, None))
    _drop_specialisation_asserts(graph)
    return GraphModule(model, graph, type(model).__name__)


def _symbolic_trace(model, args, concrete_args, leaf_types) -> GraphModule:
    tracer = _Tracer(leaf_types)
    try:
        graph = tracer.trace(model, concrete_args)
    except Exception as exc:  # noqa: BLE001 - any tracing failure gets the same explanation
        where = _user_frame(exc)
        try:
            with _torch_logs_off():
                exported = torch.export.export(model, tuple(a.clone() for a in args), strict=False)
        except Exception:  # noqa: BLE001 - report the original symbolic-trace failure
            raise PassError(
                f"cannot trace {type(model).__name__}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}{where}. Python control flow on "
                "tensor values cannot be traced: pass concrete_args for plain Python arguments, "
                "or make the offending submodule a leaf module (its ReLUs are then reported as "
                "not gateable)"
            ) from None
        warnings.warn(
            f"symbolic_trace failed ({type(exc).__name__}{where}); traced with torch.export(strict=False) "
            "instead: the graph is in ATen ops, with BatchNorm/dropout fixed in eval behaviour",
            stacklevel=3,
        )
        module = exported.module()
        return GraphModule(module, module.graph, type(model).__name__)  # a plain one: .eval()/.train() work
    _drop_specialisation_asserts(graph)
    return GraphModule(tracer.root, graph, type(model).__name__)


def _drop_specialisation_asserts(graph: torch.fx.Graph) -> None:
    """Erase the checks FX writes for each concrete arg (``_assert_is_none(p)``, ``torch._assert(p ==
    value)``): the graph is that of the inputs given, and TorchScript's ONNX exporter cannot trace
    ``p == False`` (no aten::eq for it). The placeholders stay, with their default values."""
    for node in list(graph.nodes):
        if (node.op == "call_function" and node.target in (torch._assert, torch.fx._symbolic_trace._assert_is_none)
                and len(node.args) > 1 and "has been specialized to have value" in str(node.args[1])):
            cond = node.args[0]
            graph.erase_node(node)
            if isinstance(cond, Node) and cond.op == "call_function" and not cond.users and cond.target is not None \
                    and cond.op != "placeholder" and all(a.op == "placeholder" for a in cond.all_input_nodes):
                graph.erase_node(cond)


def _check_input_count(gm: GraphModule, given: int) -> None:
    """An interpreter drops surplus inputs silently; a user who gave too many made a mistake."""
    placeholders = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    if given > len(placeholders) and not any(p.startswith("*") for p in placeholders):
        raise PassError(
            f"{given} example inputs given, but the traced model takes {len(placeholders)} "
            f"({', '.join(placeholders)})"
        )


def _user_frame(exc: BaseException) -> str:
    """' at file:line: code' for the innermost traceback frame outside torch, if any."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno}: {(f.line or '').strip()}"


def _warn_if_train_graph_differs(model, gm, concrete_args, leaf_types) -> None:
    """Gates live in the eval graph; say so when train mode takes other branches (e.g. aux heads)."""
    try:
        model.train()
        train_graph = _Tracer(leaf_types).trace(model, concrete_args)
        _drop_specialisation_asserts(train_graph)
    except Exception:  # noqa: BLE001 - the train graph is only compared, never used
        return
    finally:
        model.eval()
    n_eval = sum(1 for n in gm.graph.nodes if n.op != "placeholder")
    n_train = sum(1 for n in train_graph.nodes if n.op != "placeholder")
    if n_eval != n_train:
        warnings.warn(
            f"{type(model).__name__} has a different graph in train mode ({n_train} nodes) than in "
            f"eval mode ({n_eval} nodes); the eval graph is the one gated and lowered",
            stacklevel=3,
        )


class _RecordingShapeProp(Interpreter):
    """ShapeProp's recording, naming the failing node in one line, plus ReLUs hidden in leaf modules.

    An Interpreter rather than a ShapeProp: ShapeProp deep-copies the whole module into fake
    tensors when a FakeTensorMode is active, which costs as much as the propagation itself.
    """

    def __init__(self, gm: GraphModule, fake: bool = False) -> None:
        super().__init__(gm)
        self.extra_traceback = False
        self.fake = fake

    def run_node(self, n: Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:  # noqa: BLE001 - name the node, keep the cause's words
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PassError(f"running the model on the example input failed at {n.format_node()}: {message}") from None
        if any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(result)):
            n.meta["tensor_meta"] = tree_map_only(torch.Tensor, _extract_tensor_metadata, result)
        n.meta["type"] = torch.Tensor if isinstance(result, FakeTensor) else type(result)
        if n.op == "call_module":
            module = self.fetch_attr(str(n.target))
            if not isinstance(module, RELU_MODULES) and hides_relu(module):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                relus = count_aten_relus(module, *args, **kwargs)
                if relus is None and self.fake:
                    raise PassError(f"fake tensors cannot count the ReLUs inside {n.format_node()}")
                n.meta["hidden_relus"] = relus
        return result


@contextlib.contextmanager
def _torch_logs_off() -> Iterator[None]:
    """Silence log records and Python-level stderr: torch's fake-tensor logger dumps tracebacks,
    and torch.export prints its partial graph, for failures we handle or report in one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def propagate_shapes(gm: GraphModule, args: tuple) -> None:
    """Run ShapeProp in eval mode under no_grad, restoring the module's mode after.

    Shapes come from fake tensors (no real compute: a ResNet-50 at 224x224 takes a fraction of
    a second instead of a full forward pass). Where fake tensors cannot follow the model
    (data-dependent ops, ops without a meta kernel), the model runs for real on cloned inputs,
    and any error names the failing node.
    """
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            try:
                with _torch_logs_off(), FakeTensorMode(allow_non_fake_inputs=True) as mode, \
                        _tensors_replaced(gm, mode.from_tensor):  # ops on real weights alone would run for real
                    _RecordingShapeProp(gm, fake=True).run(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
            except Exception:  # noqa: BLE001 - the real run below repeats it and reports the error
                with _tensors_replaced(gm, lambda t: t.detach().clone()):  # a forward may write its buffers
                    _RecordingShapeProp(gm).run(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
    finally:
        gm.train(was_training)


@contextlib.contextmanager
def _tensors_replaced(gm: GraphModule, convert: Any) -> Iterator[None]:
    """Every parameter, buffer and tensor constant of ``gm`` replaced by ``convert(tensor)`` meanwhile.

    Shape propagation then reads and writes only these stand-ins: the graph's own tensors, and
    the caller's where ``trace(share_weights=True)`` shares them, stay as they were. Tied
    tensors stay tied.
    """
    memo: dict[int, torch.Tensor] = {}
    saved: list[tuple[dict, str, torch.Tensor]] = []
    for module in gm.modules():
        stores = [module._parameters, module._buffers, {k: v for k, v in vars(module).items()
                                                        if isinstance(v, torch.Tensor)}]
        for i, store in enumerate(stores):
            for name, tensor in list(store.items()):
                if tensor is None:
                    continue
                if id(tensor) not in memo:
                    memo[id(tensor)] = convert(tensor)
                target = store if i < 2 else module.__dict__
                saved.append((target, name, tensor))
                target[name] = memo[id(tensor)]
    try:
        yield
    finally:
        for store, name, tensor in reversed(saved):
            store[name] = tensor


def hides_relu(module: nn.Module) -> bool:
    """Whether a leaf module computes ReLUs internally (ReLU submodules or a relu activation)."""
    if any(isinstance(m, RELU_MODULES) for m in module.modules()):
        return True
    return any(
        getattr(m, "activation", None) in RELU_FUNCTIONS or getattr(m, "activation_relu_or_gelu", 0) == 1
        for m in module.modules()
    )


class _ReluCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.relu.default, torch.ops.aten.relu_.default):
            self.elements += args[0].numel()
        return func(*args, **(kwargs or {}))


def count_aten_relus(fn, *args, **kwargs) -> int | None:
    """ReLU elements per sample computed by ``fn(*args)``, counted at the dispatcher.

    Runs with grad enabled, because some modules (nn.TransformerEncoderLayer) take a fused path
    under no_grad that hides their ReLU. Returns None when the call fails.
    """
    batch = next((a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), 1)
    counter = _ReluCounter()
    try:
        with torch.enable_grad(), counter:
            fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 - unknown is an honest answer for an opaque module
        return None
    return counter.elements // max(int(batch), 1)
