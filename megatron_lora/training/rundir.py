"""What a run directory (--save, --load) holds, and the checks that keep a run from writing
over another run, the base checkpoint or a file by surprise."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import TrainingError

LATEST = "latest_checkpointed_iteration.txt"
TRAINER_STATE = "trainer_state.json"
METRICS = "metrics.jsonl"
# beside a full-training dist-checkpoint's metadata.json: the model it holds, so a later run
# is checked against it before any model is built
MODEL_DESCRIPTION = "model_description.json"
# what these scripts write into --save; a directory holding anything else is not theirs
RUN_ENTRIES = (LATEST, METRICS, "tensorboard", "loss_curve.png", "adapter", "model")


def is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or (name.startswith("iter_") and name[5:].isdigit())


def iteration_directory(save, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def _inside(path: Path, other: Path) -> bool:
    """Whether ``path`` is ``other`` or lies under it (both resolved)."""
    return path == other or other in path.parents


def check_save_directory(settings) -> None:
    """--save must be a new or empty directory, this run's own (resumed with --load of it), or
    replaced on purpose (--overwrite); never the base checkpoint; writable. No side effects."""
    save = Path(settings.save)
    target = save.resolve()
    if settings.pretrained_checkpoint:
        base = Path(settings.pretrained_checkpoint).resolve()
        if _inside(target, base) or _inside(base, target):
            raise TrainingError(
                f"--save {settings.save} overlaps --pretrained-checkpoint "
                f"{settings.pretrained_checkpoint}: the base checkpoint is never written to; "
                f"save to another directory")
    if save.exists() and not save.is_dir():
        raise TrainingError(f"--save {settings.save} is a file, not a directory")
    entries = sorted(p.name for p in save.iterdir()) if save.is_dir() else []
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


def _check_run_entries(settings, save: Path, entries) -> None:
    """A non-empty --save: only a run of these scripts, and only this run's or --overwrite."""
    foreign = [name for name in entries if not is_run_entry(name)]
    if foreign:
        raise TrainingError(
            f"--save {settings.save} holds files that are not a run of these scripts "
            f"({', '.join(foreign[:3])}{' …' if len(foreign) > 3 else ''}); choose a new or "
            f"empty directory")
    resuming = settings.load and Path(settings.load).resolve() == save.resolve()
    if not resuming and not settings.overwrite:
        marker = save / LATEST
        where = f" (at iteration {marker.read_text().strip()})" if marker.is_file() else ""
        raise TrainingError(
            f"--save {settings.save} holds another run{where}; resume it with --load "
            f"{settings.save}, or replace it with --overwrite")


def clear_previous_run(save: Path) -> None:
    """--overwrite: remove what an earlier run wrote into --save (only the scripts' own
    entries; check_save_directory refused anything else). Rank 0, before anything is written."""
    if not save.is_dir():
        return
    for entry in save.iterdir():
        if is_run_entry(entry.name):
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
    text = marker.read_text(errors="replace").strip()
    if not (text.isascii() and text.isdigit()):  # '²'.isdigit() is True, int('²') fails
        raise TrainingError(f"--load {load}: {marker} holds {text[:40]!r}, not an iteration "
                            f"number")
    directory = iteration_directory(load, int(text))
    if not (directory / TRAINER_STATE).is_file():
        raise TrainingError(f"--load {load}: {LATEST} points at iteration {int(text)}, but "
                            f"{directory / TRAINER_STATE} does not exist")
    return directory
