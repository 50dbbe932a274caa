"""Files that must not rot: written atomically, checked against their checksums before loading.

``torch.save`` writes a zip archive whose every record carries a CRC-32 of its content; torch's
own reader does not check them, so a flipped byte in tensor data loads silently. ``load_checked``
verifies every record with the standard library's ``zipfile`` before ``torch.load``.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from snl_fx.errors import SnlFxError


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], suffix: str = "") -> None:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it over ``path``.

    ``suffix`` ends the temporary name (``".png"`` for writers that read the format from it).
    If ``write`` raises, nothing is left behind: neither the temporary file nor the folders
    created for it; ``path`` keeps what it held.
    """
    path = Path(path)
    created: list[Path] = []
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        _make_dirs(path.parent, created)
        write(tmp)
        os.replace(tmp, path)
        created = []
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        _remove_dirs(created)


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Raise a one-line SnlFxError naming ``what`` (e.g. ``"--out"``) unless files can be written in ``path``.

    Creates the missing folders, writes and removes a probe file, then removes the folders it
    created: the file system is left as it was.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SnlFxError(f"{what} {path} is a file, not a folder: name a folder for the outputs")
    created: list[Path] = []
    probe = path / f".snl_fx_probe.{os.getpid()}.tmp"
    try:
        _make_dirs(path, created)
        probe.write_bytes(b"")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SnlFxError(f"{what} {path} cannot be written ({reason}): name a folder you can write to") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        _remove_dirs(created)


def _make_dirs(folder: Path, created: list[Path]) -> None:
    """Create ``folder`` and its missing parents, appending each one created to ``created``."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # made meanwhile by another process: not ours to remove
            continue
        created.append(folder)


def _remove_dirs(created: list[Path]) -> None:
    """Remove the folders of ``created`` (innermost first) while they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return


FileIds = Mapping[str, tuple[int, int, int]]


def file_ids(folder: str | os.PathLike) -> dict[str, tuple[int, int, int]]:
    """The regular files directly in ``folder``, each with (inode, mtime in ns, size): a file
    rewritten since (atomically, or in place) has another id. Empty when there is no folder."""
    ids = {}
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            ids[entry.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return ids


def written_since(folder: str | os.PathLike, before: FileIds) -> set[str]:
    """Names of the files in ``folder`` that are new or rewritten since ``before = file_ids(folder)``."""
    return {name for name, ident in file_ids(folder).items() if before.get(name) != ident}


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
