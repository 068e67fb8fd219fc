"""Adapters inside megatron-core dist-checkpoints: the LoRA entries of a model's sharded state
dict, and megatron's save guarded against a dead writer (megatron_lora.watchdog)."""

from __future__ import annotations

from pathlib import Path

import torch

from .adapter_file import AdapterCheckpointError
from .model import ModelLike, model_chunks
from .safe_pickle import check_dist_checkpoint
from .watchdog import end_process_if_helper_dies


def _is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def adapter_sharded_state_dict(model: ModelLike) -> dict:
    """The LoRA entries of the model's megatron sharded state dict (every adapter, every chunk).

    The wrapper's ``sharded_state_dict`` keeps the base's keys unchanged and adds the factors
    under keys holding ``.lora_A.`` / ``.lora_B.``, so a full-model save with
    ``megatron.core.dist_checkpointing`` carries the adapters along and this filter gives the
    adapter-only view.
    """
    state = {}
    for chunk in model_chunks(model):
        state.update({k: v for k, v in chunk.sharded_state_dict().items() if _is_lora_key(k)})
    if not state:
        raise AdapterCheckpointError("the model has no LoRA adapters to checkpoint")
    return state


def save_dist_checkpoint(sharded_state_dict, directory) -> None:
    """megatron-core ``dist_checkpointing.save``, guarded: if one of its writer threads or
    processes dies, this rank ends at once with the cause on stderr instead of waiting for
    the writer forever (see :mod:`megatron_lora.watchdog`). Collective."""
    # heavy (megatron's dist-checkpointing strategies); only megatron dist-checkpoints need it
    from megatron.core import dist_checkpointing


    with end_process_if_helper_dies(f"saving the megatron dist-checkpoint {directory}"):
        dist_checkpointing.save(sharded_state_dict, str(directory))


def save_adapter_distributed(model: ModelLike, directory) -> None:
    """Adapter-only megatron dist-checkpoint (every rank writes its shards). Collective."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    save_dist_checkpoint(adapter_sharded_state_dict(model), directory)


def load_adapter_distributed(model: ModelLike, directory) -> None:
    """Load an adapter-only (or full-model) dist-checkpoint into the model's existing adapters,
    at any TP/PP layout. The checkpoint is read into fresh buffers first, so a failing load
    (missing keys, other shapes) changes no parameter. Collective."""
    # heavy (megatron's dist-checkpointing strategies); only megatron dist-checkpoints need it
    from megatron.core import dist_checkpointing

    state = adapter_sharded_state_dict(model)
    parameters = {key: item.data for key, item in state.items()}
    for item in state.values():  # read into new buffers, not into the parameters
        item.data = torch.empty_like(item.data)
    check_dist_checkpoint(directory)  # its pickles hold checkpoint data only, or it is refused
    try:
        loaded = dist_checkpointing.load(state, str(directory))
    except Exception as error:  # megatron raises several types (CheckpointingException, …)
        raise AdapterCheckpointError(f"cannot load the adapter from {directory}: {error}") from None
    missing = sorted(set(parameters) - set(loaded))
    if missing:
        raise AdapterCheckpointError(f"{directory} lacks adapter keys {missing[:4]}")
    with torch.no_grad():
        for key, parameter in parameters.items():
            parameter.copy_(loaded[key])
