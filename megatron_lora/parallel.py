"""Reading a base layer's parallel layout, and the few autograd collectives LoRA needs.

Everything here takes its settings from the wrapped megatron-core layer itself (its own TP
group, its own sequence-parallel flag), never from a second config that could disagree.

The collectives follow megatron-core's ``tensor_parallel/mappings.py``: each one a small
autograd function whose backward is the adjoint of its forward. They look
``torch.distributed`` functions up at call time so that tools counting collectives see them.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron.core.tensor_parallel.random import get_expert_parallel_rng_tracker_name

from .errors import MegatronLoraError
from .fused import low_rank_outer_grad

COLUMN = "column"
ROW = "row"
VOCAB = "vocab"
REPLICATED = "replicated"
LORA_A = "lora_A"
LORA_B = "lora_B"


class ParallelLayoutError(MegatronLoraError):
    """The wrapped layer's parallel state cannot be read or is inconsistent."""


def _require(layer, name):
    if not hasattr(layer, name):
        raise ParallelLayoutError(
            f"cannot read the parallel layout of {type(layer).__name__}: it has no attribute "
            f"{name!r}; expected the megatron-core layer it claims to be"
        )
    return getattr(layer, name)


def _kind_of(base_layer) -> str:
    # heavy (megatron's transformer package): imported only when a layer is wrapped
    from megatron.core.transformer.moe.router import TopKRouter

    for layer_type, kind in ((ColumnParallelLinear, COLUMN), (RowParallelLinear, ROW),
                             (VocabParallelEmbedding, VOCAB), (TopKRouter, REPLICATED)):
        if isinstance(base_layer, layer_type):
            return kind
    raise ParallelLayoutError(
        f"{type(base_layer).__name__} is not a layer LoRA can wrap: expected a megatron-core "
        "ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding or TopKRouter"
    )


def _logical_sizes(base_layer, kind: str) -> Tuple[int, int]:
    """(in_features, out_features) of the whole layer, as LoRA's A [r, in] and B [out, r]
    see it: an embedding maps the vocabulary to the hidden size, the router the hidden size
    to the experts."""
    if kind == VOCAB:
        return int(_require(base_layer, "num_embeddings")), int(_require(base_layer, "embedding_dim"))
    if kind == REPLICATED:
        weight = _require(base_layer, "weight")
        return int(weight.shape[1]), int(weight.shape[0])
    return int(_require(base_layer, "input_size")), int(_require(base_layer, "output_size"))


def is_packed_gate_up(name: str, module) -> bool:
    """SwiGLU's linear_fc1 holds [gate_i; up_i] per rank (docs/design.md, Packed layouts)."""
    config = getattr(module, "config", None)
    return name.rsplit(".", 1)[-1] == "linear_fc1" and bool(
        getattr(config, "gated_linear_unit", False)
    )


# --- cutting full tensors into TP shards and back ---------------------------------------------
# The one home of the rule "rank i holds the i-th of t equal parts along the split dimension",
# and of its exception: a packed gate/up tensor is [gate_all; up_all] in full but [gate_i; up_i]
# on rank i (docs/design.md, Packed layouts). Base weights (gpt.py) and LoRA factors share it.


def split_gate_up(full: torch.Tensor, dim: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) halves of a packed tensor in the canonical [gate_all; up_all] layout."""
    gate, up = full.chunk(2, dim=dim)
    return gate, up


def shard_tensor(full: torch.Tensor, dim: int, rank: int, world_size: int,
                 packed_gate_up: bool = False) -> torch.Tensor:
    """This rank's part of ``full``, split along ``dim`` like megatron splits the base weight."""
    if world_size == 1:
        return full
    if packed_gate_up:
        gate, up = split_gate_up(full, dim)
        return torch.cat([gate.chunk(world_size, dim)[rank], up.chunk(world_size, dim)[rank]],
                         dim=dim)
    return full.chunk(world_size, dim=dim)[rank]


def unshard_tensor(shards, dim: int, packed_gate_up: bool = False) -> torch.Tensor:
    """Inverse of shard_tensor: the full tensor from every rank's part, in rank order."""
    if len(shards) == 1:
        return shards[0]
    if packed_gate_up:
        halves = [split_gate_up(shard, dim) for shard in shards]
        return torch.cat([gate for gate, _ in halves] + [up for _, up in halves], dim=dim)
    return torch.cat(list(shards), dim=dim)


def read_tensor_slice(handle, key: str, dim: int, rank: int, world_size: int,
                      packed_gate_up: bool = False) -> torch.Tensor:
    """shard_tensor of a safetensors entry, reading only this rank's part of the file."""
    if world_size == 1:
        return handle.get_tensor(key)
    file_slice = handle.get_slice(key)
    length = file_slice.get_shape()[dim]

    def rows(start, stop):
        return file_slice[start:stop] if dim == 0 else file_slice[:, start:stop]

    if packed_gate_up:
        half, per_rank = length // 2, length // (2 * world_size)
        gate = rows(rank * per_rank, (rank + 1) * per_rank)
        up = rows(half + rank * per_rank, half + (rank + 1) * per_rank)
        return torch.cat([gate, up], dim=dim)
    per_rank = length // world_size
    return rows(rank * per_rank, (rank + 1) * per_rank)


class ParallelLayout:
    """The parallel layout of one megatron-core layer LoRA wraps, read live from the layer.

    Four kinds (docs/design.md, Factor sharding, and docs/layer_types.md):

    * ``column`` / ``row``: ColumnParallelLinear / RowParallelLinear;
    * ``vocab``: VocabParallelEmbedding, whose weight is [vocab/t, hidden]. LoRA treats the
      vocabulary as the input: A [r, vocab] is split by vocabulary like a row layer's A, and
      B [hidden, r] is replicated;
    * ``replicated``: the MoE router, whose weight [experts, hidden] every TP rank holds whole;
      so do both factors.

    Settings a user may flip after wrapping (``sequence_parallel``, ``skip_bias_add``,
    ``gather_output``) are properties that read the base layer on every access; sizes and
    the process group are checked once here.
    """

    def __init__(self, base_layer, packed_gate_up: bool = False):
        self.base = base_layer
        self.kind = _kind_of(base_layer)
        group = _require(base_layer, "tp_group")
        if group is None or not hasattr(group, "size") or not hasattr(group, "rank"):
            raise ParallelLayoutError(
                f"{type(base_layer).__name__}.tp_group is {group!r}, not a torch.distributed "
                "ProcessGroup; build the layer after initialising the process group (or pass "
                "tp_group=...)"
            )
        self.group = group
        self.world_size = group.size()
        self.rank = group.rank()
        self.in_features, self.out_features = _logical_sizes(base_layer, self.kind)
        self._check_split(base_layer)
        weight = getattr(base_layer, "weight", None)
        if weight is not None and tuple(weight.shape) != self.local_weight_shape:
            raise ParallelLayoutError(
                f"{type(base_layer).__name__}.weight has shape {tuple(weight.shape)} but its "
                f"sizes (in={self.in_features}, out={self.out_features}) and TP size "
                f"{self.world_size} imply {self.local_weight_shape}"
            )
        if packed_gate_up and (self.kind != COLUMN or self.out_features % (2 * self.world_size)):
            raise ParallelLayoutError(
                f"packed gate/up layout needs a column-parallel layer whose output_size "
                f"({self.out_features}) divides by 2 x TP size ({2 * self.world_size})"
            )
        self.packed_gate_up = packed_gate_up

    def _check_split(self, base_layer) -> None:
        """The attributes each kind's forward reads, and a split dimension that divides."""
        if self.kind in (COLUMN, ROW):
            for attr in ("sequence_parallel", "skip_bias_add", "is_expert", "explicit_expert_comm"):
                _require(base_layer, attr)
        if self.kind == COLUMN:
            _require(base_layer, "gather_output")
            _require(base_layer, "allreduce_dgrad")
            split_features, name = self.out_features, "output_size"
        elif self.kind == ROW:
            _require(base_layer, "input_is_parallel")
            split_features, name = self.in_features, "input_size"
        elif self.kind == VOCAB:
            _require(base_layer, "reduce_scatter_embeddings")
            split_features, name = self.in_features, "num_embeddings"
        else:
            _require(base_layer, "config")
            return
        if split_features % self.world_size:
            raise ParallelLayoutError(
                f"{type(base_layer).__name__}.{name}={split_features} is not divisible by its "
                f"tensor-parallel size {self.world_size}"
            )

    # --- sizes -------------------------------------------------------------------------
    @property
    def local_in_features(self) -> int:
        split = self.kind in (ROW, VOCAB)
        return self.in_features // self.world_size if split else self.in_features

    @property
    def local_out_features(self) -> int:
        return self.out_features // self.world_size if self.kind == COLUMN else self.out_features

    @property
    def local_weight_shape(self) -> Tuple[int, int]:
        if self.kind == VOCAB:  # an embedding table: one row per token
            return (self.local_in_features, self.local_out_features)
        return (self.local_out_features, self.local_in_features)

    # --- factor sharding (docs/design.md, Factor sharding) -------------------------------
    @property
    def sharded_factor(self) -> Optional[str]:
        """The factor split like the base weight: B of a column layer, A of a row layer or an
        embedding (by vocabulary); None for the router, whose factors are both whole."""
        return {COLUMN: LORA_B, ROW: LORA_A, VOCAB: LORA_A}.get(self.kind)

    @property
    def replicated_factors(self) -> Tuple[str, ...]:
        """The factors every rank holds whole."""
        return tuple(f for f in (LORA_A, LORA_B) if f != self.sharded_factor)

    @property
    def partial_grad_factors(self) -> Tuple[str, ...]:
        """The factors whose gradient on each TP rank is only that rank's part of a sum
        (finalize_lora_grads completes it): the replicated factor of a split layer, which
        meets one shard; both router factors under SP, where each rank routes its own part of
        the sequence (without SP every rank routes every token, so nothing is partial)."""
        if self.world_size == 1:
            return ()
        if self.kind == REPLICATED:
            return (LORA_A, LORA_B) if self.sequence_parallel else ()
        return self.replicated_factors

    @property
    def split_dim(self) -> int:
        """The sharded factor's split dimension: B's rows (column), A's columns (row,
        vocab); -1 where nothing is split."""
        return {COLUMN: 0, ROW: 1, VOCAB: 1}.get(self.kind, -1)

    @property
    def split_parts(self) -> int:
        """Equal parts the full sharded factor is cut into along split_dim (gate/up: 2 x TP)."""
        if self.sharded_factor is None:
            return 1
        return self.world_size * (2 if self.packed_gate_up else 1)

    def full_factor_shapes(self, r: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """Logical shapes of A and B at rank r."""
        return (r, self.in_features), (self.out_features, r)

    def _check_factor(self, factor: str) -> bool:
        if factor not in (LORA_A, LORA_B):
            raise ValueError(f"factor must be {LORA_A!r} or {LORA_B!r}, got {factor!r}")
        return factor == self.sharded_factor

    def shard(self, full: torch.Tensor, factor: str) -> torch.Tensor:
        """This rank's part of the full ``factor`` (the whole of a replicated one)."""
        if not self._check_factor(factor):
            return full
        return shard_tensor(full, self.split_dim, self.rank, self.world_size, self.packed_gate_up)

    def unshard(self, shards, factor: str) -> torch.Tensor:
        """The full ``factor`` from every rank's part in rank order (a replicated one: any)."""
        if not self._check_factor(factor):
            return shards[0]
        return unshard_tensor(shards, self.split_dim, self.packed_gate_up)

    def gather(self, local: torch.Tensor, factor: str) -> torch.Tensor:
        """The full ``factor`` from this rank's part. Collective over the layer's TP group
        for the sharded factor; a replicated one is returned as it is."""
        if not self._check_factor(factor) or self.world_size == 1:
            return local
        shards = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(shards, local.contiguous(), group=self.group)
        return self.unshard(shards, factor)

    def read_slice(self, handle, key: str, factor: str) -> torch.Tensor:
        """This rank's part of the full ``factor`` stored under ``key`` in a safetensors
        file opened with ``safe_open``, reading no more of it than that part."""
        if not self._check_factor(factor):
            return handle.get_tensor(key)
        return read_tensor_slice(handle, key, self.split_dim, self.rank, self.world_size,
                                 self.packed_gate_up)

    # --- live settings -----------------------------------------------------------------
    @property
    def explicit_expert_comm(self) -> bool:
        return bool(getattr(self.base, "explicit_expert_comm", False))

    @property
    def is_expert(self) -> bool:
        return bool(getattr(self.base, "is_expert", False))

    @property
    def sequence_parallel(self) -> bool:
        """True when this layer itself gathers (column) or reduce-scatters (row, embedding)
        the sequence; for the router, when its input is this rank's part of the sequence."""
        if self.kind == VOCAB:
            return bool(self.base.reduce_scatter_embeddings)
        if self.kind == REPLICATED:
            return bool(self.base.config.sequence_parallel)
        return bool(self.base.sequence_parallel) and not self.explicit_expert_comm

    @property
    def reduces_input_grad(self) -> bool:
        """Column layers without SP: the input is replicated and its gradient all-reduced."""
        return (
            self.kind == COLUMN
            and bool(self.base.allreduce_dgrad)
            and not self.explicit_expert_comm
        )

    @property
    def input_is_sharded(self) -> bool:
        """Whether the LoRA branch sees a per-rank shard (so dropout draws per shard)."""
        if self.world_size == 1:
            return False
        if self.kind == ROW:
            return True
        return self.sequence_parallel

    @property
    def rng_tracker_name(self) -> str:
        if self.is_expert:
            return get_expert_parallel_rng_tracker_name()
        return "model-parallel-rng"

    def describe(self) -> str:
        extra = "SP" if self.sequence_parallel else "no SP"
        if self.is_expert:
            extra += ", expert"
        return f"{self.kind}-parallel, TP={self.world_size} (rank {self.rank}), {extra}"


# --- flat collectives (looked up at call time) --------------------------------------------


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    if group.size() > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


# --- autograd collectives --------------------------------------------------------------------


class _ColumnSequenceParallelLinear(torch.autograd.Function):
    """Column layer under SP: gather [x_local | h_local] once, then y = x Wᵀ (+b) + h Bᵀ.

    Each rank's block of the gathered buffer is laid out contiguously as [x_j | h_j], so the
    GEMMs read it in place, one sequence chunk at a time, writing straight into the output
    rows. Backward writes dx_j = g_j W and dh_j = g_j B straight into the one buffer that is
    reduce-scattered: the base's one all-gather / reduce-scatter, r/in wider, and no extra
    activation-sized copy. Only h (r wide) is kept for backward, plus x when the base weight
    itself is trainable.
    """

    @staticmethod
    def forward(ctx, x_local, h_local, weight, bias, weight_b, group):
        world = group.size()
        rows, n_x = x_local.numel() // x_local.shape[-1], x_local.numel()
        in_f, r = x_local.shape[-1], h_local.shape[-1]
        packed = torch.cat([x_local.reshape(-1), h_local.reshape(-1)])
        full = torch.empty(world * packed.numel(), dtype=packed.dtype, device=packed.device)
        dist.all_gather_into_tensor(full, packed, group=group)
        full = full.view(world, packed.numel())
        # allocated in the output's own shape: returning a view of an internal buffer would
        # forbid in-place ops on the output (megatron's vocab-parallel cross entropy does one)
        out_nd = torch.empty((world * x_local.shape[0], *x_local.shape[1:-1], weight.shape[0]),
                             dtype=x_local.dtype, device=x_local.device)
        out = out_nd.view(world * rows, weight.shape[0])
        h_full = torch.empty((world * rows, r), dtype=h_local.dtype, device=h_local.device)
        for j in range(world):
            x_j, h_j = full[j, :n_x].view(rows, in_f), full[j, n_x:].view(rows, r)
            out_j = out[j * rows:(j + 1) * rows]
            if bias is None:
                torch.mm(x_j, weight.t(), out=out_j)
            else:
                torch.addmm(bias, x_j, weight.t(), out=out_j)
            out_j.addmm_(h_j, weight_b.t())
            h_full[j * rows:(j + 1) * rows] = h_j
        keep_x = full[:, :n_x] if ctx.needs_input_grad[2] else None
        ctx.save_for_backward(weight, weight_b, h_full, keep_x)
        ctx.group, ctx.shapes, ctx.has_bias = group, (x_local.shape, h_local.shape), bias is not None
        return out_nd

    @staticmethod
    def backward(ctx, grad_output):
        weight, weight_b, h_full, keep_x = ctx.saved_tensors
        group, (x_shape, h_shape) = ctx.group, ctx.shapes
        world = group.size()
        g = grad_output.reshape(-1, grad_output.shape[-1])
        rows, in_f, r = g.shape[0] // world, x_shape[-1], h_shape[-1]
        n_x = rows * in_f
        packed = torch.empty((world, n_x + rows * r), dtype=g.dtype, device=g.device)
        for j in range(world):
            g_j = g[j * rows:(j + 1) * rows]
            torch.mm(g_j, weight, out=packed[j, :n_x].view(rows, in_f))
            torch.mm(g_j, weight_b, out=packed[j, n_x:].view(rows, r))
        local = torch.empty(packed.shape[1], dtype=g.dtype, device=g.device)
        dist.reduce_scatter_tensor(local, packed.reshape(-1), group=group)
        grad_x = local[:n_x].view(x_shape)
        grad_h = local[n_x:].view(h_shape)
        grad_b = low_rank_outer_grad(g, h_full) if ctx.needs_input_grad[4] else None
        grad_weight = None
        if keep_x is not None:
            grad_weight = torch.mm(g.t(), keep_x.reshape(world, rows, in_f).reshape(-1, in_f))
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, grad_h, grad_weight, grad_bias, grad_b, None


def column_sequence_parallel_linear(x_local, h_local, weight, bias, weight_b, group):
    """See _ColumnSequenceParallelLinear (x_local, h_local: [seq/t, batch, .])."""
    return _ColumnSequenceParallelLinear.apply(x_local, h_local, weight, bias, weight_b, group)


class _ProjectDownSharedInputGrad(torch.autograd.Function):
    """h = x Aᵀ for a replicated x whose gradient must be summed over TP (no SP).

    Used when the base layer is called as a black box: it all-reduces its own part of dx, and
    the LoRA part is reduced here at rank r (dh) rather than at the hidden size (dx). A's
    gradient stays this rank's partial sum, like every other replicated LoRA factor, for
    finalize_lora_grads to complete.
    """

    @staticmethod
    def forward(ctx, x, weight_a, group):
        ctx.save_for_backward(x, weight_a)
        ctx.group = group
        return torch.matmul(x, weight_a.t())

    @staticmethod
    def backward(ctx, grad_h):
        x, weight_a = ctx.saved_tensors
        grad_h = grad_h.contiguous()
        grad_a = grad_h.reshape(-1, grad_h.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
        grad_h_total = _all_reduce(grad_h.clone(), ctx.group)
        grad_x = grad_h_total.matmul(weight_a)
        return grad_x, grad_a, None


def project_down_shared_input_grad(x, weight_a, group):
    return _ProjectDownSharedInputGrad.apply(x, weight_a, group)


class _ProjectUpFromPartialSum(torch.autograd.Function):
    """delta = (Σ_ranks h_i) Bᵀ for row layers called as a black box (no SP).

    The all-reduce is r-sized. B's gradient is kept as this rank's partial Σ-term gᵀ h_i so
    that, like every replicated factor, finalize_lora_grads sums it once over TP.
    """

    @staticmethod
    def forward(ctx, h_partial, weight_b, group):
        ctx.save_for_backward(h_partial, weight_b)
        h_total = _all_reduce(h_partial.clone(), group)
        return torch.matmul(h_total, weight_b.t())

    @staticmethod
    def backward(ctx, grad_out):
        h_partial, weight_b = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_b = low_rank_outer_grad(
            grad_out.reshape(-1, grad_out.shape[-1]), h_partial.reshape(-1, h_partial.shape[-1])
        )
        grad_h = grad_out.matmul(weight_b)
        return grad_h, grad_b, None


def project_up_from_partial_sum(h_partial, weight_b, group):
    return _ProjectUpFromPartialSum.apply(h_partial, weight_b, group)
