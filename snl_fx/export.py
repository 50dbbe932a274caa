"""ONNX export of (lowered) models, checked against ONNX Runtime and re-counted from the file."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from snl_fx import passes
from snl_fx._files import write_atomic
from snl_fx.errors import SnlFxError

Profile = Literal["default", "pi"]  # "pi": BN folded, integer constants as Constant nodes, for PI backends
PROFILES: tuple[Profile, ...] = get_args(Profile)
INSTALL_HINT = (
    "install the pi extra: bash scripts/setup.sh, or pip install -e '.[pi]' && "
    "pip install --no-deps crypten==0.4.1"
)


@dataclass(frozen=True)
class ExportResult:
    """Where the file went, how far ONNX Runtime is from torch, and the ReLUs per sample in it."""

    path: Path
    max_abs_error: float
    relu_count: int


def export_onnx(
    model: nn.Module, example_input: Any, path: str | os.PathLike, profile: Profile = "default", opset: int = 17
) -> ExportResult:
    """Export ``model`` to ONNX, check it fully, run it under ONNX Runtime, and count its ReLUs.

    Args:
        model: any exportable module, typically ``convert``'s lowered model; it is copied.
        example_input: an example batch (batch first), or a tuple of the forward's inputs.
        path: the file to write (its folder is created).
        profile: ``"default"``: dynamic batch dim, weights as initializers, each PartialReLU in
            its own form. ``"pi"``: for private-inference backends such as CrypTen: BatchNorm
            folded into convolutions, a fixed batch size, every integer constant (gather
            indices, shapes) a ``Constant`` node rather than an initializer, no ``Identity``
            nodes (the exporter writes equal weights once, aliased by Identity), and partial
            ReLUs in their gather form.
        opset: the ONNX opset (at most 17 for ``"pi"``).

    Returns:
        An :class:`ExportResult`: ``path``, ``max_abs_error`` (ONNX Runtime against torch) and
        ``relu_count`` (ReLUs per sample read back from the file). Raises SnlFxError if ONNX
        Runtime differs from torch by more than 1e-4 (relative to the output scale) or the
        file's ReLU count differs from the model's.

    Example:
        >>> snl_fx.export_onnx(result.model, x[:1], "model_pi.onnx", profile="pi").relu_count
        2195
    """
    if profile not in PROFILES:
        raise SnlFxError(f"profile must be one of {PROFILES}, got {profile!r}")
    if profile == "pi" and opset > 17:
        raise SnlFxError(f"profile 'pi' needs opset <= 17 (ReduceMean with an axes attribute), got {opset}")
    args = tuple(a.detach().cpu().clone() for a in passes.as_args(example_input))  # never the caller's tensors
    model = copy.deepcopy(model).cpu().eval()
    if profile == "pi":
        from torch.fx.experimental.optimization import fuse

        passes.set_form(model, "gather")  # CrypTen has no ScatterElements; before tracing, which inlines it
        # forward defaults left out (timm ViT's ``attn_mask=None, is_causal=False``) traced as their
        # values, as passes.trace does: left placeholders, the exporter feeds them in as tensors
        traced = passes.trace_as_called(model, len(args))
        model = batchnorm_to_affine(fuse(traced, no_trace=True))  # BN folded into a preceding conv; the rest Mul+Add
    path = Path(path)
    checked: dict[str, Any] = {}
    # written beside ``path`` and renamed over it only once every check passed: a refused export leaves nothing
    write_atomic(path, lambda tmp: checked.update(_write_checked(model, args, tmp, path, profile, opset)), ".onnx")
    return ExportResult(path, checked["error"], checked["counted"])


def _write_checked(model: nn.Module, args: tuple, tmp: Path, path: Path, profile: Profile, opset: int) -> dict[str, Any]:
    """Export ``model`` to ``tmp`` and check it (errors name ``path``, where it goes once checked)."""
    from snl_fx.inspect import relu_count
    from snl_fx.inspect.onnx_model import onnx_relu_report

    names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    dynamic = None if profile == "pi" else {n: {0: "batch"} for n in names + ["output"]}
    with warnings.catch_warnings(), _stdout_silenced():  # torch dumps its IR graph on a failed export
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, _fresh(args), str(tmp), dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=names, output_names=["output"], dynamic_axes=dynamic,
        )
    if profile == "pi":
        proto = onnx.load(str(tmp))
        integer_initializers_to_constants(proto)
        remove_identities(proto)
        onnx.save(proto, str(tmp))
    onnx.checker.check_model(str(tmp), full_check=True)
    error = _ort_error(model, args, tmp)
    scale = max([1.0] + [float(np.abs(o).max()) for o in _torch_out(model, args) if o.size])
    if error > 1e-4 * scale:
        raise SnlFxError(f"ONNX Runtime output differs from torch by {error:.3g} for {path}: not written")
    counted = onnx_relu_report(tmp, [tuple(a.shape) for a in args]).total
    expected = relu_count(model, _fresh(args)).total
    if counted != expected:
        raise SnlFxError(f"the ONNX file for {path} computes {counted} ReLUs per sample, the torch model {expected}: not written")
    return {"error": error, "counted": counted}


def _fresh(args: tuple) -> tuple:
    """A copy of the inputs for one run: a model that changes its input in place changes only the copy."""
    return tuple(a.clone() for a in args)


def check_exports(gm: torch.fx.GraphModule, example_input: Any, profiles: tuple[Profile, ...] = ("default",)) -> None:
    """Raise SnlFxError now, before training, if the lowered model will not export (or load).

    ``gm`` comes from :func:`snl_fx.prepare`. A copy is binarized with every other element (or
    channel) of each gate kept, so every kind of lowered site (partial, and whole layers where a
    gate has one element) is exported with each profile to a temporary file and checked as
    :func:`export_onnx` checks it; a ``pi`` file is also loaded by CrypTen when it is installed.
    """
    import tempfile

    from snl_fx.gated import convert, ungated_relus
    from snl_fx.select import binarize

    trial = copy.deepcopy(gm).cpu()
    families = dict.fromkeys(passes.get_meta(trial).site(n).family for n in passes.get_meta(trial).gates)
    for family in families:
        scores = {name: (torch.arange(g.weight.numel()) % 2 == 0).float().view_as(g.weight)
                  for name, g in passes.gates(trial, family).items()}
        weight = passes.element_weights(trial, family)
        kept = sum(int(c.sum()) * weight[name] for name, c in scores.items())
        binarize(trial, ungated_relus(trial, family) + kept, scores, family=family)
    lowered = convert(trial)
    args = tuple(a[:1] for a in passes.as_args(example_input))
    with tempfile.TemporaryDirectory(prefix="snl_fx_check_") as tmp:
        for profile in profiles:
            path = Path(tmp) / f"{profile}.onnx"
            try:
                export_onnx(lowered, args, path, profile=profile)
                if profile == "pi":
                    _crypten_loads(path)
            except Exception as exc:  # noqa: BLE001 - any failure here is the model's, found early
                text = " ".join(str(exc).split())[:300]
                raise SnlFxError(
                    f"the linearized model would not export (profile {profile!r}); found before training: "
                    f"{type(exc).__name__}: {text}"
                ) from exc


def _crypten_loads(path: Path) -> None:
    """Load ``path`` with CrypTen's ONNX importer when CrypTen is installed (no MPC run)."""
    import importlib.util
    import io

    if importlib.util.find_spec("crypten") is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_crypten().nn.from_onnx(io.BytesIO(path.read_bytes()))


def import_crypten() -> Any:
    """Import CrypTen 0.4.1 on current torch (alias the module it expects), or raise SnlFxError."""
    try:
        from torch.onnx._internal.torchscript_exporter import registration
    except ImportError:
        pass
    else:
        sys.modules.setdefault("torch.onnx._internal.registration", registration)
    try:
        import crypten
    except ImportError as exc:
        raise SnlFxError(f"CrypTen cannot be imported ({exc}): {INSTALL_HINT}") from None
    return crypten


class Affine(nn.Module):
    """Per-channel ``x * scale + shift`` (channels on dim 1): an eval-mode BatchNorm as plain Mul and Add."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.dim() - 2)
        return x * self.scale.reshape(shape) + self.shift.reshape(shape)


def batchnorm_to_affine(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace every eval-mode BatchNorm module left in ``gm`` by an :class:`Affine` (in place).

    PI backends load BatchNormalization only right after a convolution (CrypTen 0.4.1 fails on
    one that follows an Add, as in pre-activation blocks); Mul and Add they all load.
    """
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if module.running_mean is None or module.running_var is None:
            raise SnlFxError(f"BatchNorm {node.target} has no running statistics: it cannot be exported as affine")
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.detach()
        shift = -module.running_mean * scale
        if module.bias is not None:
            shift = shift + module.bias.detach()
        if not gm.add_submodule(node.target, Affine(scale.detach(), shift.detach())):  # same name: replaces it
            raise SnlFxError(f"could not replace BatchNorm {node.target} by its affine form")
    gm.graph.lint()
    gm.recompile()
    return gm


def integer_initializers_to_constants(proto: onnx.ModelProto) -> None:
    """Move integer initializers into ``Constant`` nodes (PI backends secret-share initializers)."""
    graph = proto.graph
    keep, constants = [], []
    for init in graph.initializer:
        if numpy_helper.to_array(init).dtype.kind in "iub":
            constants.append(onnx.helper.make_node("Constant", [], [init.name], value=init))
        else:
            keep.append(init)
    if not constants:
        return
    moved = {c.output[0] for c in constants}
    inputs = [i for i in graph.input if i.name not in moved]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.input[:]
    graph.input.extend(inputs)
    nodes = constants + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


def remove_identities(proto: onnx.ModelProto) -> None:
    """Drop ``Identity`` nodes, reading their input directly (CrypTen 0.4.1 has no Identity op)."""
    graph = proto.graph
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.output[0] not in outputs}
    if not alias:
        return

    def source(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    nodes = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in nodes:
        node.input[:] = [source(i) for i in node.input]
    del graph.node[:]
    graph.node.extend(nodes)


@contextlib.contextmanager
def _stdout_silenced() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null (the exporter's C++ log writes there, past sys.stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _torch_out(model: nn.Module, args: tuple) -> list[np.ndarray]:
    """The model's outputs as arrays, in the order the exporter writes them (a tuple/dict flattened)."""
    from torch.utils._pytree import tree_leaves

    with torch.no_grad():
        return [t.numpy() for t in tree_leaves(model(*(a.clone() for a in args))) if isinstance(t, torch.Tensor)]


def _ort_error(model: nn.Module, args: tuple, path: Path) -> float:
    """Largest difference between ONNX Runtime's outputs and torch's, over every output."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy().copy() for i, a in zip(session.get_inputs(), args)}
    outs, expected = session.run(None, feeds), _torch_out(model, args)
    if len(outs) != len(expected) or any(o.shape != e.shape for o, e in zip(outs, expected)):
        return math.inf
    return max((float(np.abs(o - e).max()) for o, e in zip(outs, expected) if o.size), default=0.0)
