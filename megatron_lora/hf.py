"""Hugging Face checkpoints in: a transformers model directory (config.json and safetensors)
becomes an experiment config and fills a megatron-core GPT at any TP / SP / PP / EP / expert-TP
layout (docs/hf.md).

* ``hf_experiment(path)``: config.json -> ExperimentConfig. Every field megatron-core must
  reproduce is read (both the transformers 4 and 5 spellings of the rope settings); anything
  it cannot reproduce exactly is refused naming the field and value, never approximated.
* ``load_hf_weights(model, path)``: collective; each rank reads only its own slices of the
  tensors (safetensors' lazy ``get_slice``), checks every tensor's presence and shape on every
  rank before any parameter changes, and fills every base parameter, or says which it could not.

Build the model with ``build_gpt_model(experiment, initialize=False)``: a model about to be
loaded is not drawn first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .errors import MegatronLoraError
from .untrusted import loads_json

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Megatron-LM's default: the vocabulary is padded to a multiple of this, whatever the TP size,
# so the padded model (and every adapter on its embeddings) is the same at every layout
VOCAB_PADDING = 128


class HuggingFaceError(MegatronLoraError):
    """A Hugging Face directory this project cannot read exactly."""


# --- the families ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """What one transformers ``model_type`` is in megatron terms."""

    architecture: str  # its names: megatron_lora.interop.RULES[architecture], base and adapter
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    qk_norm: bool = False  # Qwen3: RMSNorm per head on q and k
    moe: bool = False
    # the hub's configs and transformers 5 do not always agree on the name: the first found
    expert_count_keys: Tuple[str, ...] = ("num_local_experts",)
    expert_ffn_key: str = "intermediate_size"
    shared_expert: bool = False
    # whether the routing weights are renormalised over the top k (megatron: softmax after top-k)
    renormalised: Optional[bool] = None  # None: config.json's norm_topk_prob says



FAMILIES: Dict[str, Family] = {
    "llama": Family("llama"),
    "mistral": Family("llama"),
    "qwen2": Family("llama", qkv_bias=True),
    "qwen3": Family("llama", qk_norm=True),
    "mixtral": Family("mixtral", moe=True, renormalised=True),
    "qwen2_moe": Family("qwen2_moe", qkv_bias=True, moe=True,
                        expert_count_keys=("num_experts", "num_local_experts"),
                        expert_ffn_key="moe_intermediate_size", shared_expert=True),
    "qwen3_moe": Family("qwen3_moe", qk_norm=True, moe=True,
                        expert_count_keys=("num_experts", "num_local_experts"),
                        expert_ffn_key="moe_intermediate_size"),
}

# the megatron_config keys config.json decides: a flag or YAML key that says otherwise is an error
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "ffn_hidden_size", "vocab_size", "normalization", "activation",
              "add_bias_linear", "add_qkv_bias", "qk_layernorm", "layernorm_epsilon",
              "position_embedding_type", "rotary_base", "rotary_percent", "rope_scaling",
              "rope_scaling_factor", "untie_embeddings_and_output_weights", "num_moe_experts",
              "moe_ffn_hidden_size", "moe_router_topk", "moe_router_pre_softmax",
              "moe_shared_expert_intermediate_size", "moe_shared_expert_gate",
              "make_vocab_size_divisible_by")


def is_hf_directory(path) -> bool:
    """Whether ``path`` is a Hugging Face model directory (it holds a config.json)."""
    return path is not None and (Path(path) / CONFIG_FILE).is_file()


def read_hf_config(path) -> dict:
    """config.json of a Hugging Face directory, as a dict (one-line errors)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise HuggingFaceError(f"{path} is not a Hugging Face model directory: {CONFIG_FILE} is "
                               f"missing")
    try:
        config = loads_json(file.read_text(encoding="utf-8"), file, HuggingFaceError)
    except (ValueError, UnicodeDecodeError) as error:
        raise HuggingFaceError(f"{file} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise HuggingFaceError(f"{file} is not a JSON object")
    return config


def family_of(config: dict, file) -> Family:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise HuggingFaceError(f"{file}: model_type {model_type!r} is not supported; supported: "
                               f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


class _Fields:
    """config.json's values, each read once, with errors naming the file and the field."""

    def __init__(self, config: dict, file):
        self.config, self.file = config, file

    def get(self, key, default=None):
        value = self.config.get(key, default)
        return default if value is None else value

    def require(self, key, kind=int):
        value = self.config.get(key)
        if value is None:
            raise HuggingFaceError(f"{self.file}: {key} is missing")
        return self.typed(key, value, kind)

    def typed(self, key, value, kind):
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise HuggingFaceError(f"{self.file}: {key} is {value!r}; expected a positive integer")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value)):
            raise HuggingFaceError(f"{self.file}: {key} is {value!r}; expected a finite number")
        return value

    def refuse(self, key, value, why: str):
        raise HuggingFaceError(f"{self.file}: {key} {value!r} is not supported: {why}")


def _rope(fields: _Fields) -> dict:
    """rotary_base and the rope scaling, from transformers 5's rope_parameters or transformers
    4's top-level rope_theta / rope_scaling; reading only one spelling would change every logit."""
    parameters = fields.config.get("rope_parameters")
    if parameters is not None and not isinstance(parameters, dict):
        fields.refuse("rope_parameters", parameters, "expected an object")
    scaling = fields.config.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        fields.refuse("rope_scaling", scaling, "expected an object")
    merged = dict(scaling or {})
    merged.update(parameters or {})
    theta = merged.get("rope_theta", fields.config.get("rope_theta"))
    if theta is None:
        raise HuggingFaceError(f"{fields.file}: rope_theta is missing (in rope_parameters or at "
                               f"the top level)")
    theta = fields.typed("rope_theta", theta, float)
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    out = {"position_embedding_type": "rope",
           "rotary_base": int(theta) if float(theta).is_integer() else float(theta)}
    if rope_type == "default":
        return out
    if rope_type != "llama3":
        fields.refuse("rope_type", rope_type, "megatron-core's rotary embedding has "
                      "'default' and Llama 3.1's 'llama3' scaling only")
    # megatron-core applies Llama 3.1's scaling with these three constants fixed
    for key, fixed in (("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
                       ("original_max_position_embeddings", 8192)):
        if key in merged and float(merged[key]) != fixed:
            fields.refuse(f"rope {key}", merged[key], f"megatron-core's llama3 rope scaling "
                          f"fixes it at {fixed}")
    factor = fields.typed("rope factor", merged.get("factor", 8.0), float)
    out.update(rope_scaling=True, rope_scaling_factor=float(factor))
    return out


def _sliding_window(fields: _Fields, seq_length: Optional[int]) -> None:
    window = fields.config.get("sliding_window")
    if window is None or fields.config.get("use_sliding_window") is False:
        return
    if seq_length is None or seq_length > window:
        fields.refuse("sliding_window", window, f"it would act at a sequence length of "
                      f"{seq_length or fields.config.get('max_position_embeddings')}, and "
                      f"megatron-core's attention here has no sliding window; use --seq-length "
                      f"<= {window}")


def _experts(fields: _Fields, family: Family) -> dict:
    if not family.moe:
        return {}
    count_key = next((k for k in family.expert_count_keys if fields.get(k) is not None),
                     family.expert_count_keys[0])
    count = fields.require(count_key)
    out = {"num_moe_experts": count,
           "moe_ffn_hidden_size": fields.require(family.expert_ffn_key),
           "moe_router_topk": fields.require("num_experts_per_tok")}
    renormalised = family.renormalised
    if renormalised is None:
        renormalised = bool(fields.get("norm_topk_prob", False))
    # top-k then softmax renormalises over the chosen experts (Mixtral, norm_topk_prob true);
    # softmax then top-k keeps the full softmax's weights (Qwen2-MoE's default)
    out["moe_router_pre_softmax"] = not renormalised
    if fields.get("router_jitter_noise", 0.0):
        fields.refuse("router_jitter_noise", fields.config["router_jitter_noise"],
                      "megatron-core's router has no jitter; set it to 0")
    sparse_step = fields.get("decoder_sparse_step", 1)
    if sparse_step != 1 or fields.get("mlp_only_layers", []):
        fields.refuse("decoder_sparse_step / mlp_only_layers",
                      [sparse_step, fields.get("mlp_only_layers", [])],
                      "every layer must be a mixture-of-experts layer")
    if family.shared_expert:
        shared = fields.get("shared_expert_intermediate_size", 0)
        if shared:
            out.update(moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=True)
    return out


def megatron_config_from_hf(config: dict, file, seq_length: Optional[int] = None) -> dict:
    """The megatron_config values config.json decides (plus its dropouts and seq_length =
    max_position_embeddings), or HuggingFaceError naming the field that megatron-core cannot
    reproduce."""
    fields = _Fields(config, file)
    family = family_of(config, file)
    heads = fields.require("num_attention_heads")
    hidden = fields.require("hidden_size")
    head_dim = fields.get("head_dim") or None
    if head_dim is None and hidden % heads:
        fields.refuse("hidden_size", hidden, f"not a multiple of num_attention_heads {heads} and "
                      f"head_dim is not given")
    activation = fields.get("hidden_act", "silu")
    if activation != "silu":
        fields.refuse("hidden_act", activation, "the families here use SwiGLU (silu)")
    if fields.get("attention_bias", False) and not family.qkv_bias:
        fields.refuse("attention_bias", True, "megatron-core's local layers put a bias on all "
                      "four attention projections or on q/k/v only, not on o_proj alone")
    if fields.get("mlp_bias", False):
        fields.refuse("mlp_bias", True, "biases on the MLP are not supported")
    partial = fields.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        fields.refuse("partial_rotary_factor", partial, "only full rotary embeddings are "
                      "proven exact here")
    max_positions = fields.require("max_position_embeddings")
    length = seq_length or max_positions
    _sliding_window(fields, length)
    values = {
        "num_layers": fields.require("num_hidden_layers"),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": fields.get("num_key_value_heads", heads),
        "kv_channels": head_dim or hidden // heads,
        "ffn_hidden_size": fields.require("intermediate_size"),
        "vocab_size": fields.require("vocab_size"),
        "make_vocab_size_divisible_by": VOCAB_PADDING,
        "seq_length": max_positions,
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(fields.typed("rms_norm_eps", fields.get("rms_norm_eps", 1e-6),
                                                float)),
        "activation": "swiglu",
        "add_bias_linear": False,
        # Qwen2's configs may say so themselves (transformers 5 writes qkv_bias)
        "add_qkv_bias": bool(fields.get("qkv_bias", family.qkv_bias))
        or bool(fields.get("attention_bias", False)),
        "qk_layernorm": family.qk_norm,
        "untie_embeddings_and_output_weights": not fields.get("tie_word_embeddings", False),
        # transformers' models have no hidden dropout; attention dropout is config.json's
        "hidden_dropout": 0.0,
        "attention_dropout": float(fields.get("attention_dropout", 0.0)),
        **_rope(fields),
        **_experts(fields, family),
    }
    if values["num_query_groups"] <= 0 or heads % values["num_query_groups"]:
        fields.refuse("num_key_value_heads", values["num_query_groups"],
                      f"must divide num_attention_heads {heads}")
    return values


def hf_experiment(path, overrides=None, world_size: Optional[int] = None):
    """The ExperimentConfig of the Hugging Face model at ``path``; ``overrides`` as in
    load_experiment (a dict, nested or dotted, or "key=value" strings) set the layout, the
    training and lora sections, seq_length, params_dtype and dropouts. An override of a value
    config.json decides (SHAPE_KEYS) that differs from it is an error naming both."""
    from .experiment import ExperimentConfigError, flatten_overrides, load_experiment

    config, file = read_hf_config(path), Path(path) / CONFIG_FILE
    flat = flatten_overrides(overrides)
    seq_length = flat.get("megatron_config.seq_length")
    values = megatron_config_from_hf(config, file,
                                     seq_length if isinstance(seq_length, int) else None)
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if section == "megatron_config" and name in SHAPE_KEYS and name in values \
                and value != values[name]:
            raise HuggingFaceError(f"{name} {value!r} contradicts {file} ({name} "
                                   f"{values[name]!r}); leave it out to take the model's")
    try:
        experiment = load_experiment(data={"megatron_config": values}, overrides=flat,
                                     world_size=world_size)
    except ExperimentConfigError as error:
        raise HuggingFaceError(f"{file}: {error}") from None
    experiment.source = str(file)
    experiment.hf_path = str(Path(path).resolve())
    return experiment


# --- the tensors -----------------------------------------------------------------------------


class HFCheckpoint:
    """The safetensors of a Hugging Face directory: which file holds each tensor, its shape,
    and slices of it read lazily (never a whole tensor that is split over ranks)."""

    def __init__(self, path):
        from safetensors import safe_open

        self.path = Path(path)
        index, single = self.path / INDEX_FILE, self.path / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = loads_json(index.read_text(encoding="utf-8"), index,
                                        HuggingFaceError)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError("weight_map is not an object")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
                raise HuggingFaceError(f"{index} is not a safetensors index ({error})") from None
            files = {name: str(file) for name, file in weight_map.items()}
        elif single.is_file():
            files = None
        else:
            bins = sorted(p.name for p in self.path.glob("*.bin"))
            hint = (f"; it holds {', '.join(bins)}, pickle files, which are never loaded here"
                    if bins else "")
            raise HuggingFaceError(f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
        self._open: Dict[str, object] = {}
        self._safe_open = safe_open
        if files is None:
            handle = self._handle(SINGLE_FILE)
            files = {name: SINGLE_FILE for name in handle.keys()}
        for name in sorted(set(files.values())):
            if Path(name).name != name:
                raise HuggingFaceError(f"{index}: shard name {name!r} is not a file name in "
                                       f"{self.path}")
        self.files = files

    def _handle(self, file: str):
        if file not in self._open:
            location = self.path / file
            if not location.is_file():
                raise HuggingFaceError(f"{location} is missing (named by {INDEX_FILE})")
            try:
                self._open[file] = self._safe_open(str(location), framework="pt")
            except Exception as error:  # safetensors' own error types
                raise HuggingFaceError(f"{location} cannot be read as safetensors: "
                                       f"{str(error).splitlines()[0]}") from None
        return self._open[file]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _slice(self, name: str):
        if name not in self.files:
            raise HuggingFaceError(f"{self.path}: tensor {name} is missing")
        handle = self._handle(self.files[name])
        try:
            return handle.get_slice(name)
        except Exception as error:
            raise HuggingFaceError(f"{self.path / self.files[name]}: tensor {name} cannot be "
                                   f"read ({str(error).splitlines()[0]})") from None

    def shape(self, name: str) -> List[int]:
        return list(self._slice(name).get_shape())

    def read(self, name: str, rows: Optional[Tuple[int, int]] = None,
             cols: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Rows [a, b) (and columns [c, d)) of a tensor, reading nothing else."""
        part = self._slice(name)
        if rows is None and cols is None:
            return part[:]
        r = slice(*rows) if rows is not None else slice(None)
        if cols is None:
            return part[r]
        return part[r, slice(*cols)]


# A logical megatron tensor (at TP=1) described by where its rows come from in the HF files.
# ``read(checkpoint, rows, cols)`` gives rows [a, b) and columns [c, d) of it (cols only for 2-D).


@dataclass(frozen=True)
class _Rows:
    """The logical tensor is the HF tensors stacked along rows (fc1: [gate; up]); rows past
    the last one (a padded vocabulary) are zeros."""

    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]  # the HF tensors' expected shapes
    padded_rows: int = 0

    @property
    def rows(self) -> int:
        return sum(s[0] for s in self.shapes) + self.padded_rows

    def read(self, checkpoint: HFCheckpoint, rows, cols):
        pieces, offset = [], 0
        for name, shape in zip(self.names, self.shapes):
            start, stop = max(rows[0], offset), min(rows[1], offset + shape[0])
            if start < stop:
                pieces.append(checkpoint.read(name, (start - offset, stop - offset), cols))
            offset += shape[0]
        start = max(rows[0], offset)
        if start < rows[1]:  # padded vocabulary rows: zero, so they never count
            width = () if len(self.shapes[0]) == 1 else (
                (cols[1] - cols[0]) if cols else self.shapes[0][1],)
            dtype = pieces[0].dtype if pieces else torch.float32
            pieces.append(torch.zeros((rows[1] - start, *width), dtype=dtype))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


@dataclass(frozen=True)
class _QKV:
    """megatron's linear_qkv rows, grouped per query group [q heads of g; k_g; v_g], from HF's
    separate q/k/v projections. A TP shard is whole groups, so each of q, k, v is read as one
    contiguous block."""

    names: Tuple[str, str, str]
    shapes: Tuple[Tuple[int, ...], ...]
    groups: int
    per_group: int
    head_dim: int

    @property
    def rows(self) -> int:
        return self.groups * (self.per_group + 2) * self.head_dim

    def read(self, checkpoint: HFCheckpoint, rows, cols):
        group_rows = (self.per_group + 2) * self.head_dim
        if rows[0] % group_rows or rows[1] % group_rows:
            raise HuggingFaceError(f"rows {rows} of linear_qkv are not whole query groups")
        first, last = rows[0] // group_rows, rows[1] // group_rows
        q_rows, d = self.per_group * self.head_dim, self.head_dim
        q = checkpoint.read(self.names[0], (first * q_rows, last * q_rows), cols)
        k = checkpoint.read(self.names[1], (first * d, last * d), cols)
        v = checkpoint.read(self.names[2], (first * d, last * d), cols)
        tail = q.shape[1:]
        count = last - first
        return torch.cat([q.reshape(count, q_rows, *tail), k.reshape(count, d, *tail),
                          v.reshape(count, d, *tail)], dim=1).reshape(-1, *tail)


# tensors only a base has (no LoRA target): megatron name in a layer -> HF name in the layer,
# the shape facts of their one dimension, and when they exist
_BASE_ONLY = (
    ("input_layernorm.weight", "input_layernorm.weight", "hidden", None),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", "hidden", None),
    ("self_attention.q_layernorm.weight", "self_attn.q_norm.weight", "head_dim", "qk_layernorm"),
    ("self_attention.k_layernorm.weight", "self_attn.k_norm.weight", "head_dim", "qk_layernorm"),
)


def _rule_source(rule, part_names, shape, padding: int):
    """The source of one megatron weight from the HF tensors of its rule (interop.RULES):
    expected shapes from the rule's shape facts; a padded vocabulary adds zero rows."""
    if rule.embedding:  # the table is [vocab, hidden]; the rule's facts describe its LoRA
        return _Rows(tuple(part_names), ((shape["unpadded_vocab"], shape["hidden"]),), padding)
    shapes = tuple((shape["unpadded_vocab"] if rows == "vocab" else shape[rows], shape[cols])
                   for rows, cols in (rule.dims[p] for p in range(len(part_names))))
    if rule.split == "qkv":
        return _QKV(tuple(part_names), shapes, shape["groups"],
                    shape["heads"] // shape["groups"], shape["head_dim"])
    return _Rows(tuple(part_names), shapes, padding if rule.megatron == "output_layer" else 0)


def weight_sources(config: dict, experiment) -> Dict[str, object]:
    """{global megatron parameter name (TP=1 model): its source in the HF files}: the weights
    of every module interop.RULES names for the family (one table for base weights and
    adapters), plus the norms and biases only a base has."""
    from .description import ModelDescription
    from .interop import RULES, applies_to_model, shape_from_description

    family = family_of(config, CONFIG_FILE)
    m = experiment.megatron_config
    shape = shape_from_description(ModelDescription.from_experiment(experiment).for_adapter())
    shape.setdefault("unpadded_vocab", shape["vocab"])
    padding = shape["vocab"] - shape["unpadded_vocab"]
    sources = {"decoder.final_layernorm.weight": _Rows(("model.norm.weight",),
                                                       ((shape["hidden"],),))}
    for rule in RULES[family.architecture]:
        if not applies_to_model(rule, shape):
            continue
        for layer in range(m["num_layers"]) if rule.per_layer else [None]:
            for expert in range(shape["experts"]) if rule.expert else [None]:
                names = [rule.hf_name(part, layer, expert) + ".weight"
                         for part in range(len(rule.hf))]
                sources[rule.megatron_name(layer, expert) + ".weight"] = \
                    _rule_source(rule, names, shape, padding)
    if not m["untie_embeddings_and_output_weights"]:  # the last stage's copy is the table
        sources["output_layer.weight"] = sources["embedding.word_embeddings.weight"]
    for layer in range(m["num_layers"]):
        prefix, hf = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        for megatron, name, size, when in _BASE_ONLY:
            if when is None or m.get(when):
                sources[prefix + megatron] = _Rows((hf + name,), ((shape[size],),))
        if m.get("add_qkv_bias"):
            attn = hf + "self_attn."
            sources[prefix + "self_attention.linear_qkv.bias"] = _QKV(
                tuple(f"{attn}{p}_proj.bias" for p in "qkv"),
                ((shape["q_rows"],), (shape["kv_rows"],), (shape["kv_rows"],)),
                shape["groups"], shape["heads"] // shape["groups"], shape["head_dim"])
        if shape.get("shared_ffn"):
            sources[prefix + "mlp.shared_experts.gate_weight"] = _Rows(
                (hf + "mlp.shared_expert_gate.weight",), ((1, shape["hidden"]),))
    return sources


def _fused_expert_tensor(checkpoint: HFCheckpoint) -> Optional[str]:
    return next((n for n in checkpoint.files
                 if re.search(r"\.experts\.(gate_up_proj|down_proj|w1|w2|w3)(\.weight)?$", n)),
                None)


def check_hf_checkpoint(path, experiment) -> None:
    """Every tensor the model of ``experiment`` needs is in the files at ``path`` with the
    shape config.json implies (headers only: nothing is read); one-line HuggingFaceError
    naming the first that is not. Run before any process group exists."""
    checkpoint = HFCheckpoint(path)
    for file in sorted(set(checkpoint.files.values())):
        checkpoint._handle(file)  # every shard the index names exists and is safetensors
    fused = _fused_expert_tensor(checkpoint)
    if fused is not None:
        raise HuggingFaceError(f"{path}: {fused} holds every expert in one tensor; this reader "
                               f"takes one tensor per expert, as the hub stores them and "
                               f"transformers' save_pretrained writes")
    for name, source in weight_sources(read_hf_config(path), experiment).items():
        _check_source_shapes(checkpoint, name, source)


def _shard_ranges(rows: int, rank: int, size: int, packed: bool) -> List[Tuple[int, int]]:
    """Row ranges of this rank's shard (parallel.shard_tensor's rule, as index ranges)."""
    if not packed:
        part = rows // size
        return [(rank * part, (rank + 1) * part)]
    half = rows // 2
    part = half // size
    return [(rank * part, (rank + 1) * part), (half + rank * part, half + (rank + 1) * part)]


def _local_plan(name: str, param, module, source, topology) -> Callable[[HFCheckpoint], torch.Tensor]:
    """A function reading this rank's shard of ``param`` from ``source``."""
    from .parallel import is_packed_gate_up

    sharded = getattr(param, "tensor_model_parallel", False)
    size = topology.tensor_parallel_size_of(param) if sharded else 1
    rank = topology.tensor_parallel_rank_of(param) if sharded else 0
    dim = getattr(param, "partition_dim", 0) if sharded else 0
    module_name = name.rsplit(".", 1)[0]
    packed = dim == 0 and is_packed_gate_up(module_name, module) and name.endswith(".weight")
    full_rows = source.rows
    expected_local = list(param.shape)
    full = list(expected_local)
    full[dim] *= size
    if full[0] != full_rows:
        raise HuggingFaceError(f"{name} has {full[0]} rows in this model, but its Hugging Face "
                               f"tensors {list(source.names)} give {full_rows}")
    if dim == 0:
        ranges = _shard_ranges(full_rows, rank, size, packed)
        return lambda checkpoint: torch.cat([source.read(checkpoint, r, None) for r in ranges])
    part = expected_local[1]
    cols = (rank * part, (rank + 1) * part)
    return lambda checkpoint: source.read(checkpoint, (0, full_rows), cols)


def _check_source_shapes(checkpoint: HFCheckpoint, name: str, source) -> None:
    for hf_name, shape in zip(source.names, source.shapes):
        if hf_name not in checkpoint:
            raise HuggingFaceError(f"{checkpoint.path}: tensor {hf_name} is missing (for "
                                   f"megatron's {name})")
        actual = checkpoint.shape(hf_name)
        if actual != list(shape):
            raise HuggingFaceError(f"{checkpoint.path}: tensor {hf_name} has shape {actual}, but "
                                   f"config.json's model needs {list(shape)}")


def _base_parameters(model):
    """(global name without LoRA's .base_layer, parameter, its module) of every base
    parameter on this rank; the tied output copy at PP > 1 included."""
    from .model import global_named_modules

    for module_name, module in global_named_modules(model):
        for param_name, param in module.named_parameters(recurse=False):
            if getattr(param, "is_lora", False):
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            yield name.replace(".base_layer.", "."), param, module


@torch.no_grad()
def load_hf_weights(model, path, experiment=None) -> None:
    """Fill every base parameter of ``model`` (built by build_gpt_model from
    ``hf_experiment(path)``, any layout, with or without LoRA wrappers) from the Hugging Face
    directory ``path``. Collective: every rank validates its own tensors' presence and shapes,
    and all ranks agree, before any parameter changes; each reads only its slices."""
    from .agreement import raise_if_any_rank_failed
    from .topology import Topology

    failure, plans = None, []
    try:
        if experiment is None:
            experiment = hf_experiment(path)
        config = read_hf_config(path)
        check_hf_checkpoint(path, experiment)
        checkpoint = HFCheckpoint(path)
        sources = weight_sources(config, experiment)
        topology = Topology.current()
        for name, param, module in _base_parameters(model):
            source = sources.get(name)
            if source is None:
                raise HuggingFaceError(f"megatron's {name} has no Hugging Face counterpart in "
                                       f"{config.get('model_type')!r} checkpoints")
            plans.append((name, param, _local_plan(name, param, module, source, topology)))
    except MegatronLoraError as error:
        failure = error
    raise_if_any_rank_failed(failure, HuggingFaceError, "checking the Hugging Face checkpoint")
    for name, param, read in plans:
        local = read(checkpoint)
        if list(local.shape) != list(param.shape):
            raise RuntimeError(f"{name}: read {list(local.shape)}, expected {list(param.shape)}")
        param.copy_(local)
        del local
    for chunk in _chunks(model):
        chunk.hf_name_or_path = str(Path(path).resolve())


def _chunks(model):
    from .model import model_chunks

    return model_chunks(model)
