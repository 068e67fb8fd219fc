"""LoRA adapters for megatron-core models split by tensor and sequence parallelism."""

from .config import LoraConfig
from .dispatch import dispatch_megatron
from .grad_sync import (
    clip_lora_grads_,
    finalize_lora_grads,
    finalize_model_grads_with_lora,
    lora_grad_norm,
)
from .layer import LoraParallelLinear
from .model import (
    LoraReport,
    active_adapters,
    adapter_names,
    apply_lora,
    delete_adapter,
    disable_adapters,
    merge_adapter,
    merge_and_unload,
    set_adapter,
    unmerge_adapter,
)
from .parallel import ParallelLayoutError

__all__ = [
    "LoraConfig",
    "LoraReport",
    "active_adapters",
    "adapter_names",
    "apply_lora",
    "clip_lora_grads_",
    "delete_adapter",
    "disable_adapters",
    "lora_grad_norm",
    "merge_adapter",
    "merge_and_unload",
    "set_adapter",
    "unmerge_adapter",
    "LoraParallelLinear",
    "ParallelLayoutError",
    "dispatch_megatron",
    "finalize_lora_grads",
    "finalize_model_grads_with_lora",
]
__version__ = "0.1.0"
