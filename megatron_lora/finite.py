"""No NaN or inf crosses a file boundary: factors read from or written to an adapter file
(ours, or Hugging Face PEFT) are checked finite first, and a non-finite one is refused naming
its module. One home for the check, so every reader and writer says it alike."""

from __future__ import annotations

from typing import Iterable, Tuple, Type

import torch

from .errors import MegatronLoraError


def _module_of(key: str) -> str:
    """The module a factor key belongs to (the key less its .lora_A/.lora_B... part)."""
    for marker in (".lora_embedding_", ".lora_"):
        if marker in key:
            return key.split(marker, 1)[0]
    return key


def non_finite_modules(named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> list:
    """The modules (sorted) of the tensors holding a NaN or an infinity."""
    found = set()
    for key, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            found.add(_module_of(key))
    return sorted(found)


def refuse_non_finite(named_tensors: Iterable[Tuple[str, torch.Tensor]], where,
                      error: Type[MegatronLoraError] = MegatronLoraError) -> None:
    """Raise ``error`` naming the first module (and how many) whose factors are not finite."""
    bad = non_finite_modules(named_tensors)
    if bad:
        more = f" and {len(bad) - 1} more module(s)" if len(bad) > 1 else ""
        raise error(f"{where}: the factors of {bad[0]}{more} hold NaN or inf; refusing them "
                    f"(a run that diverged, or a damaged file: use an earlier checkpoint)")


def file_tensors(handle) -> Iterable[Tuple[str, torch.Tensor]]:
    """(key, tensor) of an open safetensors file, one tensor in memory at a time."""
    for key in handle.keys():
        yield key, handle.get_tensor(key)


def refuse_non_finite_file(path, error: Type[MegatronLoraError] = MegatronLoraError) -> None:
    """refuse_non_finite over a safetensors file, read tensor by tensor."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        refuse_non_finite(file_tensors(handle), path, error)
