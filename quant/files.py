"""Atomic file writes, and handing freed memory back to the operating system."""

import contextlib
import ctypes
import ctypes.util
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed.

    A crash never leaves a half-written file under the final name. The file ends with mode 0644,
    because ``mkstemp`` creates it with 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name, suffix=".part", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def release_freed_memory() -> None:
    """Ask glibc to return freed heap memory to the operating system; does nothing on other C libraries.

    Loading a quantized file first builds the model in full precision and then frees most of it, and
    glibc keeps such freed heap pages mapped, so the process would go on counting them as resident.
    """
    name = ctypes.util.find_library("c")
    try:
        malloc_trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return
    if malloc_trim is not None:
        malloc_trim(0)
