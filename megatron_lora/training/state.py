"""Checkpoints for an exact resume: the trainer's ``state_dict()`` (optimiser state, RNG
states, iteration, consumed samples) on disk, every file through one atomic writer.

    DIR/iter_0000100/rank_00000.safetensors    optimiser state and RNG states of each rank
    DIR/iter_0000100/trainer_state.json        iteration, consumed samples, layout
    DIR/latest_checkpointed_iteration.txt      written last, atomically
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..agreement import raise_if_any_rank_failed
from ..atomic import write_file_atomically
from ..topology import Topology
from .errors import TrainingError
from .rundir import LATEST, TRAINER_STATE, iteration_directory, latest_iteration_directory
from ..untrusted import loads_json


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
                "layout": parallel_layout(), "lora": state["lora"]}
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
    return info


def load_checkpoint(trainer, load) -> None:
    """Resume exactly: weights, optimiser state, RNG states, iteration and data position.
    Collective."""
    directory = latest_iteration_directory(load)
    info = _read_trainer_state(load, directory)
    if info["layout"] != parallel_layout():
        raise TrainingError(
            f"--load {load}: saved with layout {info['layout']}, this run has "
            f"{parallel_layout()}; exact resume needs the same layout (start a new run with "
            f"--lora-load {directory}/adapter to continue the adapter at another layout)")
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
