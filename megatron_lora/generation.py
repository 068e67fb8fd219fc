"""Greedy generation with a megatron-core GPT at any TP size (pipeline size 1).

A whole forward per new token (no KV cache): meant for samples and tests, not for serving.
"""

from __future__ import annotations

from typing import Optional

import torch


@torch.no_grad()
def greedy_generate(model, tokens: torch.Tensor, new_tokens: int,
                    stop_token: Optional[int] = None) -> torch.Tensor:
    """[batch, prompt + up to new_tokens] token ids; every TP rank returns the same tensor."""
    from megatron.core import parallel_state

    from .gpt import gathered_logits, gpt_forward_inputs

    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("greedy_generate needs pipeline_model_parallel_size 1; load the adapter "
                         "at PP=1 for generation (adapters load at any layout)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    seq_limit = getattr(model, "max_sequence_length", None)
    for _ in range(new_tokens):
        window = tokens if seq_limit is None else tokens[:, -seq_limit:]
        position_ids, mask = gpt_forward_inputs(window)
        logits = gathered_logits(model(window, position_ids, mask))
        next_token = logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
        if stop_token is not None and bool((next_token == stop_token).all()):
            break
    model.train(was_training)
    return tokens
