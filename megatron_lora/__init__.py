"""LoRA adapters for megatron-core models split by tensor and sequence parallelism."""

from .config import LoraConfig
from .dispatch import dispatch_megatron
from .grad_sync import finalize_lora_grads, finalize_model_grads_with_lora
from .layer import LoraParallelLinear
from .parallel import ParallelLayoutError

__all__ = [
    "LoraConfig",
    "LoraParallelLinear",
    "ParallelLayoutError",
    "dispatch_megatron",
    "finalize_lora_grads",
    "finalize_model_grads_with_lora",
]
__version__ = "0.1.0"
