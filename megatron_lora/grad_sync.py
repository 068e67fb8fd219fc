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


def _norm_group():
    """The group over which the LoRA parameters of one model replica are spread (TP × PP)."""
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return parallel_state.get_model_parallel_group()
    except (AssertionError, RuntimeError):
        pass
    return None  # the default group: a pure-TP setup without megatron's parallel state


def lora_grad_norm(model) -> float:
    """The L2 norm of every active LoRA gradient, as the TP=1 model would compute it.

    Call after finalize_lora_grads. Sharded factors count on every rank (each holds a different
    slice); a replicated factor counts only on TP rank 0 of its layer, so it counts once.
    Collective over the model-parallel group (TP × PP) when distributed.
    """
    total = None
    for layer in _lora_layers(model):
        replicated = {id(p) for p in layer.replicated_lora_parameters()}
        for factors in (layer.lora_A, layer.lora_B):
            for factor in factors.values():
                grad = _grad_of(factor.weight) if factor.weight.requires_grad else None
                if grad is None or (id(factor.weight) in replicated and layer.layout.rank != 0):
                    continue
                square = grad.detach().double().pow(2).sum()
                total = square if total is None else total + square
    if total is None:
        total = torch.zeros((), dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total, group=_norm_group())
    return float(total.sqrt())


def clip_lora_grads_(model, max_norm: float) -> float:
    """Scale every LoRA gradient so that their total norm is at most ``max_norm``.

    Returns the norm before clipping (what training logs show). The scale is the same on
    every rank because the norm is.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm={max_norm!r} is invalid: expected a number > 0")
    norm = lora_grad_norm(model)
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        for layer in _lora_layers(model):
            for factors in (layer.lora_A, layer.lora_B):
                for factor in factors.values():
                    grad = _grad_of(factor.weight) if factor.weight.requires_grad else None
                    if grad is not None:
                        grad.mul_(scale)
    return norm
