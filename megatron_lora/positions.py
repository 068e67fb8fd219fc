"""Rotary positions that restart inside a sequence, for packed conversations (docs/sft.md).

megatron-core's GPTModel draws its rotary embedding for positions 0..s-1 of the whole sequence
and ignores ``position_ids`` (they feed only learned absolute embeddings). A packed sample
holds several conversations, each of which must see positions from 0, as it would alone. A
forward hook on the model's ``RotaryEmbedding`` re-indexes the table it returns by the batch's
``position_ids``: [s, 1, 1, d] becomes [s, b, 1, d], which megatron's rotary application
broadcasts over the heads exactly as before. The hook acts only inside :meth:`restarted`.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch


class RestartedPositions:
    def __init__(self) -> None:
        self.position_ids: Optional[torch.Tensor] = None  # [b, s] while restarted() is open

    @classmethod
    def install(cls, model) -> "RestartedPositions":
        """Hook every rotary embedding of ``model`` (one per pipeline stage's chunk)."""
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

        positions = cls()
        for module in model.modules():
            if type(module) is RotaryEmbedding:  # subclasses (YaRN, mRoPE) return other shapes
                module.register_forward_hook(positions._reindex)
        return positions

    @contextlib.contextmanager
    def restarted(self, position_ids: torch.Tensor):
        self.position_ids = position_ids
        try:
            yield
        finally:
            self.position_ids = None

    def _reindex(self, module, args, table):
        if self.position_ids is None:
            return None  # the table unchanged
        if table.dim() != 4 or table.shape[1] != 1 or table.shape[0] <= int(
                self.position_ids.max()):
            raise RuntimeError(f"the rotary table has shape {tuple(table.shape)}, not the "
                               f"[s, 1, 1, d] of positions 0..s-1 that packing re-indexes")
        # [s, d] indexed by [s, b] positions -> [s, b, 1, d]
        return table[:, 0, 0, :][self.position_ids.t()].unsqueeze(2)
