"""Completing the gradients of replicated LoRA factors: one collective per step.

A replicated factor (A of a column layer, B of a row layer) sees on each TP rank only the part
of its gradient that flows through that rank's shard (of the output, the input, or the
sequence under SP). Its true gradient is the sum over the layer's TP group.
``finalize_lora_grads`` sums all of them, flattened into one all-reduce per (group, dtype),
so a dense model pays exactly one collective per optimiser step.
"""

from __future__ import annotations

from typing import Iterable, List, Union

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .layer import LoraParallelLinear


def _lora_layers(model) -> List[LoraParallelLinear]:
    roots = model if isinstance(model, (list, tuple)) else [model]
    layers: List[LoraParallelLinear] = []
    seen = set()
    for root in roots:
        if not isinstance(root, torch.nn.Module):
            raise TypeError(
                f"finalize_lora_grads expects a module, a list of model chunks or a list of "
                f"LoraParallelLinear layers, got {type(root).__name__}"
            )
        for module in root.modules():
            if isinstance(module, LoraParallelLinear) and id(module) not in seen:
                seen.add(id(module))
                layers.append(module)
    return layers


def _grad_of(param: torch.nn.Parameter):
    """megatron-core DDP accumulates into ``main_grad``; plain torch into ``grad``."""
    main_grad = getattr(param, "main_grad", None)
    return main_grad if main_grad is not None else param.grad


def finalize_lora_grads(model: Union[torch.nn.Module, Iterable[torch.nn.Module]]) -> int:
    """Sum the partial gradients of every replicated LoRA factor over its TP group.

    Call once per optimiser step, after the last backward of the step (and after megatron
    DDP's gradient sync when the model is wrapped in it; see ``finalize_model_grads_with_lora``).
    Returns the number of collectives issued.
    """
    buckets = {}
    for layer in _lora_layers(model):
        if layer.layout.world_size == 1:
            continue
        for param in layer.replicated_lora_parameters():
            grad = _grad_of(param) if param.requires_grad else None
            if grad is None:
                continue
            key = (id(layer.layout.group), grad.dtype, grad.device)
            buckets.setdefault(key, (layer.layout.group, []))[1].append(grad)
    for group, grads in buckets.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)
    return len(buckets)


def finalize_model_grads_with_lora(model, *args, **kwargs):
    """megatron-core's ``finalize_model_grads`` followed by :func:`finalize_lora_grads`.

    Set it as ``config.finalize_model_grads_func`` when training with megatron-core's
    forward-backward schedules and DDP.
    """
    from megatron.core.distributed import finalize_model_grads

    result = finalize_model_grads(model, *args, **kwargs)
    finalize_lora_grads(model)
    return result
