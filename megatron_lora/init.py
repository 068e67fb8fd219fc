"""Initialisation that does not depend on the parallel layout.

The full logical factors A [r, in] and B [out, r] are a function of (seed, the module's global
name, the adapter name) only: each is drawn on CPU from its own generator, seeded by a stable
hash of those, with fans taken from the full shapes; each rank then keeps its slice
(ParallelLayout.shard). So an
adapter is bit-identical at every TP/PP/EP size, no broadcast is needed, and the global RNG is
never touched.
"""

from __future__ import annotations

import hashlib
import math
from typing import Tuple

import torch

from .config import LoraConfig


def stable_seed(*parts) -> int:
    """A 63-bit seed from a stable hash of the parts (the same in every process and run)."""
    key = "\0".join(["megatron_lora/v1", *map(str, parts)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


def factor_seed(seed: int, module_name: str, adapter_name: str, factor: str) -> int:
    return stable_seed(seed, module_name, adapter_name, factor)


def _uniform(shape, bound: float, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2.0 - 1.0) * bound


def _normal(shape, std: float, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std


def full_lora_factors(
    config: LoraConfig, module_name: str, adapter_name: str, in_features: int, out_features: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The full (unsharded) float32 factors A [r, in] and B [out, r] of one adapter."""
    r = config.rank_for(module_name or "")
    seed_a = factor_seed(config.seed, module_name, adapter_name, "lora_A")
    seed_b = factor_seed(config.seed, module_name, adapter_name, "lora_B")
    mode = config.init_lora_weights
    if mode is True or mode is False or mode == "kaiming":
        # kaiming-uniform with a=sqrt(5), as torch.nn.Linear and PEFT: bound = 1/sqrt(fan_in)
        weight_a = _uniform((r, in_features), 1.0 / math.sqrt(in_features), seed_a)
    elif mode == "gaussian":
        weight_a = _normal((r, in_features), 1.0 / r, seed_a)
    elif mode == "xavier":
        weight_a = _uniform((r, in_features), math.sqrt(6.0 / (in_features + r)), seed_a)
    else:  # LoraConfig validated it already
        raise ValueError(f"unknown init_lora_weights={mode!r}")
    if mode is False:
        weight_b = _uniform((out_features, r), 1.0 / math.sqrt(r), seed_b)
    else:
        weight_b = torch.zeros((out_features, r), dtype=torch.float32)
    return weight_a, weight_b
