"""Building a megatron-core GPTModel from an experiment config, the same at any layout.

Used by the tests and the training scripts. Two things make a model built here the same
logical model at every TP/PP size:

* the base weights are drawn like the LoRA factors (docs/design.md, Layout-independent
  initialisation): each full tensor from a generator seeded by (seed, its global name), then
  sliced to this rank's shard; so TP=1 and TP=4 + PP=2 runs start from identical logical
  weights with no copying;
* the norms are plain torch norms whose parameters carry ``sequence_parallel`` as megatron's
  fused norms do (megatron's torch fallback refuses SP), so the local spec runs with SP on CPU
  and on GPU alike.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    gather_from_tensor_model_parallel_region,
    model_parallel_cuda_manual_seed,
)

from .init import stable_seed
from .model import global_named_modules, model_chunks
from .parallel import is_packed_gate_up, shard_tensor
from .topology import Topology


class SequenceParallelNorm:
    """torch.nn.RMSNorm / LayerNorm for megatron's ModuleSpec, usable with SP.

    Under SP each rank normalises its own sequence shard, so the norm's parameter gradient
    is partial per rank; ``sequence_parallel=True`` tells megatron's finalize_model_grads
    to sum it over TP (exactly what megatron's fused norms mark).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(
                f"normalization={config.normalization!r} is not supported here; "
                f"use 'RMSNorm' or 'LayerNorm'"
            )
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


class LatentCoreAttention(torch.nn.Module):
    """Causal softmax attention whose keys and values have different head sizes, for
    multi-latent attention with the local spec.

    megatron-core's local spec puts its DotProductAttention behind MLA, which takes one head
    size and no ``k_channels`` / ``v_channels``, so that spec fails to build (0.16 to 0.19).
    This module computes what MLA asks of it: softmax(q kᵀ · softmax_scale) v per head, causal,
    on this rank's heads. LoRA adapts the projections around it, never this module.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type=None,
                 softmax_scale=None, k_channels=None, v_channels=None, **_unused):
        super().__init__()
        if config.attention_dropout:
            raise ValueError(
                f"attention_dropout={config.attention_dropout} with multi_latent_attention: "
                "the local-spec MLA core attention here has no dropout; set it to 0"
            )
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **_unused):
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError("LatentCoreAttention computes causal attention only (no mask, "
                             "bias or packed sequences)")
        # [s, b, heads, dim] -> [b, heads, s, dim] and back to [s, b, heads · v_dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)


def gpt_block_spec(config, num_layers_on_stage: int):
    """megatron-core's local GPT layer spec with SP-capable torch norms."""
    # heavy (megatron's model and transformer packages): only building a model needs them
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    mla = bool(getattr(config, "multi_latent_attention", False))
    qk_norm = bool(getattr(config, "qk_layernorm", False))
    layer_spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts, normalization=config.normalization,
        multi_latent_attention=mla, qk_layernorm=qk_norm,
    )
    layer_spec.submodules.input_layernorm = SequenceParallelNorm
    layer_spec.submodules.pre_mlp_layernorm = SequenceParallelNorm
    attention = layer_spec.submodules.self_attention.submodules
    if mla:
        attention.core_attention = LatentCoreAttention
    elif qk_norm:
        # per-head norms (Qwen3); megatron's finalize_model_grads sums their gradients over TP
        # by name (each rank normalises its own heads with the same weight)
        attention.q_layernorm = SequenceParallelNorm
        attention.k_layernorm = SequenceParallelNorm
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec] * num_layers_on_stage, layer_norm=SequenceParallelNorm
    )


# The process groups megatron made for the current layout. megatron's destroy_model_parallel
# forgets its groups but does not destroy them, and each gloo group keeps its worker threads:
# a process that re-initialises layout after layout (a test spawn, a conversion that visits
# several layouts) would pile up thousands of threads. Only the groups that our own
# initialize_model_parallel call made are destroyed, never a group the caller made.
_GROUPS_OF_THIS_LAYOUT: list = []


def _live_groups() -> list:
    """Every process group torch.distributed knows in this process, but the default one."""
    # torch keeps them in a private registry; there is no public listing
    world = dist.distributed_c10d._world
    return [group for group in list(world.pg_map) if group is not dist.GroupMember.WORLD]


def _destroy_groups_of_previous_layout() -> None:
    live = set(_live_groups())
    for group in _GROUPS_OF_THIS_LAYOUT:
        if group in live:
            dist.destroy_process_group(group)
    _GROUPS_OF_THIS_LAYOUT.clear()


def initialize_model_parallel(experiment) -> None:
    """megatron's parallel state and RNG seeding for this experiment's layout.

    torch.distributed must already be initialised; the layout is checked against the world
    size first, with the config's own message.
    """
    experiment.check_world_size(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _destroy_groups_of_previous_layout()
    groups_before = set(_live_groups())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=experiment.tensor_model_parallel_size,
        pipeline_model_parallel_size=experiment.pipeline_model_parallel_size,
        expert_model_parallel_size=experiment.expert_model_parallel_size,
        expert_tensor_parallel_size=experiment.expert_tensor_parallel_size,
    )
    model_parallel_cuda_manual_seed(experiment.seed)
    _GROUPS_OF_THIS_LAYOUT[:] = [g for g in _live_groups() if g not in groups_before]


def build_gpt_model(experiment, *, initialize: bool = True, layout_invariant_init: bool = True,
                    **config_overrides):
    """This pipeline stage's GPTModel for ``experiment`` (call initialize_model_parallel first).

    ``layout_invariant_init`` draws every base weight from (seed, global name) so the model is
    the same at every TP/PP size; False keeps megatron's own initialisation. ``initialize=False``
    draws nothing at all (megatron's ``perform_initialization=False``): for a model whose every
    base weight is about to be loaded, where drawing a 70B model's full tensors on every rank
    costs minutes and a full tensor's memory (the parameters keep their TP attributes).

    The vocabulary is ``experiment.padded_vocab_size``; padded rows never count
    (:func:`mask_padded_vocabulary`).
    """
    # heavy (megatron's model and transformer packages): only building a model needs them
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    # megatron only marks TP shards (tensor_model_parallel, partition_dim) when it initialises
    # them itself, so let it (then overwrite with the layout-invariant draw), or mark them here
    config = experiment.transformer_config(
        use_cpu_initialization=True, perform_initialization=initialize, **config_overrides
    )
    settings = experiment.megatron_config
    model = GPTModel(
        config=config,
        transformer_layer_spec=gpt_block_spec(config, get_num_layers_to_build(config)),
        vocab_size=experiment.padded_vocab_size,
        max_sequence_length=settings["seq_length"],
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=not settings["untie_embeddings_and_output_weights"],
        position_embedding_type=settings["position_embedding_type"],
        rotary_percent=settings["rotary_percent"],
        rotary_base=settings["rotary_base"],
        rope_scaling=settings["rope_scaling"],
        rope_scaling_factor=settings["rope_scaling_factor"],
    )
    if not initialize:
        mark_tensor_parallel_shards(model)
    elif layout_invariant_init:
        initialize_base_weights(model, experiment.seed, config)
    if experiment.padded_vocab_size != experiment.vocab_size:
        mask_padded_vocabulary(model, experiment.vocab_size, experiment.padded_vocab_size)
    return model


def mark_tensor_parallel_shards(model) -> None:
    """The TP attributes megatron sets only when it initialises a weight itself: column layers
    and the vocab-parallel embedding split dim 0, row layers dim 1; biases of column layers
    are split (megatron marks those itself)."""
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for _, module in global_named_modules(model):
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)


def mask_padded_vocabulary(model, vocab_size: int, padded_vocab_size: int) -> None:
    """Logits of padded vocabulary rows (ids >= ``vocab_size``) become -inf wherever the last
    stage produces logits: in what the model returns and before its cross entropy. So a padded
    row never takes probability, never adds to a loss or its gradient, and is never generated."""
    for chunk in model_chunks(model):
        chunk.unpadded_vocab_size = vocab_size  # every stage describes the model alike
        if not getattr(chunk, "post_process", False):
            continue
        compute_loss = chunk.compute_language_model_loss

        def masked(logits, vocab=vocab_size, padded=padded_vocab_size):
            # logits [..., this TP rank's shard of the vocabulary], or all of it when the
            # caller asked megatron to gather them (runtime_gather_output)
            width = logits.shape[-1]
            first = 0 if width == padded else parallel_state.get_tensor_model_parallel_rank() * width
            ids = torch.arange(first, first + width, device=logits.device)
            return logits.masked_fill(ids >= vocab, float("-inf"))

        def loss_with_mask(labels, logits, _compute=compute_loss, _mask=masked):
            return _compute(labels, _mask(logits))

        chunk.compute_language_model_loss = loss_with_mask

        def logits_hook(module, args, output, _mask=masked):
            return _mask(output) if torch.is_tensor(output) and output.dim() == 3 else output

        chunk.register_forward_hook(logits_hook)


WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


def _tied_output_weight_copies(model) -> set:
    """ids of the last stage's copies of tied word embeddings (PP > 1 only: at PP = 1 the
    output layer uses the embedding's own parameter)."""
    return {id(chunk.shared_embedding_or_output_weight()) for chunk in model_chunks(model)
            if getattr(chunk, "share_embeddings_and_output_weights", False)
            and not chunk.pre_process and chunk.post_process}


@torch.no_grad()
def initialize_base_weights(model, seed: int, config) -> None:
    """Draw every matrix of the base as its full logical tensor, keep this rank's shard.

    Matrices ~ N(0, init_method_std); linear_proj / linear_fc2 with megatron's scaled std
    (std / sqrt(2 · num_layers)). Vectors (norm scales, biases) keep their constructor values,
    which do not depend on the layout. SwiGLU fc1 is sliced gate/up-aware. With tied
    embeddings at PP > 1 the last stage's output-layer copy is drawn as the word embeddings,
    so both stages hold the same tensor (megatron's zero-and-all-reduce in the constructor
    copied its own initialisation, which this draw replaces).
    """
    std = config.init_method_std
    scaled_std = std / math.sqrt(2.0 * config.num_layers)
    tied_copies = _tied_output_weight_copies(model)
    topology = Topology.current()
    for module_name, module in global_named_modules(model):
        for param_name, param in module.named_parameters(recurse=False):
            if param.dim() < 2 or getattr(param, "is_lora", False):
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            if id(param) in tied_copies:  # the same logical tensor as the first stage's
                name = WORD_EMBEDDINGS
            leaf = module_name.rsplit(".", 1)[-1]
            param_std = scaled_std if leaf in ("linear_proj", "linear_fc2") else std
            full_shape = list(param.shape)
            sharded = getattr(param, "tensor_model_parallel", False)
            tp_size, tp_rank = (topology.tensor_parallel_size_of(param),
                                topology.tensor_parallel_rank_of(param)) if sharded else (1, 0)
            partition_dim = getattr(param, "partition_dim", 0) if sharded else 0
            full_shape[partition_dim] *= tp_size
            generator = torch.Generator(device="cpu").manual_seed(stable_seed(seed, "base", name))
            full = torch.randn(full_shape, generator=generator, dtype=torch.float32) * param_std
            packed = partition_dim == 0 and is_packed_gate_up(module_name, module)
            local = shard_tensor(full, partition_dim, tp_rank, tp_size, packed)
            param.copy_(local.to(param.dtype))


def gpt_forward_inputs(tokens: torch.Tensor):
    """(position_ids, attention_mask) for a causal GPT forward; the mask is built inside."""
    batch, seq = tokens.shape
    position_ids = torch.arange(seq, device=tokens.device).unsqueeze(0).expand(batch, seq)
    return position_ids, None


def gathered_logits(logits: torch.Tensor, group: Optional[object] = None,
                    vocab_size: Optional[int] = None) -> torch.Tensor:
    """Full-vocabulary logits from vocab-parallel ones (for tests and generation), cut to
    ``vocab_size`` when the model's vocabulary is padded (``model.unpadded_vocab_size``)."""
    group = group or parallel_state.get_tensor_model_parallel_group()
    if group.size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits, group=group)
    return logits if vocab_size is None else logits[..., :vocab_size]
