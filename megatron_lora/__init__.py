"""LoRA adapters for megatron-core models split by tensor and sequence parallelism.

The public names resolve on first use (PEP 562), so ``import megatron_lora.cli`` does not
import megatron-core before the command line has silenced its import-time warnings.
"""

from importlib import import_module

_HOMES = {
    "LoraConfig": "config",
    "LoraConfigError": "config",
    "ExperimentConfig": "experiment",
    "ExperimentConfigError": "experiment",
    "load_experiment": "experiment",
    "dispatch_megatron": "dispatch",
    "AdapterError": "errors",
    "MegatronLoraError": "errors",
    "clip_lora_grads_": "grad_sync",
    "finalize_lora_grads": "grad_sync",
    "finalize_model_grads_with_lora": "grad_sync",
    "lora_grad_norm": "grad_sync",
    "LoraLayer": "layer",
    "LoraParallelLinear": "layer",
    "LoraVocabParallelEmbedding": "embedding",
    "LoraRouter": "router",
    "LoraReport": "model",
    "active_adapters": "model",
    "adapter_names": "model",
    "apply_lora": "model",
    "delete_adapter": "model",
    "disable_adapters": "model",
    "merge_adapter": "model",
    "merge_and_unload": "model",
    "set_adapter": "model",
    "unmerge_adapter": "model",
    "ParallelLayoutError": "parallel",
}

__all__ = sorted(_HOMES)
__version__ = "0.1.0"


def __getattr__(name):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{home}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOMES))
