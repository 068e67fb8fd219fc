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
from megatron.core import parallel_state as ps
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .layer import LoraLayer
from .model import model_chunks
from .topology import Topology, is_expert


def _lora_layers(model) -> List[LoraLayer]:
    roots = model if isinstance(model, (list, tuple)) else [model]
    layers: List[LoraLayer] = []
    seen = set()
    for root in roots:
        if not isinstance(root, torch.nn.Module):
            raise TypeError(
                f"finalize_lora_grads expects a module, a list of model chunks or a list of "
                f"LoraLayer layers, got {type(root).__name__}"
            )
        for module in root.modules():
            if isinstance(module, LoraLayer) and id(module) not in seen:
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


def average_over_data_parallel(params) -> None:
    """Make each gradient that of the mean loss over the data-parallel replicas.

    Dense parameters: the average over the DP group. Expert parameters (``allreduce=False``)
    already hold the sum over every replica whose tokens the dispatcher brought to their
    experts, so they are summed over the expert-DP group and divided by the DP size (how
    megatron's DDP scales them). At most two flattened collectives.
    """
    dp_group = Topology.dp_group()
    dense, experts = [], []
    for param in params:
        grad = _grad_of(param)
        if grad is not None:
            (experts if is_expert(param) else dense).append(grad)
    all_reduce_flat(dense, dp_group, average=True)
    dp_size = dist.get_world_size(dp_group)
    if experts and dp_size > 1:
        all_reduce_flat(experts, Topology.edp_group())
        for grad in experts:
            grad.div_(dp_size)


def all_reduce_tied_embedding_grads(model) -> None:
    """Sum the gradients of tied word embeddings over the first and last pipeline stages.

    With PP > 1 each of the two stages holds a copy of the shared weight and sees only its
    own use of it (input embedding or output layer); the sum is the TP=1 gradient, and both
    copies then take the same optimiser step. What megatron's finalize_model_grads does
    (``_allreduce_word_embedding_grads``). No-op at PP = 1, off those stages, and when the
    weight is frozen (LoRA).
    """
    if ps.get_pipeline_model_parallel_world_size() == 1 or not ps.is_rank_in_embedding_group():
        return
    for chunk in model_chunks(model):
        if getattr(chunk, "share_embeddings_and_output_weights", False) and (
                chunk.pre_process or chunk.post_process):
            grad = _grad_of(chunk.shared_embedding_or_output_weight())
            if grad is not None:
                dist.all_reduce(grad, group=ps.get_embedding_group())


def finalize_gradients(model, params, lora: bool, clip_grad: float) -> float:
    """Everything that happens to gradients between backward and the optimiser step, in
    megatron's order (``finalize_model_grads`` + DDP's scaling + ``clip_grad_norm_fp32``):

    1. the partial sums: replicated LoRA factors over their TP group (LoRA), or, in full
       training, parameters marked ``sequence_parallel`` (norms under SP) over TP and tied
       word embeddings over their two pipeline stages;
    2. the data-parallel average: dense parameters averaged over DP, expert parameters
       summed over expert-DP and divided by DP (:func:`average_over_data_parallel`);
    3. the norm of the TP=1 model's gradient (:func:`grad_norm`, every group a parameter is
       split or replicated over, replicated ones counted once) and clipping to ``clip_grad``
       (0 = off).

    Returns the norm before clipping. Collective: every rank of the world calls it. The rules
    and what is proven: docs/gradients.md.
    """
    if lora:
        finalize_lora_grads(model)
    else:
        all_reduce_flat([p.grad for p in params if p.grad is not None
                         and getattr(p, "sequence_parallel", False)],
                        Topology.tp_group())
        all_reduce_tied_embedding_grads(model)
    average_over_data_parallel(params)
    norm = grad_norm(params)
    if clip_grad > 0:
        clip_grads_(params, clip_grad, norm)
    return norm


def finalize_model_grads_with_lora(model, *args, **kwargs):
    """megatron-core's ``finalize_model_grads`` followed by :func:`finalize_lora_grads`.

    Set it as ``config.finalize_model_grads_func`` when training with megatron-core's
    forward-backward schedules and DDP.
    """
    # heavy (megatron's DDP, FSDP and optimizer packages) and needed only with megatron's loop
    from megatron.core.distributed import finalize_model_grads

    result = finalize_model_grads(model, *args, **kwargs)
    finalize_lora_grads(model)
    return result


def grad_norm(params) -> float:
    """The L2 norm of the parameters' gradients as the TP=1 model would compute it (after the
    grad sync). Collective over the world when distributed: experts are spread over the
    expert-parallel ranks, which span data-parallel replicas of the dense parameters."""
    topology = Topology.current()
    total = torch.zeros((), dtype=torch.float64)
    for param in params:
        grad = _grad_of(param)
        if grad is not None and topology.counts_in_norm(param):
            total += grad.detach().double().pow(2).sum().cpu()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total)
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
