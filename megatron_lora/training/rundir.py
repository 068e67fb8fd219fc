"""What a run directory (--save, --load) holds, and the checks that keep a run from writing
over another run, the base checkpoint or a file by surprise."""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Optional

from ..untrusted import read_json, short
from .errors import TrainingError

LATEST = "latest_checkpointed_iteration.txt"
TRAINER_STATE = "trainer_state.json"
METRICS = "metrics.jsonl"
# beside a full-training dist-checkpoint's metadata.json: the model it holds, so a later run
# is checked against it before any model is built
MODEL_DESCRIPTION = "model_description.json"
# the lock a run holds on its --save for its whole life (RunLock); the file itself means
# nothing once no process holds its lock (a killed run leaves it behind, harmlessly)
RUN_LOCK = "run.lock"
# what these scripts write into --save; a directory holding anything else is not theirs
RUN_ENTRIES = (LATEST, METRICS, "tensorboard", "loss_curve.png", "adapter", "model", RUN_LOCK)
# set by the launching process (--nproc-per-node) for its workers: the token it wrote into
# the lock it holds for them
LOCK_TOKEN_ENV = "MEGATRON_LORA_RUN_LOCK_TOKEN"


def is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or (name.startswith("iter_") and name[5:].isdigit())


def iteration_directory(save, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def _inside(path: Path, other: Path) -> bool:
    """Whether ``path`` is ``other`` or lies under it (both resolved)."""
    return path == other or other in path.parents


def check_path_flags(settings) -> None:
    """A path flag given as '' (an unset shell variable, say) is an error, not "no path"."""
    for name in ("save", "load", "pretrained_checkpoint", "data_cache_path", "tokenizer_model"):
        if getattr(settings, name) == "":
            flag = f"--{name.replace('_', '-')}"
            raise TrainingError(f"{flag} is empty (an unset shell variable?): give a "
                                f"directory, or leave {flag} out")


def _resuming(settings) -> bool:
    """--load of --save itself: this run continues the run already there."""
    return bool(settings.load) and Path(settings.load).resolve() == Path(settings.save).resolve()


def _inputs_of(settings):
    """(flag, path) of every input a run reads that could lie in or around --save."""
    named = [("--pretrained-checkpoint", settings.pretrained_checkpoint),
             ("--tokenizer-model", settings.tokenizer_model)]
    if not _resuming(settings):
        named.append(("--load", settings.load))
    for flag, values in (("--data-path", settings.data_path),
                         ("--valid-data-path", settings.valid_data_path)):
        values = [] if values is None else [values] if isinstance(values, str) else values
        named += [(flag, value) for value in values]
    return [(flag, Path(value)) for flag, value in named if value]


def check_inputs_survive(settings, more=()) -> None:
    """Writing a run never destroys what it reads: --save is none of its input directories
    nor inside one, and holds none of them (--overwrite would clear them). ``more``: (flag,
    path) of inputs that are not settings (--lora-load)."""
    if settings.save:
        _check_inputs_survive(settings, Path(settings.save).resolve(), more)


def _check_inputs_survive(settings, target: Path, more=()) -> None:
    named = _inputs_of(settings) + [(flag, Path(path)) for flag, path in more if path]
    for flag, path in named:
        source = path.resolve()
        if _inside(source, target) or _inside(target, source):
            what = "the base checkpoint is never written to" if \
                flag == "--pretrained-checkpoint" else "a run never writes over what it reads"
            raise TrainingError(f"--save {settings.save} overlaps {flag} {path}: {what}; "
                                f"save to another directory")
    if settings.overwrite and _resuming(settings):
        raise TrainingError(f"--overwrite would clear --save {settings.save}, the run --load "
                            f"resumes; leave --overwrite out to resume it, or --load out to "
                            f"start over")


def _check_no_dangling_link(save: Path, flag_value) -> None:
    """A symbolic link on --save's path that points nowhere: mkdir cannot make it."""
    for path in (save, *save.parents):
        if path.is_symlink() and not path.exists():
            raise TrainingError(f"--save {flag_value}: {path} is a symbolic link to "
                                f"{os.readlink(path)}, which does not exist; create that "
                                f"directory, remove the link, or save elsewhere")
        if path.exists():
            return


def check_save_directory(settings) -> None:
    """--save must be a new or empty directory, this run's own (resumed with --load of it), or
    replaced on purpose (--overwrite); never an input of the run (the base checkpoint, data,
    another run --load reads); writable. No side effects."""
    check_path_flags(settings)
    save = Path(settings.save)
    _check_no_dangling_link(save, settings.save)
    target = save.resolve()
    _check_inputs_survive(settings, target)
    if save.exists() and not save.is_dir():
        raise TrainingError(f"--save {settings.save} is a file, not a directory")
    entries = sorted(p.name for p in save.iterdir() if p.name != RUN_LOCK) \
        if save.is_dir() else []
    if entries:
        _check_run_entries(settings, save, entries)
    existing = save
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise TrainingError(f"--save {settings.save} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainingError(f"--save {settings.save} cannot be written: {existing} is not "
                            f"writable by this user")


def _marker_text(marker: Path) -> str:
    """The latest marker's iteration as written, quoted short if it is not a number (it is the
    user's file: any bytes, any length)."""
    with open(marker, "rb") as handle:  # a marker is a few digits: read no more than a line
        text = handle.read(256).decode("utf-8", errors="replace").strip()
    return text if text.isascii() and text.isdigit() and len(text) <= 12 else short(text)


def _check_run_entries(settings, save: Path, entries) -> None:
    """A non-empty --save: only a run of these scripts, and only this run's or --overwrite."""
    foreign = [name for name in entries if not is_run_entry(name)]
    if foreign:
        raise TrainingError(
            f"--save {settings.save} holds files that are not a run of these scripts "
            f"({', '.join(foreign[:3])}{' …' if len(foreign) > 3 else ''}); choose a new or "
            f"empty directory")
    if not _resuming(settings) and not settings.overwrite:
        marker = save / LATEST
        where = f" (at iteration {_marker_text(marker)})" if marker.is_file() else ""
        raise TrainingError(
            f"--save {settings.save} holds another run{where}; resume it with --load "
            f"{settings.save}, or replace it with --overwrite")


def clears_previous_run(settings) -> bool:
    """--overwrite clears --save before the run writes, whatever --load reads (check_save_
    directory refused --overwrite of the run --load resumes)."""
    return bool(settings.overwrite) and not _resuming(settings)


def clear_previous_run(save: Path) -> None:
    """--overwrite: remove what an earlier run wrote into --save (only the scripts' own
    entries; check_save_directory refused anything else), never the lock this run holds.
    Rank 0, with the lock held, before anything is written."""
    if not save.is_dir():
        return
    for entry in save.iterdir():
        if is_run_entry(entry.name) and entry.name != RUN_LOCK:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def latest_iteration_directory(load) -> Path:
    """The iteration directory --load resumes from, checked to hold a complete save."""
    marker = Path(load) / LATEST
    if not marker.is_file():
        raise TrainingError(f"--load {load} is not a checkpoint directory of these scripts: "
                            f"{LATEST} is missing")
    text = _marker_text(marker)
    if not (text.isascii() and text.isdigit()):  # '²'.isdigit() is True, int('²') fails
        raise TrainingError(f"--load {load}: {marker} holds {text}, not an iteration number")
    directory = iteration_directory(load, int(text))
    if not (directory / TRAINER_STATE).is_file():
        raise TrainingError(f"--load {load}: {LATEST} points at iteration {int(text)}, but "
                            f"{directory / TRAINER_STATE} does not exist")
    return directory


# --- one run per directory ----------------------------------------------------------------------


class RunLock:
    """An exclusive ``flock`` on ``--save/run.lock``, held for the run's whole life.

    The kernel releases it when the holding process dies, however it dies, so a killed run
    never blocks its resume. Under ``--nproc-per-node`` the launching process takes it before
    torchrun starts (the loser of two runs started at once is then refused in one line, before
    any worker) and hands it on to torchrun; its workers find the launcher's token in the lock
    file (``LOCK_TOKEN_ENV``) and run under it. Without that launcher (torchrun, srun, one
    process) rank 0 takes it itself.
    """

    def __init__(self, save: Path, fd: Optional[int], made: Optional[Path], token: str):
        self.save, self.fd, self.made, self.token = save, fd, made, token

    @property
    def path(self) -> Path:
        return self.save / RUN_LOCK

    @classmethod
    def acquire(cls, save, trusted_token: Optional[str] = None) -> "RunLock":
        """The lock on ``save`` (made if missing), or a TrainingError naming its holder. With
        ``trusted_token``, a lock whose file holds that token is this run's already (the
        launcher's): returned without a descriptor."""
        save = Path(save)
        made = _first_missing(save)
        save.mkdir(parents=True, exist_ok=True)
        path = save / RUN_LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = os.pread(fd, 4096, 0).decode(errors="replace")
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    # e.g. ENOLCK: a network file system without locking
                    _remove_made(save, made)
                    raise TrainingError(
                        f"--save {save}: cannot lock {path}: {error.strerror} "
                        f"({errno.errorcode.get(error.errno, error.errno)}); save to a file "
                        f"system that supports flock") from None
                if trusted_token and trusted_token in holder.split():
                    return cls(save, None, None, trusted_token)
                _remove_made(save, made)
                who = holder.splitlines()[0].strip()[:200] if holder.strip() else "another process"
                raise TrainingError(f"--save {save} is in use by another run ({who}); wait "
                                    f"for it to end, or save to another directory") from None
            # a finishing run removes the file: a lock on a removed file guards nothing
            if _same_file(fd, path):
                break
            os.close(fd)
        token = secrets.token_hex(16)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n{token}\n".encode(), 0)
        return cls(save, fd, made, token)

    def release(self) -> None:
        """Remove the lock file (and a --save this run made and left empty), then unlock."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
            _remove_made(self.save, self.made)
        except OSError:
            pass  # a read-only or vanished --save: the kernel still drops the lock below
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _first_missing(path: Path) -> Optional[Path]:
    """The topmost directory of ``path`` that does not exist yet (mkdir would make it)."""
    missing = None
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return missing
        missing = candidate
    return missing


def _remove_made(save: Path, made: Optional[Path]) -> None:
    """Remove the directories the lock made (``save`` up to ``made``) while they are empty: a
    run that wrote nothing leaves nothing behind; one that wrote anything keeps it all."""
    if made is None:
        return
    for directory in (save, *save.parents):
        try:
            directory.rmdir()
        except OSError:
            return
        if directory == made:
            return


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


# --- resume layout ------------------------------------------------------------------------------


def planned_layout(experiment, world_size: int) -> dict:
    """The parallel layout a run of ``experiment`` on ``world_size`` ranks will have, keyed as
    state.parallel_layout() saves it, known before any process group exists."""
    return {"world_size": world_size,
            "tensor_model_parallel_size": experiment.tensor_model_parallel_size,
            "pipeline_model_parallel_size": experiment.pipeline_model_parallel_size,
            "expert_model_parallel_size": experiment.expert_model_parallel_size,
            "expert_tensor_parallel_size": experiment.expert_tensor_parallel_size}


def layout_mismatch(load, saved: dict, planned: dict, directory: Path) -> TrainingError:
    return TrainingError(
        f"--load {load}: saved with layout {saved}, this run has {planned}; exact resume "
        f"needs the same layout (start a new run with --lora-load {directory}/adapter to "
        f"continue the adapter at another layout)")


def check_resume_layout(load, experiment, world_size: int) -> None:
    """--load at another layout is refused here, in the launching process, before any worker
    starts. A trainer_state.json that cannot be read is left to the resume's own check, which
    names the damage."""
    directory = latest_iteration_directory(load)
    try:
        saved = read_json(directory / TRAINER_STATE, TrainingError)["layout"]
    except (OSError, TrainingError, KeyError, TypeError):
        return
    planned = planned_layout(experiment, world_size)
    if isinstance(saved, dict) and saved != planned:
        raise layout_mismatch(load, saved, planned, directory)
