"""Initialisation that does not depend on the parallel layout.

The full logical factors A [r, in] and B [out, r] are a function of (seed, the module's global
name, the adapter name) only: each is drawn on CPU from its own generator, seeded by a stable
hash of those, with fans taken from the full shapes; each rank then keeps its slice. So an
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
    r = config.r
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


def shard_rows(full: torch.Tensor, rank: int, world_size: int, packed_gate_up: bool) -> torch.Tensor:
    """This rank's rows of a column-parallel tensor (dim 0 split like the base weight).

    With a packed gate/up layout (SwiGLU linear_fc1) the canonical tensor is
    [gate_all; up_all] while rank i holds [gate_i; up_i].
    """
    if world_size == 1:
        return full
    if packed_gate_up:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(world_size, 0)[rank], up.chunk(world_size, 0)[rank]], dim=0)
    return full.chunk(world_size, dim=0)[rank]


def shard_columns(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's columns of a row-parallel tensor (dim 1 split like the base weight)."""
    if world_size == 1:
        return full
    return full.chunk(world_size, dim=1)[rank]


def unshard_rows(shards, packed_gate_up: bool) -> torch.Tensor:
    """Inverse of shard_rows: the canonical full tensor from every rank's rows, in rank order."""
    if len(shards) == 1:
        return shards[0]
    if packed_gate_up:
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([gate for gate, _ in halves] + [up for _, up in halves], dim=0)
    return torch.cat(list(shards), dim=0)


def unshard_columns(shards) -> torch.Tensor:
    """Inverse of shard_columns."""
    return shards[0] if len(shards) == 1 else torch.cat(list(shards), dim=1)
