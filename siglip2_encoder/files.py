"""Crash-safe file writing: every file this library writes goes through :func:`write_atomic`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomic"]


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[str], None]) -> None:
    """Write ``path`` so that a crash or power loss leaves either the old file or the whole new one.

    The content goes to a temporary file beside ``path`` (``data``: the bytes, or a function that writes a file at
    the path it is given, such as safetensors' ``save_file``), is flushed to disk, gets the permissions an ordinary
    new file would get (``0o666`` less the umask; temporary files are often created ``0o600``), and is renamed into
    place; the folder is flushed too, so the rename itself survives a power loss.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if callable(data):
            data(str(tmp))
        else:
            tmp.write_bytes(data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
