"""Files that must not rot: written atomically, checked against their checksums before loading.

``torch.save`` writes a zip archive whose every record carries a CRC-32 of its content; torch's
own reader does not check them, so a flipped byte in tensor data loads silently. ``load_checked``
verifies every record with the standard library's ``zipfile`` before ``torch.load``.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from snl_fx.errors import SnlFxError


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checked(path: str | os.PathLike, recover: str, map_location: Any = "cpu") -> Any:
    """Verify the checksums of a ``torch.save`` file, then load it with ``weights_only=True``.

    A truncated, damaged or foreign file raises a one-line SnlFxError naming the file and
    ``recover`` (what to do about it, e.g. "delete it to pretrain again").
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise SnlFxError(f"{path} is damaged or not a torch file ({_line(exc)}): {recover}") from None
    if bad is not None:
        raise SnlFxError(f"{path} is damaged (checksum mismatch in its record {bad}): {recover}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read the file is the file's problem
        raise SnlFxError(f"cannot read {path} ({_line(exc)}): {recover}") from None


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"
