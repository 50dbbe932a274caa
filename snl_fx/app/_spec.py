"""Command-line model specs and input shapes: ``pkg.module:factory``, ``torchvision:resnet18``."""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING

from snl_fx.errors import SnlFxError

if TYPE_CHECKING:  # torch is imported on use: parsing shapes for an ONNX file needs none
    import torch
    import torch.nn as nn


def load_model_spec(spec: str) -> nn.Module:
    """Build the model a spec names: ``package.module:factory`` or ``torchvision:<name>``."""
    import torch.nn as nn

    if ":" not in spec:
        raise SnlFxError(f"model spec {spec!r} must look like package.module:factory or torchvision:<name>")
    module_name, _, attr = spec.partition(":")
    if module_name == "torchvision":
        import torchvision

        try:
            factory = torchvision.models.get_model_builder(attr)
        except ValueError:
            raise SnlFxError(f"torchvision has no model {attr!r}") from None
        kwargs = {"weights": None}
    else:
        try:
            module = _import(module_name)
        except Exception as exc:  # noqa: BLE001 - any import failure is a bad spec
            raise SnlFxError(f"cannot import {module_name!r} from spec {spec!r}: {type(exc).__name__}: {exc}") from None
        factory = getattr(module, attr, None)
        if factory is None:
            raise SnlFxError(f"module {module_name!r} has no attribute {attr!r}")
        kwargs = {}
    if not callable(factory):
        raise SnlFxError(f"{spec!r} is not callable: name a function or class that builds the model")
    try:
        model = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's factory failed; say so in one line
        raise SnlFxError(f"factory {spec!r} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise SnlFxError(f"factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _import(module_name: str) -> object:
    """The module a spec names, or a module its package exposes by that name (``snl_fx.models``)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        package, _, name = module_name.rpartition(".")
        if exc.name != module_name or not package or not hasattr(importlib.import_module(package), name):
            raise
        return getattr(importlib.import_module(package), name)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` (or ``"1x3x32x32"``) -> ``(1, 3, 32, 32)``; every dim a positive integer."""
    fields = re.split(r"[,x]", text.strip())
    if not all(re.fullmatch(r"\s*\d+\s*", f) for f in fields):
        raise SnlFxError(f"--input-shape {text!r} is not a list of positive integers, e.g. 1,3,32,32")
    dims = tuple(int(f) for f in fields)
    if any(d <= 0 for d in dims):
        raise SnlFxError(f"--input-shape {text!r} needs positive dims, e.g. 1,3,32,32")
    return dims


def example_inputs(shapes: list[tuple[int, ...]]) -> tuple[torch.Tensor, ...]:
    """Random example inputs of the given shapes (seeded: counts never depend on values)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=gen) for s in shapes)
