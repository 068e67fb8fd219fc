"""The one description of a base model: what it is (sizes, heads, experts, vocabulary, norm,
rope) whatever said so: an experiment (YAML or flags), megatron's TransformerConfig and the
vocabulary, a live model, an adapter's ``base_model`` JSON, a full-training save's
``model_description.json`` or a Hugging Face ``config.json``.

It owns the sizes derived from those facts (head size, linear_qkv's rows, the GLU halves of
fc1, the experts' sizes) and the comparison of two descriptions, so no other module repeats a
formula or a field list.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

# what an adapter's factor shapes depend on: adapter_config.json's base_model
ADAPTER_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                  "ffn_hidden_size", "kv_channels", "gated_linear_unit", "num_moe_experts",
                  "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "vocab_size")
# what decides a full checkpoint's tensors (and what it was trained on): model_description.json
CHECKPOINT_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "kv_channels", "vocab_size", "num_moe_experts",
                     "moe_ffn_hidden_size", "activation", "normalization", "add_bias_linear",
                     "untie_embeddings_and_output_weights", "position_embedding_type",
                     "rotary_base", "rotary_percent", "seq_length", "layernorm_epsilon",
                     "moe_router_topk", "add_qkv_bias", "qk_layernorm", "rope_scaling",
                     "rope_scaling_factor", "moe_router_pre_softmax",
                     "moe_shared_expert_intermediate_size", "make_vocab_size_divisible_by")
TIED = "share_embeddings_and_output_weights"
UNPADDED = "unpadded_vocab_size"
# where a base came from, not what it is: recorded, never compared
PROVENANCE = "name_or_path"
# facts that may differ between two descriptions of the same model
_NOT_COMPARED = (PROVENANCE, "seq_length")


def qkv_rows(heads: int, groups: int, head_dim: int) -> int:
    """linear_qkv's output rows: per query group its q heads, one k and one v head."""
    return (heads + 2 * groups) * head_dim


class ModelDescription:
    """Facts about a base model, by megatron_config / TransformerConfig field name (plus
    share_embeddings_and_output_weights, unpadded_vocab_size and name_or_path). Missing facts
    are None: a description may say less than another (an old adapter's, say)."""

    def __init__(self, facts: Mapping[str, object]):
        self.facts = {k: v for k, v in dict(facts).items() if v is not None}

    # --- built from ------------------------------------------------------------------------
    @classmethod
    def from_json(cls, data) -> "ModelDescription":
        """adapter_config.json's base_model, or model_description.json."""
        return cls(data if isinstance(data, Mapping) else {})

    @classmethod
    def from_transformer_config(cls, config, vocab_size: Optional[int]) -> "ModelDescription":
        facts = {field: getattr(config, field, None) for field in ADAPTER_FIELDS}
        facts["vocab_size"] = vocab_size
        return cls(facts)

    @classmethod
    def from_model(cls, model) -> "ModelDescription":
        """A live megatron GPT (any stage: every chunk describes the same model)."""
        from .model import model_chunks

        chunks = model_chunks(model)
        chunk = chunks[0]
        description = cls.from_transformer_config(getattr(chunk, "config", None),
                                                  getattr(chunk, "vocab_size", None))
        if getattr(chunk, "share_embeddings_and_output_weights", False):
            description.facts[TIED] = True
        unpadded = max((getattr(c, "unpadded_vocab_size", 0) for c in chunks), default=0)
        if unpadded and unpadded != description.facts.get("vocab_size"):
            description.facts[UNPADDED] = unpadded  # the rows past it are padding
        source = getattr(chunk, "hf_name_or_path", None)
        if source:  # PEFT's base_model_name_or_path, export-hf's --base
            description.facts[PROVENANCE] = source
        return description

    @classmethod
    def from_experiment(cls, experiment) -> "ModelDescription":
        """An ExperimentConfig (its megatron_config, the model's padded vocabulary)."""
        from .experiment import ACTIVATIONS

        m = experiment.megatron_config
        facts = {field: m.get(field) for field in CHECKPOINT_FIELDS + ADAPTER_FIELDS}
        facts["gated_linear_unit"] = bool(ACTIVATIONS[m["activation"]][1]
                                          or m.get("gated_linear_unit", False))
        facts["vocab_size"] = experiment.padded_vocab_size
        if experiment.padded_vocab_size != experiment.vocab_size:
            facts[UNPADDED] = experiment.vocab_size
        if not m.get("untie_embeddings_and_output_weights", True):
            facts[TIED] = True
        if experiment.hf_path:
            facts[PROVENANCE] = experiment.hf_path
        return cls(facts)

    @classmethod
    def from_hf_directory(cls, path) -> "ModelDescription":
        """A Hugging Face model directory's config.json (megatron_lora.hf reads it)."""
        from .hf import hf_experiment

        return cls.from_experiment(hf_experiment(path))

    # --- what is written where -------------------------------------------------------------
    def for_adapter(self) -> Dict[str, object]:
        """adapter_config.json's base_model."""
        keep = ADAPTER_FIELDS + (TIED, UNPADDED, PROVENANCE)
        return {k: v for k, v in self.facts.items() if k in keep and v is not None}

    def for_checkpoint(self) -> Dict[str, object]:
        """model_description.json of a full-training save: an experiment's megatron_config
        values, so vocab_size is the real one and make_vocab_size_divisible_by its padding."""
        facts = {k: self.facts.get(k) for k in CHECKPOINT_FIELDS}
        facts["vocab_size"] = self.unpadded_vocab_size
        return facts

    # --- comparing ---------------------------------------------------------------------------
    def differences(self, other: "ModelDescription",
                    fields: Optional[Tuple[str, ...]] = None) -> List[Tuple[str, object, object]]:
        """(field, this value, other's value) for every fact both state and they disagree on
        (where a base came from, and the sequence length, are never compared)."""
        keys = sorted(self.facts.keys() & other.facts.keys())
        if fields is not None:
            keys = [k for k in keys if k in fields]
        return [(k, self.facts[k], other.facts[k]) for k in keys
                if k not in _NOT_COMPARED and self.facts[k] != other.facts[k]]

    # --- derived sizes -----------------------------------------------------------------------
    def get(self, field, default=None):
        return self.facts.get(field, default)

    @property
    def heads(self) -> int:
        return int(self.facts["num_attention_heads"])

    @property
    def groups(self) -> int:
        return int(self.facts.get("num_query_groups") or self.heads)

    @property
    def head_dim(self) -> Optional[int]:
        """kv_channels, else hidden / heads (megatron's default) when that divides."""
        if self.facts.get("kv_channels"):
            return int(self.facts["kv_channels"])
        hidden = int(self.facts["hidden_size"])
        return hidden // self.heads if hidden % self.heads == 0 else None

    @property
    def qkv_rows(self) -> int:
        return qkv_rows(self.heads, self.groups, self.head_dim)

    @property
    def experts(self) -> Optional[int]:
        return self.facts.get("num_moe_experts")

    @property
    def expert_ffn(self) -> Optional[int]:
        """The experts' ffn size (megatron's default: ffn_hidden_size)."""
        if not self.experts:
            return None
        return int(self.facts.get("moe_ffn_hidden_size") or self.facts["ffn_hidden_size"])

    @property
    def fc1_halves(self) -> int:
        """SwiGLU's fc1 holds gate and up: 2 × ffn rows; an ungated one ffn."""
        return 2 if self.facts.get("gated_linear_unit") else 1

    @property
    def unpadded_vocab_size(self) -> Optional[int]:
        return self.facts.get(UNPADDED) or self.facts.get("vocab_size")
