"""dispatch_megatron: the one place that decides which layers LoRA can wrap, and with what."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron.core.transformer.moe.router import TopKRouter

from .config import LoraConfig
from .embedding import LoraVocabParallelEmbedding
from .layer import LoraLayer, LoraParallelLinear
from .router import LoraRouter

# megatron-core layer -> its LoRA wrapper (docs/layer_types.md lists what each is proven at)
WRAPPERS = (
    (ColumnParallelLinear, LoraParallelLinear),
    (RowParallelLinear, LoraParallelLinear),
    (VocabParallelEmbedding, LoraVocabParallelEmbedding),
    (TopKRouter, LoraRouter),
)
SUPPORTED_LAYERS = tuple(layer_type for layer_type, _ in WRAPPERS)


def wrapper_class(target: torch.nn.Module):
    """The LoraLayer subclass that wraps ``target``, or None for a layer LoRA cannot wrap."""
    for layer_type, wrapper in WRAPPERS:
        if isinstance(target, layer_type):
            return wrapper
    return None


def dispatch_megatron(
    target: torch.nn.Module, adapter_name: str, lora_config: LoraConfig, **kwargs
) -> Optional[LoraLayer]:
    """A LoRA wrapper around ``target`` if it is a supported megatron-core layer, else None.

    An already wrapped layer gets None too: add further adapters with its ``update_layer``.

    kwargs go to the wrapper: ``module_name`` (the global module name, used to seed the
    layout-invariant initialisation), ``packed_gate_up`` (SwiGLU linear_fc1 layout),
    ``fused_collectives`` (False forces the black-box fallback).
    """
    wrapper = wrapper_class(target)
    if wrapper is None:
        return None
    return wrapper(target, adapter_name, lora_config, **kwargs)
