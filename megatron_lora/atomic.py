"""Writing files so that a crash leaves the old content or the new, never a torn file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def write_synced(path: Union[str, os.PathLike], data: Union[str, bytes]) -> None:
    """Write ``data`` to ``path`` and fsync it (text as UTF-8). Not atomic by itself: for files
    in a staging directory that is swapped in afterwards, or behind a rename."""
    with open(path, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())


def write_file_atomically(path: Union[str, os.PathLike], data: Union[str, bytes]) -> Path:
    """Replace ``path`` with ``data`` in one rename: readers see the old file or the new one."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    write_synced(temporary, data)
    os.replace(temporary, path)
    return path
