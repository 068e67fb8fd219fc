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

# where TransformerEngine's layers are defined: its own package, and megatron's wrappers of them
# (TELinear, TEColumnParallelLinear, TERowParallelLinear, TELayerNormColumnParallelLinear,
# TEGroupedLinear, TEFusedMLP, ...). LoRA has no wrapper for them yet.
_TRANSFORMER_ENGINE_HOMES = (
    "transformer_engine", "megatron.core.extensions.transformer_engine")


def transformer_engine_kind(module: torch.nn.Module) -> Optional[str]:
    """The class name of a TransformerEngine layer holding weights LoRA would adapt (a linear
    or a fused MLP), else None. Known by the module its class (or a base class) is defined in,
    so TransformerEngine need not be importable to tell."""
    for cls in type(module).__mro__:
        home = cls.__module__ or ""
        from_transformer_engine = any(home == h or home.startswith(h + ".")
                                      for h in _TRANSFORMER_ENGINE_HOMES)
        if from_transformer_engine and ("Linear" in cls.__name__ or "MLP" in cls.__name__):
            return type(module).__name__
    return None


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
