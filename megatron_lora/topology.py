"""Where this rank stands in megatron-core's process grid, and which replica owns a parameter.

One snapshot (:meth:`Topology.current`) of the ranks and sizes of the dense groups
(tensor, data, pipeline parallel) and the expert groups (expert, expert-tensor and
expert-data parallel), read from ``megatron.core.parallel_state``. Without megatron's parallel
state (a bare TP group passed to each layer, or one process) every rank reads as rank 0 of
size 1, and a layer's own group rank (``ParallelLayout.rank``) decides instead.

Expert parameters are the ones megatron marks ``allreduce = False``: they are split over the
expert-TP group and replicated over the expert-DP group, not the dense ones
(docs/design.md, Experts; docs/gradients.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state


def is_expert(param) -> bool:
    """Whether megatron treats ``param`` (a tensor, or None) as an expert parameter."""
    return getattr(param, "allreduce", True) is False


@dataclass(frozen=True)
class Topology:
    """Ranks and sizes of this process in each parallel group (data parallel includes
    context parallel, as megatron's DDP uses it)."""

    tp_rank: int = 0
    tp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1
    edp_rank: int = 0
    edp_size: int = 1
    initialized: bool = False  # megatron's parallel state was set up

    @classmethod
    def current(cls) -> "Topology":
        """This process's place, or the one-process defaults without megatron's state."""
        try:
            if parallel_state.model_parallel_is_initialized():
                ps = parallel_state
                return cls(
                    tp_rank=ps.get_tensor_model_parallel_rank(),
                    tp_size=ps.get_tensor_model_parallel_world_size(),
                    dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
                    dp_size=ps.get_data_parallel_world_size(with_context_parallel=True),
                    pp_rank=ps.get_pipeline_model_parallel_rank(),
                    pp_size=ps.get_pipeline_model_parallel_world_size(),
                    ep_rank=ps.get_expert_model_parallel_rank(),
                    ep_size=ps.get_expert_model_parallel_world_size(),
                    etp_rank=ps.get_expert_tensor_parallel_rank(),
                    etp_size=ps.get_expert_tensor_parallel_world_size(),
                    edp_rank=ps.get_expert_data_parallel_rank(),
                    edp_size=ps.get_expert_data_parallel_world_size(),
                    initialized=True,
                )
        except (AssertionError, RuntimeError):  # groups half set up: treat as absent
            pass
        return cls()

    # --- groups (megatron's; need its parallel state) -----------------------------------
    @staticmethod
    def tp_group():
        return parallel_state.get_tensor_model_parallel_group()

    @staticmethod
    def dp_group():
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    @staticmethod
    def pp_group():
        return parallel_state.get_pipeline_model_parallel_group()

    @staticmethod
    def ep_group():
        return parallel_state.get_expert_model_parallel_group()

    @staticmethod
    def etp_group():
        return parallel_state.get_expert_tensor_parallel_group()

    @staticmethod
    def edp_group():
        return parallel_state.get_expert_data_parallel_group()

    # --- per parameter ---------------------------------------------------------------------
    is_expert = staticmethod(is_expert)

    def tensor_parallel_rank_of(self, param) -> int:
        """This rank in the group that splits ``param`` (expert-TP for experts)."""
        return self.etp_rank if is_expert(param) else self.tp_rank

    def tensor_parallel_size_of(self, param) -> int:
        return self.etp_size if is_expert(param) else self.tp_size

    def data_parallel_rank_of(self, param) -> int:
        """This rank among the replicas of ``param`` (expert-DP for experts)."""
        return self.edp_rank if is_expert(param) else self.dp_rank

    def data_parallel_group_of(self, param):
        return self.edp_group() if is_expert(param) else self.dp_group()

    def owns(self, param, tp_rank: Optional[int] = None) -> bool:
        """Whether this rank stands for the logical tensor ``param`` belongs to: rank 0 of its
        TP group on its first data-parallel replica. It counts the tensor in reports and
        writes it in checkpoints, so a sum over the world sees each tensor once.
        ``tp_rank``: the rank in the parameter's own TP group where the caller knows it
        better (a layer's group rank, also without megatron's state)."""
        if tp_rank is None:
            tp_rank = self.tensor_parallel_rank_of(param)
        return tp_rank == 0 and self.data_parallel_rank_of(param) == 0

    def counts_in_norm(self, param) -> bool:
        """Whether this rank adds ``param``'s gradient to the global norm, so that the sum
        over the world counts every logical tensor once (docs/gradients.md, Norm and
        clipping): one data-parallel replica; TP shards on every TP rank, a replicated
        tensor on one (a replicated LoRA factor on rank 0 of its layer's group); never the
        last stage's copy of tied embeddings (megatron marks it ``shared``)."""
        if getattr(param, "shared", False):
            return False
        if self.data_parallel_rank_of(param) != 0:
            return False
        if getattr(param, "tensor_model_parallel", False):
            return True
        group = getattr(param, "lora_partial_grad_group", None)
        if group is not None:
            return not dist.is_initialized() or dist.get_rank(group) == 0
        return self.tensor_parallel_rank_of(param) == 0
