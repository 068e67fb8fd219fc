"""LoraLayer, what every LoRA wrapper shares, and LoraParallelLinear: LoRA on one megatron-core
ColumnParallelLinear / RowParallelLinear (embedding.py and router.py hold the other kinds).

The delta s·(x Aᵀ) Bᵀ is always produced in the same parallel state as the base output
(replicated, sharded or partial) and added before whatever reduction the base output still
faces, so it rides on the base layer's own collectives (docs/design.md,
Forward without extra collectives):

* row:    the partial x_i A_iᵀ Bᵀ is added to the partial x_i W_iᵀ before the one all-reduce
          (or reduce-scatter under SP): zero extra collectives;
* column: without SP the input's backward all-reduce is shared; under SP the r-wide h_local
          travels in the base's own all-gather of x (and dh in its reduce-scatter of dx):
          zero extra collectives; with gather_output the sum is gathered once.

This fast path computes the base with its local weight directly (exactly what megatron-core
does, trainable or frozen). Where megatron would take a path we do not mirror (fused
gradient accumulation of a trainable weight, deferred embedding wgrad, activation offloading,
a subclass with its own forward), the base layer is called as a black box and LoRA does its
own r-sized collectives: still exact, slightly more communication.

Replicated factors (A of a column layer, B of a row layer) end backward holding this rank's
partial gradient; finalize_lora_grads sums them over the layer's TP group once per step.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from .config import LoraConfig
from .errors import AdapterError
from .fused import linear_with_lora, linear_with_low_rank_up
from .init import full_lora_factors
from .parallel import (
    COLUMN,
    LORA_A,
    LORA_B,
    VOCAB,
    ParallelLayout,
    column_sequence_parallel_linear,
    project_down_shared_input_grad,
    project_up_from_partial_sum,
)
from .topology import is_expert

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


class LoraFactor(torch.nn.Module):
    """One LoRA factor: a bare ``.weight`` (no bias, no forward), named like PEFT's."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, dtype={self.weight.dtype}"


class LoraLayer(torch.nn.Module):
    """What every LoRA wrapper shares: adapters kept by name, their factors, merging, and
    the checkpoint hooks. Subclasses add the forward of one kind of megatron-core layer.

    ``lora_A[name].weight`` / ``lora_B[name].weight`` hold this rank's shard of the logical
    ``[r, in]`` / ``[out, r]`` factors, split the way ``self.layout`` (ParallelLayout) says.
    """

    def __init__(
        self,
        base_layer: torch.nn.Module,
        adapter_name: Optional[str] = "default",
        lora_config: Optional[LoraConfig] = None,
        *,
        module_name: str = "",
        packed_gate_up: bool = False,
        fused_collectives: bool = True,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.layout = ParallelLayout(base_layer, packed_gate_up=packed_gate_up)
        self.module_name = module_name
        # False forces the black-box fallback (where a wrapper has one): the base layer is
        # called as it is and LoRA does its own collectives
        self.fused_collectives = fused_collectives
        self.lora_A = torch.nn.ModuleDict()
        self.lora_B = torch.nn.ModuleDict()
        self.lora_dropout = torch.nn.ModuleDict()
        self.scaling: Dict[str, float] = {}
        self.lora_configs: Dict[str, LoraConfig] = {}
        self.active_adapters: List[str] = []
        self.merged_adapters: List[str] = []  # their deltas live in the base weight now
        self.disabled = False  # set by model.disable_adapters(): base output only
        if adapter_name is not None:  # None: a wrapper without adapters of its own (tied output)
            self.update_layer(adapter_name, lora_config if lora_config is not None else LoraConfig())

    @staticmethod
    def refusal(config: LoraConfig) -> Optional[str]:
        """Why this layer type refuses ``config`` (a setting not proven exact on it), or None.
        apply_lora asks before wrapping anything, so every rank refuses together."""
        return None

    def _check_config(self, config: LoraConfig) -> None:
        reason = self.refusal(config)
        if reason is not None:
            raise AdapterError(f"{self.module_name or type(self).__name__}: {reason}")

    def _summed_deltas(self, adapters: List[str], down, dtype) -> torch.Tensor:
        """Σ_adapters down(adapter) Bᵀ: ``down`` gives an adapter's scaled r-wide projection."""
        delta = None
        for adapter in adapters:
            term = F.linear(down(adapter), self.lora_B[adapter].weight.to(dtype))
            delta = term if delta is None else delta + term
        return delta

    def _uses_dropout(self) -> bool:
        """Whether lora_dropout applies to this layer's input (not to an embedding's indices)."""
        return True

    def update_layer(self, adapter_name: str, config: LoraConfig) -> None:
        """Add (or replace) the adapter ``adapter_name`` and make it active."""
        if not isinstance(config, LoraConfig):
            raise TypeError(f"lora_config must be a LoraConfig, got {type(config).__name__}")
        self._check_config(config)
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise AdapterError(
                f"adapter_name={adapter_name!r} is invalid: expected a non-empty name without '.'"
            )
        layout = self.layout
        rank = config.rank_for(self.module_name or "")
        if rank > min(layout.in_features, layout.out_features):
            raise AdapterError(
                f"LoRA r={rank} is larger than {self.module_name or 'this layer'} allows: "
                f"min(in_features, out_features) = "
                f"{min(layout.in_features, layout.out_features)}; a larger rank adds parameters "
                f"and no capacity"
            )
        full_a, full_b = full_lora_factors(
            config, self.module_name, adapter_name, layout.in_features, layout.out_features
        )
        local_a, local_b = layout.shard(full_a, LORA_A), layout.shard(full_b, LORA_B)
        base_weight = self._base_weight_or_none()
        device = base_weight.device if base_weight is not None else torch.device("cpu")
        dtype = _DTYPES[config.lora_dtype] if config.lora_dtype else (
            base_weight.dtype if base_weight is not None else torch.float32
        )
        factor_a = LoraFactor(local_a.to(device=device, dtype=dtype).contiguous())
        factor_b = LoraFactor(local_b.to(device=device, dtype=dtype).contiguous())
        self._mark_parallel_attributes(factor_a.weight, factor_b.weight, base_weight)
        self.lora_A[adapter_name] = factor_a
        self.lora_B[adapter_name] = factor_b
        self.lora_dropout[adapter_name] = (
            torch.nn.Dropout(p=config.lora_dropout)
            if config.lora_dropout > 0 and self._uses_dropout() else torch.nn.Identity()
        )
        self.scaling[adapter_name] = config.scaling_at(rank)
        self.lora_configs[adapter_name] = config
        if adapter_name not in self.active_adapters:
            self.active_adapters.append(adapter_name)

    def set_adapter(self, adapter_names) -> None:
        """Make these adapters active (summed) and trainable, and the others frozen."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._require_adapters(names)
        self.active_adapters = names
        for name in self.lora_A:
            self.lora_A[name].weight.requires_grad_(name in names)
            self.lora_B[name].weight.requires_grad_(name in names)

    def delete_adapter(self, adapter_name: str) -> None:
        self._require_adapters([adapter_name])
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before deleting")
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[adapter_name]
        del self.scaling[adapter_name], self.lora_configs[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def _require_adapters(self, names) -> None:
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise ValueError(
                f"unknown adapter(s) {unknown}; this layer has {sorted(self.lora_A.keys())}"
            )

    def _mark_parallel_attributes(self, weight_a, weight_b, base_weight) -> None:
        """The attributes megatron-core's optimizer, DDP and grad-norm code read."""
        factors = {LORA_A: weight_a, LORA_B: weight_b}
        sharded = self.layout.sharded_factor
        if sharded is not None:
            set_tensor_model_parallel_attributes(factors[sharded], True, self.layout.split_dim, 1)
        # A replicated factor is no TP shard: megatron's grad norm then counts it on TP rank 0
        # only (once). Where its gradient is partial on every rank, finalize_lora_grads
        # completes it; we deliberately do not set `sequence_parallel`, or megatron's
        # finalize_model_grads would sum it a second time (and only when SP is on).
        for factor in self.layout.replicated_factors:
            set_tensor_model_parallel_attributes(factors[factor], False, -1, 1)
        for factor in self.layout.partial_grad_factors:
            factors[factor].lora_partial_grad_group = self.layout.group
        expert = is_expert(base_weight)
        for weight in (weight_a, weight_b):
            weight.allreduce = not expert  # expert weights are reduced over the expert-DP group
            weight.is_lora = True

    def replicated_lora_parameters(self) -> List[torch.nn.Parameter]:
        """The factors whose gradients finalize_lora_grads sums over this layer's TP group."""
        params = []
        for factor in self.layout.partial_grad_factors:
            store = getattr(self, factor)
            params.extend(store[name].weight for name in store)
        return params

    @property
    def weight(self) -> Optional[torch.Tensor]:
        """The base layer's weight, for megatron code that reads ``layer.weight``: with tied
        embeddings at PP > 1, GPTModel takes the last stage's copy from ``output_layer.weight``
        (forward, checkpoint tying, embedding-grad sync)."""
        return self.base_layer.weight

    # --- helpers -----------------------------------------------------------------------
    def _base_weight_or_none(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "weight", None)

    def _active(self) -> List[str]:
        """The adapters forward adds: active, present, and not already merged."""
        if self.disabled:
            return []
        return [
            name for name in self.active_adapters
            if name in self.lora_A and name not in self.merged_adapters
        ]


    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """This rank's local s·B A delta, in the base weight's dtype and shape (an
        embedding's table holds it transposed)."""
        delta = self._delta_float64(adapter_name)
        base_weight = self._base_weight_or_none()
        return delta.to(base_weight.dtype if base_weight is not None else torch.float32)

    def _delta_float64(self, adapter_name: str) -> torch.Tensor:
        """s·B_local A_local in float64: the same tensor every time, for merge and unmerge."""
        self._require_adapters([adapter_name])
        weight_a = self.lora_A[adapter_name].weight.detach().to(torch.float64)
        weight_b = self.lora_B[adapter_name].weight.detach().to(torch.float64)
        delta = (weight_b @ weight_a) * self.scaling[adapter_name]
        return delta.t() if self.layout.kind == VOCAB else delta

    def _merge_target(self) -> torch.Tensor:
        weight = self._base_weight_or_none()
        if weight is None:
            raise ValueError(f"{self.module_name or 'this layer'}: the base layer has no weight to "
                             f"merge into (its weight comes in with each call, as tied word "
                             f"embeddings do); keep this adapter unmerged")
        return weight

    @torch.no_grad()
    def merge(self, adapter_names=None) -> None:
        """Add the deltas (default: the active adapters) into this rank's base weight shard.

        No communication: each rank's delta is its own shard of s·B A. Computed in float64
        and rounded once to the base dtype, which is kept.
        """
        names = self.active_adapters if adapter_names is None else [
            n for n in adapter_names if n in self.lora_A
        ]
        if not names:  # e.g. a tied output layer without adapters of its own
            return
        weight = self._merge_target()
        for name in names:
            if name in self.merged_adapters:
                continue
            weight.copy_((weight.to(torch.float64) + self._delta_float64(name)).to(weight.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged deltas again, newest first.

        Each element comes back within one rounding step of the merged weight (|Δ| ≤ one ulp
        of max(|w|, |w_merged|) in the base dtype); it is bit-exact wherever merging did not
        move the element into a higher binade, which is almost every element.
        """
        if not self.merged_adapters:
            return
        weight = self._merge_target()
        for name in reversed(self.merged_adapters):
            weight.copy_((weight.to(torch.float64) - self._delta_float64(name)).to(weight.dtype))
        self.merged_adapters = []

    def full_factors(self, adapter_name: str, *, grads: bool = False):
        """The logical A [r, in] and B [out, r] (or their gradients), gathered over the TP group.

        Collective over the layer's TP group. Canonical layout: the same at every TP size
        (SwiGLU fc1's B as [gate_all; up_all]). Gradients of replicated factors must already
        be complete (finalize_lora_grads), so the local one is taken as is.
        """
        self._require_adapters([adapter_name])
        layout = self.layout

        def local(factor):
            weight = factor[adapter_name].weight
            tensor = weight.grad if grads else weight
            if tensor is None:
                raise ValueError(f"{self.module_name}: {adapter_name!r} has no gradient yet")
            return tensor.detach()

        return (layout.gather(local(self.lora_A), LORA_A),
                layout.gather(local(self.lora_B), LORA_B))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept the base's own keys (``{prefix}weight``) as well as ``{prefix}base_layer.weight``:
        megatron checkpoints and plain base state dicts then load into the wrapped model."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if "." not in rest and not rest.startswith(("lora_", "base_layer")):
                state_dict[f"{prefix}base_layer.{rest}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """megatron dist-checkpointing: the base layer's entries under its own, unchanged keys,
        plus every adapter's factors as ``{prefix}lora_A.{name}.weight`` ShardedTensors.

        Sharded factors carry the base weight's TP axis; replicated ones are marked as
        replicas over TP; SwiGLU fc1's B goes through megatron's gate/up factory, so the
        checkpoint holds the canonical [gate_all; up_all] tensor and reshards to any TP.
        """
        # heavy (megatron's transformer package): only dist-checkpointing needs it
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.base_layer.sharded_state_dict(prefix, sharded_offsets, metadata)
        factors, tp_axes = {}, {}
        for name in self.lora_A:
            factors[f"lora_A.{name}.weight"] = self.lora_A[name].weight
            factors[f"lora_B.{name}.weight"] = self.lora_B[name].weight
            if self.layout.sharded_factor is not None:
                tp_axes[f"{self.layout.sharded_factor}.{name}.weight"] = self.layout.split_dim
        sharded = make_sharded_tensors_for_checkpoint(
            factors, prefix, tp_axes, sharded_offsets,
            tp_group=self.layout.group, dp_cp_group=metadata["dp_cp_group"],
        )
        if self.layout.packed_gate_up:  # at every TP size, as megatron does for the base weight
            singleton = metadata.get("singleton_local_shards", False)
            for name in self.lora_B:
                key = f"{prefix}lora_B.{name}.weight"
                sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets, singleton)
        state.update(sharded)
        return state

    def extra_repr(self) -> str:
        return f"{self.layout.describe()}, adapters={list(self.lora_A.keys())}"



class _Tied(NamedTuple):
    """An adapter of the tied word embeddings, as the output layer adds it (a key of its own,
    so that it never mixes with an adapter of the output layer of the same name)."""

    name: str


class LoraParallelLinear(LoraLayer):
    """Wraps a megatron-core parallel linear; returns exactly what the base returns.

    Column layers keep A replicated and B split by output rows like the base weight; row
    layers keep A split by input columns and B replicated.

    The output layer of a model whose word embeddings are tied to it also adds the embedding
    adapters' delta on the shared weight (docs/layer_types.md, tied embeddings): W + s(B A)ᵀ
    gives logits x Wᵀ + s (x B) A, a column LoRA with A_out = Bᵀ and B_out = Aᵀ (this rank's
    vocabulary rows, as the embedding holds them). The factors stay the embedding's own.
    """

    tied_embedding = None  # the LoraVocabParallelEmbedding whose adapters this layer also adds

    def tie_to_embedding(self, embedding) -> None:
        # a plain reference, not a submodule: the factors are saved, synced and counted once,
        # with the embedding
        self.__dict__["tied_embedding"] = embedding

    def _adapters_to_add(self) -> list:
        own = self._active()
        if self.tied_embedding is None or self.disabled:
            return own
        return own + [_Tied(name) for name in self.tied_embedding._active()]

    def _scaling(self, adapter) -> float:
        if isinstance(adapter, _Tied):
            return self.tied_embedding.scaling[adapter.name]
        return self.scaling[adapter]

    def _dropout_rng(self, sharded: bool):
        """Replicated inputs draw from the default stream (the same on every TP rank, as
        megatron seeds it); sharded inputs fork the per-rank TP stream."""
        if not sharded:
            return contextlib.nullcontext()
        return get_cuda_rng_tracker().fork(self.layout.rng_tracker_name)

    def _dropout_active(self, adapter) -> bool:
        if isinstance(adapter, _Tied):
            return False  # an embedding adapter has no dropout, on either side
        return self.training and not isinstance(self.lora_dropout[adapter], torch.nn.Identity)

    def _dropped(self, adapter, x: torch.Tensor, sharded: bool) -> torch.Tensor:
        if not self._dropout_active(adapter):
            return x
        dropout = self.lora_dropout[adapter]
        with self._dropout_rng(sharded):
            return dropout(x)

    def _weight_a(self, adapter, dtype) -> torch.Tensor:
        # factors are cast to the activation dtype, never the activations to fp32
        if isinstance(adapter, _Tied):  # A_out = B_embᵀ [r, hidden]
            return self.tied_embedding.lora_B[adapter.name].weight.to(dtype).t()
        return self.lora_A[adapter].weight.to(dtype)

    def _weight_b(self, adapter, dtype) -> torch.Tensor:
        if isinstance(adapter, _Tied):  # B_out = A_embᵀ [vocab/t, r], this rank's rows
            return self.tied_embedding.lora_A[adapter.name].weight.to(dtype).t()
        return self.lora_B[adapter].weight.to(dtype)

    def _down(self, adapter: str, x: torch.Tensor, sharded: bool) -> torch.Tensor:
        """s · dropout(x) Aᵀ (scaling applied on the r-wide side, where it is cheapest)."""
        h = F.linear(self._dropped(adapter, x, sharded), self._weight_a(adapter, x.dtype))
        return h * self._scaling(adapter)

    def _uses_fast_path(self, weight: Optional[torch.Tensor]) -> bool:
        base = self.base_layer
        if not self.fused_collectives or weight is None:
            return False
        own_forward = ColumnParallelLinear if self.layout.kind == COLUMN else RowParallelLinear
        if type(base).forward is not own_forward.forward:
            return False
        config = base.config
        if getattr(config, "defer_embedding_wgrad_compute", False):
            return False
        if getattr(config, "_cpu_offloading_context", None) is not None:
            return False
        if weight.requires_grad and getattr(base, "gradient_accumulation_fusion", False):
            return False  # megatron accumulates straight into main_grad with a fused kernel
        return True

    # --- forward -----------------------------------------------------------------------
    def forward(self, input_, weight=None, runtime_gather_output=None):
        if self.layout.kind == COLUMN:
            adapters = self._adapters_to_add()
            if not adapters:
                return self.base_layer(
                    input_, weight=weight, runtime_gather_output=runtime_gather_output
                )
            gather_output = (
                self.base_layer.gather_output
                if runtime_gather_output is None
                else runtime_gather_output
            )
            local_weight = weight if weight is not None else self.base_layer.weight
            if self._uses_fast_path(local_weight):
                output = self._column_fast(input_, local_weight, adapters)
            else:
                output = self._column_fallback(input_, weight, adapters)
            if gather_output:
                # gather base + delta once, not twice
                output = gather_from_tensor_model_parallel_region(output, group=self.layout.group)
            output_bias = self.base_layer.bias if self.base_layer.skip_bias_add else None
            return output, output_bias

        if weight is not None or runtime_gather_output is not None:
            raise TypeError("RowParallelLinear.forward takes only the input tensor")
        adapters = self._active()
        if not adapters:
            return self.base_layer(input_)
        if self._uses_fast_path(self.base_layer.weight):
            return self._row_fast(input_, adapters)
        return self._row_fallback(input_, adapters)

    def _fast_linear(self, x, weight, bias, adapters):
        """Base GEMM with the LoRA terms accumulated into it (see fused.py).

        One adapter without active dropout: the whole x Wᵀ + s(x Aᵀ)Bᵀ is one node. Otherwise
        the (scaled) down-projections of all adapters are stacked to one [.., Σr] tensor and
        added through a single GEMM against the stacked B's.
        """
        if len(adapters) == 1 and not self._dropout_active(adapters[0]):
            adapter = adapters[0]
            return linear_with_lora(x, weight, bias, self._weight_a(adapter, x.dtype),
                                    self._weight_b(adapter, x.dtype), self._scaling(adapter))
        h = self._stacked_down(adapters, x, sharded=self.layout.input_is_sharded)
        return linear_with_low_rank_up(x, weight, bias, h, self._stacked_weight_b(adapters, x.dtype))

    def _stacked_down(self, adapters, x, sharded: bool) -> torch.Tensor:
        """[.., Σr]: every active adapter's scaled down-projection, side by side."""
        hs = [self._down(a, x, sharded=sharded) for a in adapters]
        return hs[0] if len(hs) == 1 else torch.cat(hs, dim=-1)

    def _stacked_weight_b(self, adapters, dtype) -> torch.Tensor:
        """[out, Σr]: one GEMM adds every active adapter's up-projection."""
        weights_b = [self._weight_b(a, dtype) for a in adapters]
        return weights_b[0] if len(weights_b) == 1 else torch.cat(weights_b, dim=1)

    def _column_fast(self, x, weight, adapters):
        layout, base = self.layout, self.base_layer
        bias = base.bias if not base.skip_bias_add else None
        if layout.sequence_parallel and layout.world_size > 1:
            return column_sequence_parallel_linear(
                x, self._stacked_down(adapters, x, sharded=True), weight, bias, self._stacked_weight_b(adapters, x.dtype), layout.group
            )
        if layout.reduces_input_grad:
            x = copy_to_tensor_model_parallel_region(x, group=layout.group)
        return self._fast_linear(x, weight, bias, adapters)

    def _column_fallback(self, x, weight, adapters):
        layout = self.layout
        output, _ = self.base_layer(x, weight=weight, runtime_gather_output=False)
        for adapter in adapters:
            if layout.sequence_parallel and layout.world_size > 1:
                h = gather_from_sequence_parallel_region(
                    self._down(adapter, x, sharded=True),
                    tensor_parallel_output_grad=True,
                    group=layout.group,
                )
            elif layout.reduces_input_grad:
                h = project_down_shared_input_grad(
                    self._dropped(adapter, x, sharded=False),
                    self._weight_a(adapter, x.dtype),
                    layout.group,
                ) * self._scaling(adapter)
            else:
                h = self._down(adapter, x, sharded=False)
            output = output + F.linear(h, self._weight_b(adapter, h.dtype))
        return output

    def _row_fast(self, x, adapters):
        layout, base = self.layout, self.base_layer
        if not base.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, group=layout.group)
        partial = self._fast_linear(x, base.weight, None, adapters)
        if layout.explicit_expert_comm:
            output = partial  # the token dispatcher reduces expert outputs
        elif layout.sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(partial, group=layout.group)
        else:
            output = reduce_from_tensor_model_parallel_region(partial, group=layout.group)
        return self._row_bias(output)

    def _row_fallback(self, x, adapters):
        layout, base = self.layout, self.base_layer
        output, _ = base(x)
        if not base.input_is_parallel:
            # the base's scatter is internal to it, so LoRA needs its own (fallback only)
            x = scatter_to_tensor_model_parallel_region(x, group=layout.group)
        sharded = layout.input_is_sharded
        for adapter in adapters:
            h_partial = self._down(adapter, x, sharded=sharded)
            weight_b = self._weight_b(adapter, h_partial.dtype)
            if layout.explicit_expert_comm or layout.world_size == 1:
                delta = F.linear(h_partial, weight_b)
            elif layout.sequence_parallel:
                h = reduce_scatter_to_sequence_parallel_region(h_partial, group=layout.group)
                delta = F.linear(h, weight_b)
            else:
                delta = project_up_from_partial_sum(h_partial, weight_b, layout.group)
            output = output + delta
        return output, (base.bias if base.skip_bias_add else None)

    def _row_bias(self, output):
        base = self.base_layer
        if base.skip_bias_add:
            return output, base.bias
        if base.bias is not None:
            output = output + base.bias
        return output, None

    # --- weights -------------------------------------------------------------------------
