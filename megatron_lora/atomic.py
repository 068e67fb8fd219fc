"""The one home of how outputs are written: a crash, a full disk or an error leaves the old
file (or directory) or the new one, never a torn one, and nothing of the attempt behind.

Every writer of the package goes through here:

- :func:`write_file_atomically` (bytes or text) and :func:`staged_files` (for a library that
  writes the file itself: safetensors, megatron's indexed-dataset builder, matplotlib) write a
  temporary sibling with a unique name (two writers never share one), fsync it, rename it over
  the path and fsync the directory;
- :func:`build_directory_atomically` fills a temporary sibling directory, fsyncs what was
  written and swaps it in with one atomic exchange.

On any failure (disk full included) the temporary file or directory is removed before the
error goes on. An output path that is a symbolic link is refused (:class:`OutputPathError`)
rather than replaced by a file or followed into another place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple, Union

from .errors import MegatronLoraError

PathLike = Union[str, os.PathLike]

_NAME_KEPT = 80  # of the output's name in a temporary's name (the whole must stay < NAME_MAX)


class OutputPathError(MegatronLoraError):
    """An output path that is not written: a symbolic link, a file where a directory goes,
    or a directory the caller may not replace."""


def refuse_symlink(path: PathLike) -> None:
    """OutputPathError when ``path`` itself is a symbolic link (dangling or not)."""
    path = Path(path)
    if path.is_symlink():
        raise OutputPathError(f"{path} is a symbolic link (to {os.readlink(path)}); outputs are "
                              f"never written through or over a link: give the real path or "
                              f"another one")


def fsync_path(path: PathLike) -> None:
    """fsync a file or a directory by its path (a directory: its entries are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: PathLike, data: Union[str, bytes]) -> None:
    """Write ``data`` to ``path`` and fsync it (text as UTF-8). Not atomic by itself: for files
    in a staging directory that is swapped in afterwards, or behind a rename."""
    with open(path, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())


def _unique_sibling(path: Path, kind: str, make: Callable[[Path], None]) -> Path:
    """A new hidden sibling of ``path`` named after it, made by ``make`` (which must fail
    with FileExistsError when the name is taken): unique per process and per call, so two
    writers of one path never write the same temporary."""
    while True:
        candidate = path.with_name(f".{path.name[:_NAME_KEPT]}.{kind}-{os.getpid()}-"
                                   f"{secrets.token_hex(4)}")
        try:
            make(candidate)
            return candidate
        except FileExistsError:
            continue


def _new_file(path: Path) -> None:
    # O_EXCL: never someone else's file; 0o666 under the umask, as open(path, "w") would make
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


@contextlib.contextmanager
def staged_files(*paths: PathLike) -> Iterator[Tuple[Path, ...]]:
    """Temporary siblings of ``paths`` for the caller to write; when the block ends without an
    error each is fsynced and renamed over its path (in the order given), then the
    directories are fsynced. On an error (or an interrupt) the temporaries are removed and
    the paths keep what they held."""
    targets = [Path(p) for p in paths]
    for target in targets:
        refuse_symlink(target)
    temporaries = []
    try:
        for target in targets:
            temporaries.append(_unique_sibling(target, "tmp", _new_file))
        yield tuple(temporaries)
        for temporary in temporaries:
            fsync_path(temporary)
        for temporary, target in zip(temporaries, targets):
            refuse_symlink(target)  # made while the block ran: still not replaced
            os.replace(temporary, target)
        for directory in {t.parent for t in targets}:
            fsync_path(directory)
    finally:
        for temporary in temporaries:
            _remove(temporary)  # after the renames: nothing left to remove


def write_file_atomically(path: PathLike, data: Union[str, bytes]) -> Path:
    """Replace ``path`` with ``data`` in one rename: readers see the old file or the new one."""
    with staged_files(path) as (temporary,):
        write_synced(temporary, data)
    return Path(path)


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second),
                       rename_exchange)
    if result == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # filesystem without exchange support: caller falls back
    raise OSError(ctypes.get_errno(), f"cannot swap {first} and {second}")


def _swap_in(staging: Path, path: Path) -> None:
    """Put ``staging`` at ``path``; afterwards ``staging`` holds the old directory (if any)."""
    if not path.exists():
        os.rename(staging, path)
    elif not _exchange(staging, path):
        # two renames; should the second fail, the first is undone so the old one stays
        previous = _unique_sibling(path, "previous", lambda p: os.mkdir(p, 0o700))
        os.rename(path, previous / path.name)
        try:
            os.rename(staging, path)
        except BaseException:
            os.rename(previous / path.name, path)  # should this fail too, previous keeps it
            os.rmdir(previous)
            raise
        _remove(previous)


def build_directory_atomically(path: PathLike, fill: Callable[[Path], None],
                               not_replaceable: Callable[[Path], Optional[str]]) -> Path:
    """Build the directory ``path`` with ``fill(staging)`` so a crash (or an error in
    ``fill``, a full disk included) leaves the old one or the new one, and no staging
    directory behind.

    ``fill`` writes into a temporary sibling directory, whose files are then fsynced, and the
    directory is swapped in with one atomic exchange (two renames where the filesystem cannot
    exchange). An existing ``path`` is replaced only if ``not_replaceable(path)`` gives None;
    otherwise its reason is in the error. A ``path`` that is a symbolic link is refused.
    """
    path = Path(path)
    refuse_symlink(path)
    if path.exists():
        if not path.is_dir():
            raise OutputPathError(f"{path} exists and is not a directory")
        reason = not_replaceable(path)
        if reason:
            raise OutputPathError(f"refusing to replace {path}: {reason}; choose an empty or "
                                  f"new directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0o777 under the umask, as mkdir would make it (tempfile.mkdtemp's 0o700 would stay)
    staging = _unique_sibling(path, "saving", lambda p: os.mkdir(p, 0o777))
    try:
        fill(staging)
        for written in staging.rglob("*"):  # fsync what fill wrote, however it wrote it
            fsync_path(written)
        fsync_path(staging)
        refuse_symlink(path)  # made while fill ran: still not replaced
        _swap_in(staging, path)
        fsync_path(path.parent)
    finally:
        _remove(staging)  # after an exchange: the old directory
    return path
