"""LoraRouter: LoRA on megatron-core's MoE router (``TopKRouter``, target ``router``).

The router weight [experts, hidden] is whole on every TP rank, and so are both factors,
A [r, hidden] and B [experts, r]. The adapter adds s·(x Aᵀ) Bᵀ to the gating logits, before
the top-k, the score function and the auxiliary losses, all of which then see the adapted
logits (docs/layer_types.md).

Without SP every TP rank routes every token, so the factors' gradients are complete and equal
on each rank. Under SP each rank routes its own part of the sequence, so each holds a part of
the gradient: finalize_lora_grads sums both factors over TP in the step's one grad sync (what
megatron's finalize_model_grads does for the router weight itself, which it marks
``sequence_parallel``).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from .config import LoraConfig
from .layer import LoraLayer


class LoraRouter(LoraLayer):
    """Wraps a TopKRouter; returns what the base returns ((probs, routing_map)).

    Megatron reads router state (``expert_bias``, token counts, the layer number) through
    ``mlp.router``; attributes the wrapper lacks are read from the base router.
    """

    @staticmethod
    def refusal(config: LoraConfig) -> Optional[str]:
        if config.lora_dropout > 0:
            return (f"lora_dropout={config.lora_dropout} on the MoE router is not proven exact "
                    "under TP/SP here; use lora_dropout=0 or exclude 'router'")
        return None

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def _delta(self, x: torch.Tensor, adapters: List[str], dtype) -> torch.Tensor:
        x = x.to(dtype)
        return self._summed_deltas(
            adapters,
            lambda adapter: F.linear(x, self.lora_A[adapter].weight.to(dtype)) * self.scaling[adapter],
            dtype)

    def forward(self, input_, *args, **kwargs):
        adapters = self._active()
        base = self.base_layer
        if not adapters:
            return base(input_, *args, **kwargs)
        own_gating = type(base).gating.__get__(base)

        def gating_with_lora(x):
            logits = own_gating(x)
            return logits + self._delta(x, adapters, logits.dtype)

        # the router's own forward (jitter, top-k, score function, aux losses) runs unchanged
        # around adapted logits: its gating is shadowed for this call only
        base.gating = gating_with_lora
        try:
            return base(input_, *args, **kwargs)
        finally:
            del base.gating
