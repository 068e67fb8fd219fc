"""Moving tensors to global rank 0 without pickle: shapes and dtypes travel as JSON bytes,
the tensors point to point (what save_adapter and export_peft gather before writing)."""

from __future__ import annotations

import json
from typing import Dict

import torch
import torch.distributed as dist

from .adapter_file import AdapterCheckpointError
from .agreement import all_gather_bytes, collective_device, is_distributed


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise AdapterCheckpointError(f"unknown dtype {name!r}")
    return dtype


def collect_on_rank0(local: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rank 0 receives every rank's tensors (point to point); other ranks get {}."""
    if not is_distributed():
        return dict(local)
    manifest = json.dumps([[k, list(t.shape), str(t.dtype)] for k, t in local.items()]).encode()
    manifests = [json.loads(m) for m in all_gather_bytes(manifest)]
    rank = dist.get_rank()
    if rank != 0:
        for tensor in local.values():
            dist.send(tensor.contiguous(), dst=0)
        return {}
    collected = dict(local)
    device = next(iter(local.values())).device if local else collective_device()
    for source, entries in enumerate(manifests):
        if source == 0:
            continue
        for key, shape, dtype in entries:
            tensor = torch.empty(shape, dtype=_dtype_from_name(dtype), device=device)
            dist.recv(tensor, src=source)
            collected[key] = tensor
    return collected
