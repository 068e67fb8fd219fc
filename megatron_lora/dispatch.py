"""dispatch_megatron: the one place that decides which layers LoRA can wrap."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from .config import LoraConfig
from .layer import LoraParallelLinear

SUPPORTED_LAYERS = (ColumnParallelLinear, RowParallelLinear)


def dispatch_megatron(
    target: torch.nn.Module, adapter_name: str, lora_config: LoraConfig, **kwargs
) -> Optional[LoraParallelLinear]:
    """A LoraParallelLinear around ``target`` if it is a supported megatron-core layer, else None.

    An already wrapped layer gets None too: add further adapters with its ``update_layer``.

    kwargs go to LoraParallelLinear: ``module_name`` (the global module name, used to seed
    the layout-invariant initialisation), ``packed_gate_up`` (SwiGLU linear_fc1 layout),
    ``fused_collectives`` (False forces the black-box fallback).
    """
    if not isinstance(target, SUPPORTED_LAYERS):
        return None
    return LoraParallelLinear(target, adapter_name, lora_config, **kwargs)
