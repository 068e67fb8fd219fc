"""What the ranks of a job must agree on, in one place.

A check that fails on one rank only is the classic way a distributed job hangs: that rank
raises, the others walk on into the next collective and wait for it forever. So every
collective refusal in the package goes through here: counts summed over the world, every
rank's bytes gathered, and :func:`raise_if_any_rank_failed`, after which either every rank
raises or none does. Payloads travel as tensors (JSON text, counts); nothing is unpickled.
"""

from __future__ import annotations

import json
from typing import List, Optional, Sequence, Type

import torch
import torch.distributed as dist

from .errors import MegatronLoraError


def is_distributed() -> bool:
    """Whether more than one process takes part (saving and loading then gather or agree)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where tensors for a world-wide collective must live: the GPU under NCCL, else the CPU."""
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_world(values: Sequence[int]) -> List[int]:
    """Each count summed over every rank (the counts themselves on one process)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.int64, device=collective_device())
    dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]


def all_gather_bytes(payload: bytes) -> List[bytes]:
    """Every rank's bytes, in rank order, through tensors: nothing is unpickled."""
    if not is_distributed():
        return [payload]
    device = collective_device()
    world = dist.get_world_size()
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    buffer = torch.zeros(longest, dtype=torch.uint8, device=device)
    if payload:
        buffer[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    buffers = [torch.zeros_like(buffer) for _ in range(world)]
    dist.all_gather(buffers, buffer)
    return [bytes(b[: int(s.item())].cpu().tolist()) for b, s in zip(buffers, sizes)]


def first_over_world(message: Optional[str]) -> Optional[str]:
    """The first rank's message that is not None (in rank order), on every rank: a refusal
    one pipeline stage saw is then explained on every stage, not only where it was seen."""
    for payload in all_gather_bytes((message or "").encode()):
        if payload:
            return payload.decode()
    return None


def raise_if_any_rank_failed(failure: Optional[BaseException],
                             user_error: Type[MegatronLoraError], doing: str = "") -> None:
    """Collective: if any rank failed, every rank raises. The failing rank re-raises its own
    error (traceback intact); the others raise ``user_error`` with the first failing rank's
    message when that was a user error (a :class:`MegatronLoraError`), else a RuntimeError
    naming that rank and what it was ``doing``, so a bug keeps looking like a bug."""
    mine = None if failure is None else [isinstance(failure, MegatronLoraError), str(failure)]
    reports = [json.loads(r) for r in all_gather_bytes(json.dumps(mine).encode())]
    if failure is not None:
        raise failure
    for rank, report in enumerate(reports):
        if report is not None:
            is_user_error, message = report
            raise user_error(message) if is_user_error else RuntimeError(
                f"rank {rank} failed{' ' + doing if doing else ''}: {message}")
