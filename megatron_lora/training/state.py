"""Checkpoints for an exact resume: the trainer's ``state_dict()`` (optimiser state, RNG
states, iteration, consumed samples) on disk, every file through one atomic writer.

    DIR/iter_0000100/rank_00000.safetensors    optimiser state and RNG states of each rank
    DIR/iter_0000100/trainer_state.json        iteration, consumed samples, layout
    DIR/latest_checkpointed_iteration.txt      written last, atomically
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..agreement import raise_if_any_rank_failed
from ..atomic import write_file_atomically
from ..topology import Topology
from .errors import TrainingError
from .rundir import (
    LATEST,
    TRAINER_STATE,
    iteration_directory,
    latest_iteration_directory,
    layout_mismatch,
)
from ..untrusted import loads_json, sha256_of_file


def rank_file(directory: Path) -> Path:
    return directory / f"rank_{dist.get_rank():05d}.safetensors"


def parallel_layout() -> dict:
    # every size that decides which shard of parameters and optimiser state a rank holds
    place = Topology.current()
    return {"world_size": dist.get_world_size(),
            "tensor_model_parallel_size": place.tp_size,
            "pipeline_model_parallel_size": place.pp_size,
            "expert_model_parallel_size": place.ep_size,
            "expert_tensor_parallel_size": place.etp_size}


def capture_rng() -> dict:
    """This process's RNG states: torch's and megatron's tracker (dropout under TP)."""
    states = {"torch": torch.get_rng_state()}
    for name, value in get_cuda_rng_tracker().get_states().items():
        states[f"tracker.{name}"] = value if isinstance(value, torch.Tensor) \
            else torch.tensor(value)
    return states


def restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    get_cuda_rng_tracker().set_states({key[len("tracker."):]: value
                                       for key, value in states.items()
                                       if key.startswith("tracker.")})


def save_checkpoint(trainer, save) -> Path:
    """Everything an exact resume needs, then the 'latest' marker (atomic, written last).
    Collective."""
    state = trainer.state_dict()
    directory = iteration_directory(save, state["iteration"])
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    trainer.save_weights(directory)
    tensors = {**{f"rng.{key}": value for key, value in state["rng"].items()},
               **{f"optimizer.{key}": value for key, value in state["optimizer"].items()}}
    write_file_atomically(rank_file(directory), safetensors_bytes(tensors))
    dist.barrier()
    if dist.get_rank() == 0:
        info = {"iteration": state["iteration"], "consumed_samples": state["consumed_samples"],
                "layout": parallel_layout(), "lora": state["lora"], "run": trainer.run_record}
        write_file_atomically(directory / TRAINER_STATE, json.dumps(info, indent=2))
        write_file_atomically(Path(save) / LATEST, f"{state['iteration']}\n")
    dist.barrier()
    return directory


def _read_rank_state(load, directory: Path) -> dict:
    """This rank's optimiser and RNG state; a damaged file is an error on every rank."""
    path, state, problem = rank_file(directory), None, None
    try:
        state = load_file(str(path))
        if "rng.torch" not in state:
            problem = f"--load {load}: {path} holds no RNG state (not written by these scripts)"
    except FileNotFoundError:
        problem = f"--load {load}: {path} is missing (the save did not finish on every rank)"
    except Exception as error:  # safetensors' own error type for a truncated/corrupt file
        problem = (f"--load {load}: {path} cannot be read ({str(error).splitlines()[0]}); the "
                   f"checkpoint is damaged: resume from an earlier iteration")
    raise_if_any_rank_failed(TrainingError(problem) if problem else None, TrainingError)
    return state


def _read_trainer_state(load, directory: Path) -> dict:
    try:
        path = directory / TRAINER_STATE
        info = loads_json(path.read_text(), path, TrainingError)
        info["layout"], info["lora"], info["consumed_samples"]  # noqa: B018 (presence)
    except (ValueError, KeyError, TypeError) as error:
        raise TrainingError(f"--load {load}: {directory / TRAINER_STATE} is damaged ({error})") \
            from None
    if not isinstance(info.get("run", {}), dict):
        raise TrainingError(f"--load {load}: {directory / TRAINER_STATE} is damaged (its run "
                            f"record is not an object)")
    return info


# --- a resume is the run it resumes ---------------------------------------------------------------

# what --load may change: how long the run goes on, how often it saves, evaluates and reports
# (docs/resume.md); every other setting of the record below must be the run's own
MAY_CHANGE_ON_RESUME = ("--train-iters", "--save-interval", "--eval-interval", "--eval-iters",
                        "--log-interval", "--no-progress-bar", "--save")

# LoraConfig fields that change the numbers once the factors exist (init and its seed do not:
# a resume loads the factors)
_LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
                "exclude_modules", "rank_pattern", "lora_dtype")
_SCHEDULE_FIELDS = ("lr", "min_lr", "lr_decay_style", "lr_warmup_iters", "weight_decay",
                    "clip_grad", "adam_beta1", "adam_beta2", "adam_eps", "micro_batch_size",
                    "split", "sft", "sft_sequence_packing", "sft_loss_on_all_tokens",
                    "sft_no_truncation")


def _fingerprint(path: Path, hashed: bool) -> str:
    """Size, and for small files (an .idx, a JSONL) a streamed sha256: a changed corpus is
    caught without reading a large .bin again."""
    size = path.stat().st_size
    if not hashed:
        return f"{size} bytes"
    return f"{size} bytes, sha256 {sha256_of_file(path)}"


def _data_record(values: List[str]) -> dict:
    """The data paths (absolute) and each file's fingerprint; blend weights kept as given."""
    paths, content = [], {}
    for value in values:
        as_file, as_prefix = Path(value), Path(f"{value}.idx")
        if as_file.is_file():
            paths.append(str(as_file.resolve()))
            content[str(as_file.resolve())] = _fingerprint(as_file, hashed=True)
        elif as_prefix.is_file():
            prefix = str(Path(value).resolve())
            paths.append(prefix)
            content[f"{prefix}.idx"] = _fingerprint(as_prefix, hashed=True)
            content[f"{prefix}.bin"] = _fingerprint(Path(f"{value}.bin"), hashed=False)
        else:
            paths.append(value)  # a blend weight
    return {"paths": paths, "content": content}


def run_record(settings, experiment, lora, global_batch: Optional[int]) -> dict:
    """Every setting of this run that changes its numbers (saved in trainer_state.json, and
    compared by check_resume_matches before a resume)."""
    model = lora.to_dict() if lora is not None else None
    record = {
        "lora": None if model is None else {key: model[key] for key in _LORA_FIELDS},
        "data_path": _data_record(settings.data_path_values()),
        "valid_data_path": _data_record(settings.valid_data_path_values()),
        "tokenizer": [settings.tokenizer_type or settings.tokenizer,
                      str(Path(settings.tokenizer_model).resolve())
                      if settings.tokenizer_model else None],
        "seq_length": experiment.seq_length,
        "seed": experiment.seed,
        **{name: getattr(settings, name) for name in _SCHEDULE_FIELDS},
        "global_batch_size": global_batch,
    }
    if record["lora"] is not None and record["lora"]["target_modules"] is not None:
        record["lora"]["target_modules"] = sorted(record["lora"]["target_modules"])
    return json.loads(json.dumps(record))  # as it reads back from the file


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


# the flag that sets a record entry, where it is not --KEY
_FLAGS = {"lora.r": "--lora-rank", "lora.lora_alpha": "--lora-alpha",
          "lora.lora_dropout": "--lora-dropout", "lora.target_modules": "--lora-target-modules",
          "tokenizer": "--tokenizer-type/--tokenizer-model"}


def _flag(key: str) -> str:
    return _FLAGS.get(key, key if "." in key else f"--{key.replace('_', '-')}")


def _both(key: str, theirs, mine) -> str:
    return f"{_flag(key)}: the run's {_short(theirs)}, this run's {_short(mine)}"


def _data_difference(key: str, theirs, mine: dict) -> str:
    """Other paths, or the same paths with other content (a file edited in place)."""
    their_paths = theirs.get("paths") if isinstance(theirs, dict) else theirs
    if their_paths != mine["paths"]:
        return _both(key, their_paths, mine["paths"])
    content = theirs.get("content") if isinstance(theirs, dict) else None
    then = content if isinstance(content, dict) else {}
    changed = [path for path in mine["content"] if then.get(path) != mine["content"][path]]
    if not changed:  # the record has entries this run has not: name both whole
        return _both(key, theirs, mine)
    return (f"{_flag(key)}: {', '.join(changed)} changed since the run saved (then "
            f"{'; '.join(str(then.get(p, 'absent')) for p in changed)}, now "
            f"{'; '.join(mine['content'][p] for p in changed)})")


def _differences(saved: dict, ours: dict) -> List[str]:
    """One short phrase per setting that differs, naming it and both values."""
    found = []
    for key in sorted(set(saved) | set(ours)):
        theirs, mine = saved.get(key), ours.get(key)
        if theirs == mine:
            continue
        if key.endswith("data_path") and isinstance(mine, dict):
            found.append(_data_difference(key, theirs, mine))
        elif isinstance(theirs, dict) and isinstance(mine, dict):
            found += [_both(f"{key}.{field}", theirs.get(field), mine.get(field))
                      for field in sorted(set(theirs) | set(mine))
                      if theirs.get(field) != mine.get(field)]
        else:
            found.append(_both(key, theirs, mine))
    return found


def saved_run_record(load) -> Optional[dict]:
    """The run record of --load's latest iteration (None: saved before records existed)."""
    directory = latest_iteration_directory(load)
    return _read_trainer_state(load, directory).get("run")


def check_resume_matches(load, record: dict) -> None:
    """--load: refuse a run whose settings differ from the run it resumes, naming both values."""
    saved = saved_run_record(load)
    if saved is None:
        return
    kinds = [("LoRA" if run.get("lora") else "full") for run in (saved, record)]
    if kinds[0] != kinds[1]:
        raise TrainingError(f"--load {load}: a {kinds[0]} training checkpoint cannot resume a "
                            f"{kinds[1]} run")
    found = _differences(saved, record)
    if found:
        raise TrainingError(
            f"--load {load} resumes a run with other settings ({'; '.join(found[:3])}"
            f"{f'; and {len(found) - 3} more' if len(found) > 3 else ''}); a resume keeps "
            f"every setting but {', '.join(MAY_CHANGE_ON_RESUME)}: match them, or start a new "
            f"run from its adapter with --lora-load")


def load_checkpoint(trainer, load) -> None:
    """Resume exactly: weights, optimiser state, RNG states, iteration and data position.
    Collective."""
    directory = latest_iteration_directory(load)
    info = _read_trainer_state(load, directory)
    # the layout first: at another layout the batch sizes differ too, and this says why
    if info["layout"] != parallel_layout():
        raise layout_mismatch(load, info["layout"], parallel_layout(), directory)
    if "run" in info:  # the effective global batch needs the data-parallel size: here
        check_resume_matches(load, trainer.run_record)
    if info["lora"] != trainer.trains_lora:
        raise TrainingError(f"--load {load}: a {'LoRA' if info['lora'] else 'full'} training "
                            f"checkpoint cannot resume a "
                            f"{'LoRA' if trainer.trains_lora else 'full'} run")
    tensors = _read_rank_state(load, directory)
    trainer.load_weights(directory)
    trainer.load_state_dict({
        "iteration": int(directory.name[len("iter_"):]),
        "consumed_samples": info["consumed_samples"], "lora": info["lora"],
        "rng": {key[len("rng."):]: value for key, value in tensors.items()
                if key.startswith("rng.")},
        "optimizer": {key[len("optimizer."):]: value for key, value in tensors.items()
                      if key.startswith("optimizer.")}})
