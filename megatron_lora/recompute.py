"""Activation recompute with a frozen base: every LoRA factor still gets its gradient.

megatron-core recomputes through a re-entrant autograd Function (``tensor_parallel.checkpoint``)
that runs its region under ``no_grad`` and is back-propagated only when one of its *inputs*
requires grad. With a frozen base, the decoder's input (the frozen embedding's output) does not,
so the first recomputed region is cut off from autograd: its LoRA factors get no gradient, or
the whole loss has none. The cure is one pre-hook on each TransformerBlock that hands the block
an input requiring grad whenever recompute is on and the block trains something (see
docs/recompute.md for the cause, what it costs and what is refused).
"""

from __future__ import annotations

from typing import List

import torch

_HOOK_ATTRIBUTE = "_lora_recompute_input_hook"


def _decoder_blocks(chunks: List[torch.nn.Module]) -> List[torch.nn.Module]:
    from megatron.core.transformer.transformer_block import TransformerBlock

    return [module for chunk in chunks for module in chunk.modules()
            if isinstance(module, TransformerBlock)]


def _input_requiring_grad(block, args, kwargs):
    """forward pre-hook (with kwargs): the block's hidden_states as a leaf that requires grad.

    Only while training with grad enabled and recompute on. Later pipeline stages read their
    input from megatron's schedule, which already requires grad (hidden_states is None there).
    """
    if block.config.recompute_granularity is None or not block.training:
        return None
    if not torch.is_grad_enabled():
        return None
    in_kwargs = "hidden_states" in kwargs
    hidden = kwargs["hidden_states"] if in_kwargs else (args[0] if args else None)
    if not isinstance(hidden, torch.Tensor) or hidden.requires_grad:
        return None
    if not any(param.requires_grad for param in block.parameters()):
        return None
    # No graph hangs off a tensor that does not require grad, so a detached alias loses
    # nothing; its gradient (layer 0's input gradient) is dropped with the graph.
    hidden = hidden.detach().requires_grad_()
    if in_kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    return (hidden, *args[1:]), kwargs


def connect_recomputed_regions(chunks: List[torch.nn.Module]) -> None:
    """Install the pre-hook on every TransformerBlock of these chunks (once per block)."""
    for block in _decoder_blocks(chunks):
        if getattr(block, _HOOK_ATTRIBUTE, None) is None:
            handle = block.register_forward_pre_hook(_input_requiring_grad, with_kwargs=True)
            setattr(block, _HOOK_ATTRIBUTE, handle)


def disconnect_recomputed_regions(chunks: List[torch.nn.Module]) -> None:
    """Remove the pre-hooks again (merge_and_unload gives back a plain model)."""
    for block in _decoder_blocks(chunks):
        handle = getattr(block, _HOOK_ATTRIBUTE, None)
        if handle is not None:
            handle.remove()
            delattr(block, _HOOK_ATTRIBUTE)
