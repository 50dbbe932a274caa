"""The inspector: every ReLU site (and every other nonlinearity) of a torch module or an ONNX file.

``relu_count`` reads either; the ONNX path (``onnx_model``) never imports torch, the torch path
(``torch_model``) traces the module with :mod:`snl_fx.passes`. Both give a :class:`ReluReport`
(``report``): sites with ReLUs per sample, other nonlinearities, linear layers, ReLU depth.
"""

from __future__ import annotations

import os
from typing import Any

from snl_fx.errors import SnlFxError
from snl_fx.inspect.report import LinearCount, OtherCount, ReluReport, ScaleCount, SiteCount

__all__ = ["LinearCount", "OtherCount", "ReluReport", "ScaleCount", "SiteCount", "relu_count"]


def relu_count(
    model_or_onnx_path: Any,
    example_input: Any = None,
    *,
    input_shapes: list[tuple[int, ...]] | None = None,
) -> ReluReport:
    """Count ReLUs per sample, site by site, in a torch module or an ONNX file.

    Args:
        model_or_onnx_path: an nn.Module (not gated: lower it with :func:`snl_fx.convert` first),
            or the path of an ONNX file (Relu, Clip(min=0) and Max(x, 0) count as ReLUs).
        example_input: for a module: an example batch (batch first; any batch size gives the
            same per-sample counts), or a tuple of the forward's inputs.
        input_shapes: for an ONNX file whose inputs have dynamic dims beyond the batch dim.

    Returns:
        A :class:`ReluReport`: ``sites`` (name, op, shape, ReLUs), ``total`` per sample,
        ``relu_layers``, ``relu_depth``, other nonlinearities (``others``), ReLUs not gateable,
        linear layers; ``.table()`` for people, ``.to_dict()`` for machines. Raises SnlFxError
        on bad input.

    Example:
        >>> report = snl_fx.relu_count(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
        >>> report.total, report.relu_depth
        (2308096, 17)
        >>> snl_fx.relu_count("model.onnx").total  # no torch imported for this
    """
    if isinstance(model_or_onnx_path, (str, os.PathLike)):
        from snl_fx.inspect.onnx_model import onnx_relu_report

        return onnx_relu_report(model_or_onnx_path, input_shapes)
    import torch.nn as nn

    if not isinstance(model_or_onnx_path, nn.Module):
        raise SnlFxError(f"expected an nn.Module or an ONNX path, got {type(model_or_onnx_path).__name__}")
    from snl_fx.inspect.torch_model import module_report

    return module_report(model_or_onnx_path, example_input)
