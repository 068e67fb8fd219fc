"""Hugging Face PEFT export and import for megatron-core GPT models: Llama-shaped dense ones,
and MoE ones under Mixtral or Qwen2-MoE names (router, routed experts by global number, shared
expert), word embeddings as PEFT's embedding LoRA.

Megatron fuses what Hugging Face models keep apart, so the adapter is re-laid out on the way.
``RULES`` is the one table of megatron module <-> HF module(s), per family (docs/design.md,
Hugging Face PEFT re-layout): linear_qkv <-> q/k/v_proj (A copied to each; B de-interleaved per
query group), linear_fc1 <-> gate/up projections (A copied; B split [gate_all; up_all]), the
rest one to one.

Export works from any TP/PP/EP/ETP layout (the consolidated adapter is gathered first). Import
takes a PEFT adapter whose fused partners share A (as exported here) at the same rank, bit for
bit; partners with different A's become one factor of rank r·k (A's stacked, B's block-placed
and rescaled), still exact up to rounding, and each megatron module keeps the rank its group
needs (LoraConfig.rank_pattern). Base weights convert the same way with :func:`hf_state_dict`
(used by the tests against real transformers + peft).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .adapter_file import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterCheckpointError,
    adapter_directory_files,
    read_adapter_json,
    write_directory_atomically,
)
from .checkpoint import (
    adapter_tensors,
    describe_base_model,
    describe_layout,
    load_adapter,
    shared_lora_config,
)
from .agreement import is_distributed
from .config import LoraConfig
from .hf import FAMILIES
from .description import TIED, ModelDescription
from .errors import MegatronLoraError
from .finite import refuse_non_finite
from .gather import collect_on_rank0
from .untrusted import pattern_problem, regex_fullmatch, short
from .model import ModelLike, model_chunks
from .parallel import split_gate_up

PEFT_PREFIX = "base_model.model."
HF_ARCHITECTURES = ("llama", "mixtral", "qwen2_moe", "qwen3_moe")
# a transformers config.json model_type -> the family whose module names it uses
# transformers' model_type -> the family of names above (megatron_lora.hf owns the families)
MODEL_TYPE_ARCHITECTURES = {model_type: family.architecture
                            for model_type, family in FAMILIES.items()}


class InteropError(MegatronLoraError):
    """The model or the adapter has a shape that the Hugging Face mapping cannot express."""


# --- the one table of megatron module <-> Hugging Face module(s) -----------------------------


@dataclass(frozen=True)
class _Rule:
    """One megatron module and the Hugging Face module(s) it becomes (docs/design.md, Hugging
    Face PEFT re-layout). ``{expert}`` is the global expert number; per-layer names are under
    ``decoder.layers.{layer}.`` (megatron) and ``model.layers.{layer}.`` (HF). ``dims`` gives,
    per HF part, the shape-fact names of (B's rows, A's columns)."""

    megatron: str
    hf: Tuple[str, ...]
    dims: Tuple[Tuple[str, str], ...]
    split: str = "whole"  # "qkv": B rows de-interleaved per query group; "gate_up": [gate; up]
    per_layer: bool = True
    embedding: bool = False  # PEFT keeps an embedding's factors as lora_embedding_A / _B
    needs: Optional[str] = None  # the shape fact that must be set for the module to exist

    @property
    def expert(self) -> bool:
        return "{expert}" in self.megatron

    def megatron_name(self, layer=None, expert=None) -> str:
        name = self.megatron.format(expert=expert)
        return f"decoder.layers.{layer}.{name}" if self.per_layer else name

    def hf_name(self, part: int, layer=None, expert=None) -> str:
        name = self.hf[part].format(expert=expert)
        return f"model.layers.{layer}.{name}" if self.per_layer else name

    def _pattern(self, template: str, prefix: str) -> "re.Pattern":
        body = re.escape(template).replace(re.escape("{expert}"), r"(?P<expert>\d+)")
        return re.compile((prefix + r"(?P<layer>\d+)\." if self.per_layer else "") + body)

    def match_megatron(self, module: str):
        return self._pattern(self.megatron, r"decoder\.layers\.").fullmatch(module)

    def match_hf(self, module: str):
        """(part, match) when ``module`` is one of this rule's HF modules, else None."""
        for part, template in enumerate(self.hf):
            found = self._pattern(template, r"model\.layers\.").fullmatch(module)
            if found:
                return part, found
        return None


_ATTENTION = (
    _Rule("self_attention.linear_qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          (("q_rows", "hidden"), ("kv_rows", "hidden"), ("kv_rows", "hidden")), split="qkv"),
    _Rule("self_attention.linear_proj", ("self_attn.o_proj",), (("hidden", "q_rows"),)),
)
_ENDS = (
    _Rule("embedding.word_embeddings", ("model.embed_tokens",), (("hidden", "vocab"),),
          per_layer=False, embedding=True),
    _Rule("output_layer", ("lm_head",), (("vocab", "hidden"),), per_layer=False),
)
_DENSE_MLP = (
    _Rule("mlp.linear_fc1", ("mlp.gate_proj", "mlp.up_proj"), (("ffn", "hidden"),) * 2,
          split="gate_up"),
    _Rule("mlp.linear_fc2", ("mlp.down_proj",), (("hidden", "ffn"),)),
)


def _moe_rules(experts: str, gate: str, up: str, down: str, router: str):
    return (
        _Rule("mlp.experts.local_experts.{expert}.linear_fc1",
              (f"{experts}.{{expert}}.{gate}", f"{experts}.{{expert}}.{up}"),
              (("moe_ffn", "hidden"),) * 2, split="gate_up", needs="experts"),
        _Rule("mlp.experts.local_experts.{expert}.linear_fc2", (f"{experts}.{{expert}}.{down}",),
              (("hidden", "moe_ffn"),), needs="experts"),
        _Rule("mlp.router", (router,), (("experts", "hidden"),), needs="experts"),
    )


RULES = {
    "llama": _ATTENTION + _DENSE_MLP + _ENDS,
    "mixtral": _ATTENTION + _DENSE_MLP + _ENDS + _moe_rules(
        "block_sparse_moe.experts", "w1", "w3", "w2", "block_sparse_moe.gate"),
    "qwen2_moe": _ATTENTION + _DENSE_MLP + _ENDS + _moe_rules(
        "mlp.experts", "gate_proj", "up_proj", "down_proj", "mlp.gate") + (
        _Rule("mlp.shared_experts.linear_fc1",
              ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
              (("shared_ffn", "hidden"),) * 2, split="gate_up", needs="shared_ffn"),
        _Rule("mlp.shared_experts.linear_fc2", ("mlp.shared_expert.down_proj",),
              (("hidden", "shared_ffn"),), needs="shared_ffn")),
    # Qwen2-MoE's expert and router names, without a shared expert
    "qwen3_moe": _ATTENTION + _DENSE_MLP + _ENDS + _moe_rules(
        "mlp.experts", "gate_proj", "up_proj", "down_proj", "mlp.gate"),
}
# what each shape fact is called in an error message
_FACT_NAMES = {"q_rows": "heads × head_dim", "kv_rows": "query groups × head_dim",
               "hidden": "hidden_size", "ffn": "ffn_hidden_size", "moe_ffn": "moe_ffn_hidden_size",
               "shared_ffn": "moe_shared_expert_intermediate_size", "experts": "num_moe_experts",
               "vocab": "vocab_size"}


def default_architecture(shape) -> str:
    """The Hugging Face family whose names fit the model: Llama for a dense GPT, Qwen2-MoE for
    experts with a shared expert, Mixtral for experts without."""
    if not shape.get("experts"):
        return "llama"
    return "qwen2_moe" if shape.get("shared_ffn") else "mixtral"


def check_architecture(architecture: Optional[str], shape) -> str:
    """``architecture`` (None: the default for the model) checked against the model."""
    if architecture is None:
        return default_architecture(shape)
    if architecture not in HF_ARCHITECTURES:
        raise InteropError(f"architecture {architecture!r} is not one of {list(HF_ARCHITECTURES)}")
    if shape.get("shared_ffn") and architecture != "qwen2_moe":
        raise InteropError(f"architecture {architecture!r} has no shared expert, but this model has "
                           f"one (moe_shared_expert_intermediate_size "
                           f"{shape['shared_ffn']}); use 'qwen2_moe'")
    if shape.get("experts") and architecture == "llama":
        raise InteropError("architecture 'llama' has no experts, but this model has "
                           f"{shape['experts']}; use 'mixtral' or 'qwen2_moe'")
    return architecture


def _model_shape(model: ModelLike) -> Dict[str, int]:
    config = getattr(model_chunks(model)[0], "config", None)
    if config is None:
        raise InteropError("PEFT interop needs a megatron GPTModel (its .config gives the heads)")
    return shape_from_description(describe_base_model(model))


def _split_qkv_rows(tensor: torch.Tensor, shape) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[groups · (heads/groups + 2) · d, …] rows → q [heads · d], k [groups · d], v [groups · d]."""
    per_group = shape["heads"] // shape["groups"]
    d = shape["head_dim"]
    grouped = tensor.reshape(shape["groups"], (per_group + 2) * d, *tensor.shape[1:])
    q = grouped[:, : per_group * d].reshape(-1, *tensor.shape[1:])
    k = grouped[:, per_group * d: (per_group + 1) * d].reshape(-1, *tensor.shape[1:])
    v = grouped[:, (per_group + 1) * d:].reshape(-1, *tensor.shape[1:])
    return q, k, v


def _join_qkv_rows(q, k, v, shape) -> torch.Tensor:
    per_group, d = shape["heads"] // shape["groups"], shape["head_dim"]
    tail = q.shape[1:]
    return torch.cat([q.reshape(shape["groups"], per_group * d, *tail),
                      k.reshape(shape["groups"], d, *tail),
                      v.reshape(shape["groups"], d, *tail)], dim=1).reshape(-1, *tail)


def _factor_keys(rule: _Rule, hf_module: str) -> Tuple[str, str]:
    if rule.embedding:
        return f"{hf_module}.lora_embedding_A", f"{hf_module}.lora_embedding_B"
    return f"{hf_module}.lora_A.weight", f"{hf_module}.lora_B.weight"


def _find_megatron_rule(module: str, architecture: str):
    for rule in RULES[architecture]:
        found = rule.match_megatron(module)
        if found:
            return rule, found
    raise InteropError(
        f"{module} has no counterpart in Hugging Face {architecture!r} models (supported: "
        f"{sorted({r.megatron.rsplit('.', 1)[-1] for r in RULES[architecture]})})")


def hf_vocab(shape) -> Optional[int]:
    """The vocabulary the Hugging Face model has: megatron's padded rows are not part of it."""
    return shape.get("unpadded_vocab") or shape.get("vocab")


def _trim_vocab(rule: _Rule, weight_a, weight_b, shape):
    """Drop megatron's vocabulary padding (rows no token reaches) from an embedding's A
    (columns) and the output layer's B (rows)."""
    if not shape.get("unpadded_vocab"):
        return weight_a, weight_b
    if rule.embedding:
        return weight_a[:, : shape["unpadded_vocab"]], weight_b
    if rule.dims[0][0] == "vocab":
        return weight_a, weight_b[: shape["unpadded_vocab"]]
    return weight_a, weight_b


def _pad_vocab(rule: _Rule, weight_a, weight_b, shape):
    """_trim_vocab's inverse for import: zeros for the padded rows the HF model lacks."""
    padding = shape.get("vocab", 0) - (shape.get("unpadded_vocab") or shape.get("vocab", 0))
    if padding <= 0:
        return weight_a, weight_b
    if rule.embedding and weight_a.shape[1] == shape["unpadded_vocab"]:
        return torch.nn.functional.pad(weight_a, (0, padding)), weight_b
    if rule.dims[0][0] == "vocab" and weight_b.shape[0] == shape["unpadded_vocab"]:
        return weight_a, torch.nn.functional.pad(weight_b, (0, 0, 0, padding))
    return weight_a, weight_b


def megatron_to_hf_factors(tensors: Dict[str, torch.Tensor], shape,
                           architecture: Optional[str] = None, *,
                           merging: bool = False) -> Dict[str, torch.Tensor]:
    """Canonical megatron adapter tensors → PEFT keys of the HF ``architecture`` (without the
    PEFT prefix). A fused megatron module's A goes to each HF part; its B is split; the
    vocabulary padding is dropped. ``merging``: the factors will be merged into the weights,
    where an adapter on tied word embeddings is exact (one shared table)."""
    architecture = check_architecture(architecture, shape)
    out: Dict[str, torch.Tensor] = {}
    for module in sorted({k.rsplit(".lora_", 1)[0] for k in tensors}):
        weight_a, weight_b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
        rule, found = _find_megatron_rule(module, architecture)
        weight_a, weight_b = _trim_vocab(rule, weight_a, weight_b, shape)
        if rule.embedding and shape.get("tied") and not merging:
            raise InteropError(
                f"{module}: the word embeddings are tied to the output layer, where this adapter "
                f"acts too (docs/layer_types.md); PEFT's embedding LoRA on embed_tokens does not "
                f"reach lm_head, so the exported adapter would give other logits")
        if rule.split == "qkv":
            _check_qkv_rows(module, weight_b.shape[0], shape)
            parts = dict(enumerate(_split_qkv_rows(weight_b, shape)))
        elif rule.split == "gate_up":  # without a gate the whole B is the up projection
            parts = dict(enumerate(split_gate_up(weight_b))) if shape["glu"] else {1: weight_b}
        else:
            parts = {0: weight_b}
        for part, b in parts.items():
            key_a, key_b = _factor_keys(rule, rule.hf_name(part, **found.groupdict()))
            out[key_a] = weight_a.clone()
            out[key_b] = b.contiguous().clone()
    return out


def applies_to_model(rule: _Rule, shape) -> bool:
    """Whether the model has this rule's module (dense MLPs only in a model without experts)."""
    if rule.needs is not None:
        return bool(shape.get(rule.needs))
    return not (rule.megatron.startswith("mlp.") and shape.get("experts"))


def _parts(rule: _Rule, shape) -> Tuple[int, ...]:
    """The HF parts a megatron module has: a gate_up module without a gate has only up."""
    if rule.split == "gate_up" and not shape["glu"]:
        return (1,)
    return tuple(range(len(rule.hf)))


def _every_hf_module(rule: _Rule, part: int, shape) -> Optional[List[str]]:
    """Every HF module of this rule's part in the model (None when the counts are unknown)."""
    layers = [None]
    if rule.per_layer:
        if not shape.get("num_layers"):
            return None
        layers = range(shape["num_layers"])
    experts = [None]
    if rule.expert:
        if not shape.get("experts"):
            return None
        experts = range(shape["experts"])
    return [rule.hf_name(part, layer, expert) for layer in layers for expert in experts]


def _peft_target_modules(hf_modules: List[str], shape, architecture: str) -> List[str]:
    """Leaf names when each leaf covers every module of that name in the HF model (PEFT's usual
    form), else exact module names (a leaf would also adapt modules the file has no factors for)."""
    everywhere: Dict[str, set] = {}
    for rule in RULES[architecture]:
        if applies_to_model(rule, shape):
            for part in _parts(rule, shape):
                leaf = rule.hf[part].rsplit(".", 1)[-1]
                names = _every_hf_module(rule, part, shape)
                everywhere.setdefault(leaf, set()).update(names if names is not None else {None})
    leaves: Dict[str, set] = {}
    for name in hf_modules:
        leaves.setdefault(name.rsplit(".", 1)[-1], set()).add(name)
    if all(everywhere.get(leaf) == names for leaf, names in leaves.items()):
        return sorted(leaves)
    return sorted(hf_modules)


def shape_from_description(base_model: Dict[str, object]) -> Dict[str, int]:
    """The shape facts the mapping needs (heads, sizes, experts), by the short names the
    rules use, from a base-model description (adapter_config.json's base_model, or
    describe_base_model of a live model); derived by megatron_lora.description."""
    described = ModelDescription.from_json(base_model)
    try:
        heads, hidden = described.heads, int(described.facts["hidden_size"])
        groups = described.groups
        shape = {"heads": heads, "groups": groups, "hidden": hidden,
                 "ffn": int(described.facts["ffn_hidden_size"]),
                 "glu": described.fc1_halves == 2}
    except (KeyError, TypeError, ValueError) as error:
        raise InteropError(f"the base-model description lacks {error}; it is needed "
                           f"to split linear_qkv into q/k/v") from None
    if heads <= 0 or groups <= 0 or heads % groups:
        raise InteropError(f"num_attention_heads {heads} is not a positive multiple of "
                           f"num_query_groups {groups}; the heads cannot be split into q/k/v")
    if described.head_dim is None:
        raise InteropError(f"hidden_size {hidden} is not a multiple of num_attention_heads "
                           f"{heads} (and kv_channels is not given)")
    shape["head_dim"] = described.head_dim
    shape["q_rows"] = heads * shape["head_dim"]
    shape["kv_rows"] = groups * shape["head_dim"]
    shape["qkv_rows"] = described.qkv_rows
    for field, fact in (("num_layers", "num_layers"), ("vocab_size", "vocab"),
                        ("num_moe_experts", "experts"),
                        ("moe_shared_expert_intermediate_size", "shared_ffn")):
        if described.get(field) is not None:
            shape[fact] = int(described.get(field))
    if described.expert_ffn:
        shape["moe_ffn"] = described.expert_ffn
    shape["tied"] = bool(described.get(TIED, False))
    unpadded = described.get("unpadded_vocab_size")
    if unpadded is not None and shape.get("vocab") and int(unpadded) < shape["vocab"]:
        shape["unpadded_vocab"] = int(unpadded)  # megatron padded the vocabulary
    return shape


def _check_qkv_rows(module: str, rows: int, shape) -> None:
    """linear_qkv's B rows must be whole query groups of this head layout."""
    expected = shape["qkv_rows"]
    if rows != expected:
        raise InteropError(
            f"{module}.lora_B.weight has {rows} rows, but {shape['heads']} attention heads in "
            f"{shape['groups']} query groups of {shape['head_dim']} channels need {expected}; "
            f"the heads of the base-model description do not fit")


def peft_adapter_files(tensors: Dict[str, torch.Tensor], lora: LoraConfig, shape,
                       provenance: Optional[dict] = None,
                       architecture: Optional[str] = None,
                       base_model_name_or_path: Optional[str] = None) -> Dict[str, bytes]:
    """adapter_config.json and adapter_model.safetensors, as PEFT writes them, from the
    canonical megatron tensors, with the module names of the HF ``architecture``;
    ``base_model_name_or_path`` is what PeftModel.from_pretrained and AutoPeftModel load."""
    architecture = check_architecture(architecture, shape)
    refuse_non_finite(tensors.items(), "export-peft", InteropError)
    hf = megatron_to_hf_factors({k: v.detach().cpu() for k, v in tensors.items()}, shape,
                                architecture)
    hf_modules = sorted({k.rsplit(".lora_", 1)[0] for k in hf})
    ranks = {m: hf[f"{m}.lora_A.weight" if f"{m}.lora_A.weight" in hf
                   else f"{m}.lora_embedding_A"].shape[0] for m in hf_modules}
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    differing = {m: r for m, r in ranks.items() if r != default_rank}

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": default_rank,
        # megatron scales each module by lora_alpha over its own rank, as PEFT does: one alpha
        "lora_alpha": lora.lora_alpha,
        "lora_dropout": lora.lora_dropout,
        "use_rslora": lora.use_rslora,
        "target_modules": _peft_target_modules(hf_modules, shape, architecture),
        "rank_pattern": differing,
        "alpha_pattern": {m: lora.lora_alpha for m in differing},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "megatron_lora": dict(provenance or {}, hf_architecture=architecture),
    }
    weights = safetensors_bytes({PEFT_PREFIX + k: v.contiguous() for k, v in sorted(hf.items())},
                                metadata={"format": "pt"})
    return {WEIGHTS_NAME: weights,
            CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}


def export_peft(model: ModelLike, path, adapter_name: str = "default",
                architecture: Optional[str] = None) -> Optional[Path]:
    """Write ``adapter_name`` as a Hugging Face PEFT LoRA adapter for the equivalent
    transformers model (any TP/PP/EP/ETP layout; collective; rank 0 writes). ``architecture``
    picks the HF module names (HF_ARCHITECTURES; None: Llama for a dense model, Mixtral or
    Qwen2-MoE for experts without or with a shared expert). Like save_adapter, it replaces an
    adapter directory already at ``path`` atomically and refuses one holding other files (a
    PEFT model card, say); the CLI asks for --overwrite first."""
    shape = _model_shape(model)
    architecture = check_architecture(architecture, shape)  # on every rank, before any collective
    base_path = describe_base_model(model).get("name_or_path")
    lora = LoraConfig(**shared_lora_config(model, adapter_name))
    tensors = collect_on_rank0(adapter_tensors(model, adapter_name))
    if is_distributed() and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()
        return None
    try:
        files = peft_adapter_files(
            tensors, lora, shape, architecture=architecture, base_model_name_or_path=base_path,
            provenance={"adapter_name": adapter_name, "trained_layout": describe_layout(model)})
        return write_directory_atomically(path, files)
    finally:
        if is_distributed():
            torch.distributed.barrier()


# --- import ----------------------------------------------------------------------------------


def _read_peft(path: Path):
    if not (path / WEIGHTS_NAME).exists() and (path / "adapter_model.bin").exists():
        raise AdapterCheckpointError(f"{path} holds adapter_model.bin, a pickle file, which is "
                                     f"never loaded here; re-save it with safetensors "
                                     f"(PEFT's save_pretrained does by default)")
    config, config_path, weights_path = read_adapter_json(path, "a PEFT adapter directory")
    if config.get("peft_type") != "LORA":
        raise AdapterCheckpointError(f"{config_path}: peft_type {short(config.get('peft_type'))} "
                                     f"is not 'LORA'")
    try:
        tensors = load_file(weights_path)
    except Exception as error:  # safetensors' own error types
        raise AdapterCheckpointError(f"{weights_path} cannot be read as safetensors: {error}") \
            from None
    refuse_non_finite(tensors.items(), weights_path, AdapterCheckpointError)
    check_peft_config_against_tensors(config, peft_modules(tensors, weights_path), config_path)
    return config, tensors


def _peft_key(module: str, side: str, embedding: bool) -> str:
    return (f"{PEFT_PREFIX}{module}.lora_embedding_{side}" if embedding
            else f"{PEFT_PREFIX}{module}.lora_{side}.weight")


def peft_modules(tensors: Dict[str, torch.Tensor], weights_path) -> Dict[str, Dict[str, torch.Tensor]]:
    """{HF module name: {"A": tensor, "B": tensor, "embedding": bool}} of PEFT tensors (an
    embedding's factors are lora_embedding_A / _B); every key a LoRA factor with its partner,
    else an error naming the key."""
    factors: Dict[str, dict] = {}
    seen: Dict[Tuple[str, str], str] = {}  # (module, side) -> the key that gave it
    for key, tensor in sorted(tensors.items()):
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        linear = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        embedding = re.fullmatch(r"(.+)\.lora_embedding_([AB])(?:\.[^.]+)?", name)
        match = linear or embedding
        if match is None:
            raise AdapterCheckpointError(f"{weights_path}: unexpected PEFT key {key!r}; LoRA keys "
                                         f"end in .lora_A.weight / .lora_B.weight (or "
                                         f".lora_embedding_A / _B for an embedding)")
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise AdapterCheckpointError(f"{weights_path}: {key} is a {tensor.dim()}-D "
                                         f"{tensor.dtype} tensor; a factor is a float matrix")
        pair = factors.setdefault(match.group(1), {"embedding": match is embedding})
        if pair["embedding"] != (match is embedding):
            raise AdapterCheckpointError(f"{weights_path}: {match.group(1)} has both lora_A/B and "
                                         f"lora_embedding_A/B factors")
        earlier = seen.setdefault((match.group(1), match.group(2)), key)
        if earlier != key:  # e.g. with and without the base_model.model. prefix
            raise AdapterCheckpointError(f"{weights_path}: {earlier!r} and {key!r} are both "
                                         f"the lora_{match.group(2)} factor of "
                                         f"{match.group(1)}; keep one of them")
        pair[match.group(2)] = tensor
    for module, pair in factors.items():
        for side in "AB":
            if side not in pair:
                raise AdapterCheckpointError(
                    f"{weights_path}: missing key {_peft_key(module, side, pair['embedding'])} "
                    f"(its partner factor is in the file)")
    return factors


def _pattern_value(patterns, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key names the module or a dotted suffix of it."""
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key):
            return value
    return default


def _targeted(targets, module: str) -> bool:
    """PEFT's target_modules: a string is a regex over the whole name; a list holds names that
    match the module or a dotted suffix of it."""
    if isinstance(targets, str):
        return regex_fullmatch(targets, module)  # time-bounded: the pattern is the file's
    return any(module == t or module.endswith("." + t) for t in targets)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def check_peft_config_against_tensors(config: dict, factors, config_path) -> None:
    """A PEFT adapter_config.json's r, rank_pattern, lora_alpha and target_modules against its
    tensors: AdapterCheckpointError naming the file, the field and both values."""
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterCheckpointError(f"{config_path}: r is {short(r)}; expected a positive integer")
    alpha = config.get("lora_alpha")
    if not _positive_number(alpha):
        raise AdapterCheckpointError(f"{config_path}: lora_alpha is {short(alpha)}; expected a "
                                     f"number > 0")
    for field, valid in (("rank_pattern", _positive_int), ("alpha_pattern", _positive_number)):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise AdapterCheckpointError(f"{config_path}: {field} is {short(patterns)}; "
                                         f"expected an object of module name: value")
        for key, value in patterns.items():
            if not valid(value):
                raise AdapterCheckpointError(
                    f"{config_path}: {field}[{short(key)}] is {short(value)}; expected a "
                    f"{'positive integer' if valid is _positive_int else 'number > 0'}")
    dropout = config.get("lora_dropout")
    if dropout is not None and not (dropout == 0 or _positive_number(dropout) and dropout < 1.0):
        raise AdapterCheckpointError(f"{config_path}: lora_dropout is {short(dropout)}; "
                                     f"expected a number in [0, 1)")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets
                                         and all(isinstance(t, str) for t in targets))):
        raise AdapterCheckpointError(f"{config_path}: target_modules is {short(targets)}; expected "
                                     f"a list of module names or a regex string")
    if isinstance(targets, str):
        problem = pattern_problem(targets)
        if problem:
            raise AdapterCheckpointError(f"{config_path}: target_modules {short(targets)} is not a "
                                         f"valid regular expression ({problem})")
    for module, pair in sorted(factors.items()):
        rank = _pattern_value(config.get("rank_pattern"), module, None)
        field, rank = ("r", r) if rank is None else ("rank_pattern", rank)
        for side, actual in (("A", pair["A"].shape[0]), ("B", pair["B"].shape[1])):
            if actual != rank:
                raise AdapterCheckpointError(
                    f"{config_path}: {field} gives {module} rank {rank}, but "
                    f"{_peft_key(module, side, pair['embedding'])} has shape "
                    f"{list(pair[side].shape)}")
        if not _targeted(targets, module):
            raise AdapterCheckpointError(f"{config_path}: target_modules {short(targets)} does not "
                                         f"select {module}, which has factors in the file")


def _match_hf(module: str):
    """(architecture, rule, part, match) of an HF module name, or None."""
    for architecture in HF_ARCHITECTURES:
        for rule in RULES[architecture]:
            found = rule.match_hf(module)
            if found:
                return architecture, rule, found[0], found[1]
    return None


def _file_architecture(factors, shape) -> str:
    """The HF family the file's module names belong to (its expert / router names tell)."""
    families = set()
    for module in factors:
        matched = _match_hf(module)
        if matched and matched[1].needs:  # a rule that only its own family has
            families.add(matched[0])
    if len(families) > 1:
        raise InteropError(f"the adapter mixes module names of {sorted(families)}; one HF "
                           f"model has one family's names")
    return families.pop() if families else default_architecture(shape)


def check_peft_against_model(config: dict, factors, shape, path, described_by: str) -> None:
    """The PEFT tensors against the megatron model's description (``shape`` from
    shape_from_description): InteropError naming what differs, and a missing tensor of a
    targeted module by its key."""
    layers, experts = set(), set()
    for module, pair in sorted(factors.items()):
        matched = _match_hf(module)
        if matched is None:
            raise InteropError(f"PEFT module {module} has no megatron counterpart")
        _, rule, part, found = matched
        if rule.embedding != pair["embedding"]:
            raise InteropError(
                f"{path}: {module} has {'lora_embedding_A/B' if pair['embedding'] else 'lora_A/B'} "
                f"factors, but it is {'an embedding' if rule.embedding else 'a linear layer'} "
                f"({'lora_embedding_A/B' if rule.embedding else 'lora_A/B'} expected)")
        if rule.needs and not shape.get(rule.needs):
            raise InteropError(f"{path} does not fit the model described by {described_by}: "
                               f"{module} needs {_FACT_NAMES[rule.needs]}, which that model "
                               f"does not set")
        if part not in _parts(rule, shape):
            raise InteropError(f"{path}: {module} is a gate projection, but the model described "
                               f"by {described_by} has gated_linear_unit false")
        for side, dim, fact in (("B", 0, rule.dims[part][0]), ("A", 1, rule.dims[part][1])):
            expected = hf_vocab(shape) if fact == "vocab" else shape.get(fact)
            if expected is not None and pair[side].shape[dim] != expected:
                raise InteropError(
                    f"{path} does not fit the model described by {described_by}: "
                    f"{_FACT_NAMES[fact]} is {expected} there, but "
                    f"{_peft_key(module, side, pair['embedding'])} has shape "
                    f"{list(pair[side].shape)}")
        if found.groupdict().get("layer") is not None:
            layers.add(int(found.group("layer")))
        if found.groupdict().get("expert") is not None:
            experts.add(int(found.group("expert")))
    for count, indices, what in ((shape.get("num_layers"), layers, "layer"),
                                 (shape.get("experts"), experts, "expert")):
        if count and indices and max(indices) >= count:
            raise InteropError(f"{path} does not fit the model described by {described_by}: "
                               f"{'num_layers' if what == 'layer' else 'num_moe_experts'} is "
                               f"{count} there, but the adapter has {what} {max(indices)}")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or config.get("layers_to_transform") is not None:
        return
    architecture = _file_architecture(factors, shape)
    for rule in RULES[architecture]:
        if not applies_to_model(rule, shape):
            continue
        for part in _parts(rule, shape):
            leaf = rule.hf[part].rsplit(".", 1)[-1]
            for module in (_every_hf_module(rule, part, shape) or []) if leaf in targets else []:
                if module not in factors:
                    raise InteropError(
                        f"{path}: missing key {_peft_key(module, 'A', rule.embedding)}: "
                        f"target_modules select {leaf}, and the model described by "
                        f"{described_by} has {module}")


def _peft_scaling(config, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    return alpha / (rank ** 0.5) if config.get("use_rslora") else alpha / rank


def _fuse(parts, config, target_rank: int, target_scaling: float):
    """HF modules sharing an input → one (A, [B per module]) at megatron's rank and scaling.

    A shared A at that rank (what export_peft writes) is kept as is, and each B is rescaled by
    its own scaling (alpha_pattern) over megatron's: bit-exact when they agree. Otherwise the
    A's are stacked (zero-padded up to the rank) and each B is placed in its own column block,
    rescaled so that every module's delta is unchanged.
    """
    first_a = parts[0][1]
    if all(torch.equal(a, first_a) and a.shape[0] == target_rank for _, a, _ in parts):
        # one A: each B carries its own scaling (alpha_pattern) over megatron's
        ratios = [_peft_scaling(config, name, target_rank) / target_scaling for name, _, _ in parts]
        return first_a, [b if ratio == 1.0 else b * ratio
                         for (_, _, b), ratio in zip(parts, ratios)]
    stacked_a = torch.zeros(target_rank, first_a.shape[1], dtype=first_a.dtype)
    blocks, offset = [], 0
    for name, a, b in parts:
        stacked_a[offset: offset + a.shape[0]] = a
        block = torch.zeros(b.shape[0], target_rank, dtype=b.dtype)
        block[:, offset: offset + a.shape[0]] = b * (_peft_scaling(config, name, a.shape[0])
                                                       / target_scaling)
        blocks.append(block)
        offset += a.shape[0]
    return stacked_a, blocks


def hf_to_megatron_factors(config, tensors: Dict[str, torch.Tensor], shape):
    """PEFT tensors (prefix stripped) → (canonical megatron tensors, LoraConfig kwargs)."""
    factors = peft_modules(tensors, "the PEFT adapter")
    groups: Dict[str, dict] = {}  # megatron module -> {"rule": rule, "parts": {part: HF module}}
    for module in factors:
        matched = _match_hf(module)
        if matched is None:
            raise InteropError(f"PEFT module {module} has no megatron counterpart")
        _, rule, part, found = matched
        target = rule.megatron_name(**found.groupdict())
        groups.setdefault(target, {"rule": rule, "parts": {}})["parts"][part] = module

    for target, group in groups.items():
        rule, present = group["rule"], sorted(group["parts"])
        needed = list(_parts(rule, shape))
        if present != needed:
            raise InteropError(
                f"{target}: PEFT adapts {[rule.hf[p].rsplit('.', 1)[-1] for p in present]}; "
                f"megatron's fused {target.rsplit('.', 1)[-1]} needs "
                f"{[rule.hf[p].rsplit('.', 1)[-1] for p in needed]} together")

    # each megatron module at the rank its group needs: r for the most, rank_pattern for the rest
    def needed_rank(members):
        a_list = [factors[m]["A"] for m in members]
        shared = all(torch.equal(a, a_list[0]) for a in a_list)
        return a_list[0].shape[0] if shared else sum(a.shape[0] for a in a_list)

    ordered = {t: [g["parts"][p] for p in sorted(g["parts"])] for t, g in groups.items()}
    ranks = {target: needed_rank(members) for target, members in ordered.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    lora_kwargs = {"r": rank, "lora_alpha": float(config["lora_alpha"]),
                   "use_rslora": bool(config.get("use_rslora")),
                   "lora_dropout": float(config.get("lora_dropout") or 0.0),
                   "target_modules": sorted(groups),
                   "rank_pattern": {t: r for t, r in sorted(ranks.items()) if r != rank} or None}
    lora = LoraConfig(**lora_kwargs)  # the scaling each module will have in megatron
    out = {}
    for target, members in sorted(ordered.items()):
        parts_a, parts_b = _fuse([(m, factors[m]["A"], factors[m]["B"]) for m in members],
                                 config, ranks[target], lora.scaling_for(target))
        if groups[target]["rule"].split == "qkv":
            weight_b = _join_qkv_rows(*parts_b, shape)
        else:
            weight_b = torch.cat(parts_b, dim=0) if len(parts_b) > 1 else parts_b[0]
        parts_a, weight_b = _pad_vocab(groups[target]["rule"], parts_a, weight_b, shape)
        out[f"{target}.lora_A.weight"] = parts_a.contiguous()
        out[f"{target}.lora_B.weight"] = weight_b.contiguous()
    return out, lora_kwargs


def read_peft(path) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """A PEFT LoRA adapter directory's config and tensors (safetensors only, never pickle)."""
    return _read_peft(Path(path))


def megatron_adapter_files(peft_config: dict, peft_tensors: Dict[str, torch.Tensor], shape,
                           adapter_name: str = "default",
                           base_model: Optional[dict] = None) -> Dict[str, bytes]:
    """A consolidated megatron_lora adapter directory's files from a PEFT adapter."""
    tensors, lora_kwargs = hf_to_megatron_factors(peft_config, peft_tensors, shape)
    return adapter_directory_files(tensors, LoraConfig(**lora_kwargs).to_dict(), adapter_name,
                                   {"source": "peft"}, base_model or {})


def import_peft(model: ModelLike, path, adapter_name: str = "default", *, verbose: bool = False) -> str:
    """Load a Hugging Face PEFT LoRA adapter (Llama module names) into the megatron model at its
    current layout. Collective. Goes through load_adapter, so everything is validated before
    any parameter changes."""
    config, tensors = read_peft(path)
    shape = _model_shape(model)
    check_peft_against_model(config, peft_modules(tensors, path), shape, path, "this model")
    files = megatron_adapter_files(config, tensors, shape, adapter_name)
    with tempfile.TemporaryDirectory(prefix="megatron_lora_import_") as scratch:
        staged = write_directory_atomically(Path(scratch) / "adapter", files)
        return load_adapter(model, staged, adapter_name, verbose=verbose)


# --- base weights, for checking against transformers -----------------------------------------


def hf_state_dict(full_state: Dict[str, torch.Tensor], shape, architecture: str = "llama"):
    """A TP=1 megatron GPT state dict (plain keys) → the transformers (5.x) state dict of the
    LlamaForCausalLM / MixtralForCausalLM / Qwen2MoeForCausalLM with the same weights. Experts
    are stacked as transformers 5 keeps them: gate_up_proj [experts, 2·ffn, hidden] (megatron's
    fc1 is [gate; up] already) and down_proj [experts, hidden, ffn]."""
    architecture = check_architecture(architecture, shape)
    vocab = hf_vocab(shape)  # megatron's padded vocabulary rows are not the HF model's
    hf = {"model.embed_tokens.weight": full_state["embedding.word_embeddings.weight"][:vocab],
          "model.norm.weight": full_state["decoder.final_layernorm.weight"]}
    if full_state.get("output_layer.weight") is not None:  # absent when tied to the embeddings
        hf["lm_head.weight"] = full_state["output_layer.weight"][:vocab]
    for i in range(shape["num_layers"]):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = _split_qkv_rows(full_state[src + "self_attention.linear_qkv.weight"], shape)
        hf.update({
            dst + "input_layernorm.weight": full_state[src + "input_layernorm.weight"],
            dst + "post_attention_layernorm.weight": full_state[src + "pre_mlp_layernorm.weight"],
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": full_state[src + "self_attention.linear_proj.weight"],
        })
        if not shape.get("experts"):
            gate, up = split_gate_up(full_state[src + "mlp.linear_fc1.weight"])
            hf.update({dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
                       dst + "mlp.down_proj.weight": full_state[src + "mlp.linear_fc2.weight"]})
            continue
        experts = src + "mlp.experts.local_experts."
        hf[dst + "mlp.gate.weight"] = full_state[src + "mlp.router.weight"]
        for name, megatron in (("gate_up_proj", "linear_fc1"), ("down_proj", "linear_fc2")):
            hf[dst + f"mlp.experts.{name}"] = torch.stack(
                [full_state[f"{experts}{e}.{megatron}.weight"] for e in range(shape["experts"])])
        if shape.get("shared_ffn"):
            shared = src + "mlp.shared_experts."
            gate, up = split_gate_up(full_state[shared + "linear_fc1.weight"])
            hf.update({dst + "mlp.shared_expert.gate_proj.weight": gate,
                       dst + "mlp.shared_expert.up_proj.weight": up,
                       dst + "mlp.shared_expert.down_proj.weight":
                           full_state[shared + "linear_fc2.weight"],
                       dst + "mlp.shared_expert_gate.weight": full_state[shared + "gate_weight"]})
    return {k: v.contiguous() for k, v in hf.items()}
