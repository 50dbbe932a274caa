"""Checks of what a user hands to :func:`snl_fx.linearize`, before any work is done."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from snl_fx import passes
from snl_fx.errors import SnlFxError


def check_data(data: Dataset | DataLoader | None, example_input: Any, name: str = "data") -> None:
    """Refuse data that is not (input tensor, integer label) pairs shaped like the example input.

    Reads one item of a Dataset (or one batch of a DataLoader). A Dataset item's input must have
    the example's shape without its batch dim; a batch's, the same dims after the batch dim.
    """
    if data is None:
        return
    if not isinstance(data, (Dataset, DataLoader)):
        raise SnlFxError(f"{name} must be a torch Dataset or DataLoader of (input, label), got {type(data).__name__}")
    batched = isinstance(data, DataLoader)
    what = "a batch of the DataLoader" if batched else "item 0 of the Dataset"
    try:
        if not batched and len(data) == 0:  # type: ignore[arg-type]
            raise SnlFxError(f"{name} is empty")
        item = next(iter(data)) if batched else data[0]
    except SnlFxError:
        raise
    except StopIteration:
        raise SnlFxError(f"{name} is empty") from None
    except Exception as exc:  # noqa: BLE001 - the user's data failed to produce an item
        raise SnlFxError(f"reading {what} ({name}) raised {type(exc).__name__}: {exc}") from None
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        kind = f"a {len(item)}-tuple" if isinstance(item, (tuple, list)) else type(item).__name__
        raise SnlFxError(f"{what} ({name}) is {kind}; it must be an (input, label) pair")
    x, y = item
    if not isinstance(x, torch.Tensor):
        raise SnlFxError(f"the input in {what} ({name}) is {type(x).__name__}, not a tensor")
    if isinstance(y, torch.Tensor):
        integral = not y.dtype.is_floating_point and not y.dtype.is_complex
    else:
        integral = isinstance(y, int) and not isinstance(y, bool)
    if not integral:
        raise SnlFxError(f"the label in {what} ({name}) is {getattr(y, 'dtype', type(y).__name__)}, not an integer class index")
    args = passes.as_args(example_input)
    if len(args) != 1:
        return  # several inputs: the training loop feeds one; nothing to compare
    want = tuple(args[0].shape[1:])
    got = tuple(x.shape[1:] if batched else x.shape)
    if got != want:
        raise SnlFxError(
            f"the input in {what} ({name}) has shape {got} per sample, the example input {want}: "
            "the model and the data must agree"
        )
