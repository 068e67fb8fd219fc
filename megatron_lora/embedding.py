"""LoraVocabParallelEmbedding: LoRA on megatron-core's VocabParallelEmbedding (``word_embeddings``).

The table W [vocab, hidden] is split by vocabulary: rank i holds rows [i·V/t, (i+1)·V/t).
LoRA adds s·(B A)ᵀ to it, with A [r, vocab] split by vocabulary like W (rank i holds A's
columns of its own tokens) and B [hidden, r] whole on every rank (docs/layer_types.md):

    out = Σ_ranks mask_i · (W_i[tok] + s · A_iᵀ[tok] Bᵀ)

Each rank looks its tokens up in W_i and A_iᵀ (zero for tokens of other ranks) and adds the
partial delta to its partial output before the base's one all-reduce (or reduce-scatter under
SP): no extra collective. In backward A_i's gradient is complete (only rank i's tokens reach
it) and B's is this rank's part of a sum, which finalize_lora_grads completes with the other
replicated factors. Dropout has nothing to drop on an index input and does not apply, as in
PEFT's embedding LoRA.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    VocabParallelEmbedding,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from .layer import LoraLayer


class LoraVocabParallelEmbedding(LoraLayer):
    """Wraps a VocabParallelEmbedding; returns what the base returns ([b, s, h], or the
    [s/t, b, h] sequence shard when the base reduce-scatters)."""

    def _uses_dropout(self) -> bool:
        return False  # an index input: nothing to drop (PEFT does the same)

    def _mask(self, input_):
        """(local indices, mask of tokens other ranks hold), as the base computes them."""
        base = self.base_layer
        if self.layout.world_size == 1:
            return input_, None
        other = (input_ < base.vocab_start_index) | (input_ >= base.vocab_end_index)
        local = input_.clone() - base.vocab_start_index
        local[other] = 0
        return local, other

    def _partial_delta(self, local, adapters: List[str], dtype) -> torch.Tensor:
        """Σ_adapters s · A_iᵀ[tok] Bᵀ on this rank (rows of other ranks' tokens not yet zeroed)."""
        def down(adapter):  # A [r, vocab/t]: its columns are the lookup table
            weight_a = self.lora_A[adapter].weight.to(dtype)
            return F.embedding(local, weight_a.t()) * self.scaling[adapter]

        return self._summed_deltas(adapters, down, dtype)

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The base's own reduction of a partial [b, s, h] output."""
        group = self.layout.group
        if self.base_layer.reduce_scatter_embeddings:
            return reduce_scatter_to_sequence_parallel_region(
                partial.transpose(0, 1).contiguous(), group=group)
        return reduce_from_tensor_model_parallel_region(partial, group=group)

    def _uses_fast_path(self) -> bool:
        return self.fused_collectives and (
            type(self.base_layer).forward is VocabParallelEmbedding.forward)

    def forward(self, input_):
        adapters = self._active()
        if not adapters:
            return self.base_layer(input_)
        base = self.base_layer
        local, other = self._mask(input_)
        if not self._uses_fast_path():
            # the base as a black box: its output is reduced already, so the delta is reduced
            # on its own (an extra hidden-sized collective; exact all the same)
            delta = self._partial_delta(local, adapters, base.weight.dtype)
            if other is not None:
                delta = delta.masked_fill(other.unsqueeze(-1), 0.0)
            return base(input_) + self._reduce(delta)
        if base.deterministic_mode:
            output = base.weight[local]
        else:
            output = F.embedding(local, base.weight)
        output = output + self._partial_delta(local, adapters, output.dtype)
        if other is not None:
            output = output.masked_fill(other.unsqueeze(-1), 0.0)
        return self._reduce(output)
