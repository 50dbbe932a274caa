"""Checks of what a user hands to :func:`snl_fx.linearize`, before any work is done."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from snl_fx import passes
from snl_fx.errors import SnlFxError

ITEMS_CHECKED = 3  # of a Dataset: the first, the middle and the last item


def check_data(data: Dataset | DataLoader | None, example_input: Any, name: str = "data") -> None:
    """Refuse data that is not (input, integer label) pairs shaped like the example input.

    The input is a tensor, or a tuple of tensors for a model of several inputs (as the example
    input is). Reads the first, middle and last item of a Dataset (one batch of a DataLoader).
    A Dataset item's inputs must have the example's shapes without the batch dim; a batch's, the
    same dims after the batch dim. Labels may be Python, NumPy or torch integers.
    """
    if data is None:
        return
    if not isinstance(data, (Dataset, DataLoader)):
        raise SnlFxError(f"{name} must be a torch Dataset or DataLoader of (input, label), got {type(data).__name__}")
    batched = isinstance(data, DataLoader)
    if batched:
        indices = [None]
    else:
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise SnlFxError(f"{name} has no len(): pass a map-style Dataset or a DataLoader") from None
        if n == 0:
            raise SnlFxError(f"{name} is empty")
        indices = sorted({0, n // 2, n - 1})[:ITEMS_CHECKED]
    for index in indices:
        what = "a batch of the DataLoader" if batched else f"item {index} of the Dataset"
        try:
            item = next(iter(data)) if batched else data[index]
        except StopIteration:
            raise SnlFxError(f"{name} is empty") from None
        except Exception as exc:  # noqa: BLE001 - the user's data failed to produce an item
            raise SnlFxError(f"reading {what} ({name}) raised {type(exc).__name__}: {exc}") from None
        _check_item(item, passes.as_args(example_input), batched, f"{what} ({name})")


def _check_item(item: Any, example: tuple, batched: bool, what: str) -> None:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        kind = f"a {len(item)}-tuple" if isinstance(item, (tuple, list)) else type(item).__name__
        raise SnlFxError(f"{what} is {kind}; it must be an (input, label) pair")
    x, y = item
    inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise SnlFxError(f"the input in {what} is {type(x).__name__}, not a tensor (or a tuple of tensors)")
    if not _is_integer_label(y, batched):
        raise SnlFxError(f"the label in {what} is {getattr(y, 'dtype', type(y).__name__)}, not an integer class index")
    if len(inputs) != len(example):
        raise SnlFxError(f"the input in {what} has {len(inputs)} tensor(s), the example input {len(example)}: "
                         "give the model's inputs as a tuple in both")
    for i, (got_t, want_t) in enumerate(zip(inputs, example)):
        want = tuple(want_t.shape[1:])
        got = tuple(got_t.shape[1:] if batched else got_t.shape)
        if got != want:
            which = f"input {i}" if len(example) > 1 else "input"
            raise SnlFxError(f"the {which} in {what} has shape {got} per sample, the example input {want}: "
                             "the model and the data must agree")


def _is_integer_label(y: Any, batched: bool) -> bool:
    if isinstance(y, bool):
        return False
    if isinstance(y, torch.Tensor):
        return not y.dtype.is_floating_point and not y.dtype.is_complex and y.dtype != torch.bool
    if isinstance(y, numbers.Integral):  # int, numpy integer scalars
        return True
    dtype = getattr(y, "dtype", None)  # a numpy array (a batch, or a 0-d label)
    return getattr(dtype, "kind", None) in ("i", "u") and (batched or getattr(y, "ndim", 1) == 0)
