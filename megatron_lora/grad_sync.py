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
        all_reduce_flat(grads, group)
    return len(buckets)


def all_reduce_flat(grads: List[torch.Tensor], group, average: bool = False) -> None:
    """Sum (or average) same-dtype gradients over ``group`` in place, as one collective."""
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    if average:
        flat /= dist.get_world_size(group)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


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
    """The group over which one model replica's parameters are spread (TP × PP)."""
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return parallel_state.get_model_parallel_group()
    except (AssertionError, RuntimeError):
        pass
    return None  # the default group: a pure-TP setup without megatron's parallel state


def _tensor_parallel_rank() -> int:
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return parallel_state.get_tensor_model_parallel_rank()
    except (AssertionError, RuntimeError):
        pass
    return 0


def _counts_in_norm(param) -> bool:
    """TP shards count on every rank (each holds a different slice); a replicated tensor only
    once: a LoRA factor on rank 0 of its layer's group, anything else on TP rank 0."""
    if getattr(param, "tensor_model_parallel", False):
        return True
    group = getattr(param, "lora_partial_grad_group", None)
    if group is not None:
        return not dist.is_initialized() or dist.get_rank(group) == 0
    return _tensor_parallel_rank() == 0


def grad_norm(params) -> float:
    """The L2 norm of the parameters' gradients as the TP=1 model would compute it (after the
    grad sync). Collective over the model-parallel group (TP × PP) when distributed."""
    total = torch.zeros((), dtype=torch.float64)
    for param in params:
        grad = _grad_of(param)
        if grad is not None and _counts_in_norm(param):
            total += grad.detach().double().pow(2).sum().cpu()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total, group=_norm_group())
    return float(total.sqrt())


def clip_grads_(params, max_norm: float, norm: float) -> None:
    """Scale the gradients so that their total norm (``norm``, from grad_norm) is max_norm."""
    if norm > max_norm:
        for param in params:
            grad = _grad_of(param)
            if grad is not None:
                grad.mul_(max_norm / (norm + 1e-6))


def _active_lora_parameters(model) -> List[torch.nn.Parameter]:
    return [factor.weight for layer in _lora_layers(model)
            for factors in (layer.lora_A, layer.lora_B) for factor in factors.values()
            if factor.weight.requires_grad]


def lora_grad_norm(model) -> float:
    """The L2 norm of every active LoRA gradient, as the TP=1 model would compute it.

    Call after finalize_lora_grads; a replicated factor counts once. Collective over the
    model-parallel group (TP × PP) when distributed.
    """
    return grad_norm(_active_lora_parameters(model))


def clip_lora_grads_(model, max_norm: float) -> float:
    """Scale every LoRA gradient so that their total norm is at most ``max_norm``.

    Returns the norm before clipping (what training logs show). The scale is the same on
    every rank because the norm is.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm={max_norm!r} is invalid: expected a number > 0")
    params = _active_lora_parameters(model)
    norm = grad_norm(params)
    clip_grads_(params, max_norm, norm)
    return norm
