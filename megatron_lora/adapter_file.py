"""The adapter file format, read and checked offline: no torch.distributed, no megatron-core.

An adapter directory holds ``adapter_config.json`` (the LoraConfig, the format version, the
layout it was trained with, a description of the base model and the sha256 of the weights)
and ``adapter_model.safetensors`` (full logical factors keyed by global module name, in the
canonical layout: SwiGLU fc1's B as [gate_all; up_all]). Reading takes only JSON and the
safetensors header (never pickle) and checks that the JSON describes the tensors; writing
builds both files' bytes and swaps the directory in through megatron_lora.atomic. Loading into
a model, at any layout, is megatron_lora.checkpoint's.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .atomic import OutputPathError, build_directory_atomically, write_synced
from .config import DEFAULT_TARGETS, LoraConfig
from .description import ModelDescription, qkv_rows
from .errors import MegatronLoraError
from .finite import refuse_non_finite_file
from .untrusted import check_safetensors_size, loads_json, sha256_of_file

FORMAT = "megatron_lora.adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class AdapterCheckpointError(MegatronLoraError):
    """An adapter directory that cannot be saved to, read, or loaded into this model."""

# --- describing a model offline ------------------------------------------------------------


def describe_transformer_config(config, vocab_size: Optional[int]) -> Dict[str, object]:
    """describe_base_model's facts from a TransformerConfig and the vocabulary size."""
    return ModelDescription.from_transformer_config(config, vocab_size).for_adapter()

# --- writing an adapter directory ----------------------------------------------------------


def write_directory_atomically(path, files: Dict[str, bytes]) -> Path:
    """Write ``files`` as the directory ``path`` so a crash leaves the old one or the new one
    (megatron_lora.atomic.build_directory_atomically; its refusals as AdapterCheckpointError).

    An existing ``path`` is replaced only if it holds nothing but adapter files.
    """
    def adapter_files_only(existing: Path) -> Optional[str]:
        foreign = sorted(p.name for p in existing.iterdir()
                         if p.name not in (CONFIG_NAME, WEIGHTS_NAME))
        return f"it holds files that are not an adapter's ({foreign[:5]})" if foreign else None

    def fill(staging: Path) -> None:
        for name, data in files.items():
            write_synced(staging / name, data)

    try:
        return build_directory_atomically(path, fill, adapter_files_only)
    except OutputPathError as error:
        raise AdapterCheckpointError(str(error)) from None

def adapter_directory_files(tensors: Dict[str, torch.Tensor], lora_config: dict, adapter_name: str,
                            trained_layout: dict, base_model: dict,
                            extra_metadata: Optional[dict] = None) -> Dict[str, bytes]:
    """adapter_config.json and adapter_model.safetensors of a consolidated adapter."""
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in sorted(tensors.items())}
    weights = safetensors_bytes(tensors, metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter_name": adapter_name,
        "lora_config": lora_config,
        "trained_layout": trained_layout,
        "base_model": base_model,
        "modules": sorted({k[: -len(FACTOR_SUFFIXES[0])] for k in tensors
                           if k.endswith(FACTOR_SUFFIXES[0])}),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        **({"metadata": extra_metadata} if extra_metadata else {}),
    }
    return {WEIGHTS_NAME: weights,
            CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}

# --- read and validate ---------------------------------------------------------------------


@dataclass
class AdapterFile:
    path: Path
    config: dict
    lora_config: LoraConfig
    shapes: Dict[str, Tuple[int, ...]]
    dtypes: Dict[str, str]


def read_adapter_json(path: Path, what: str):
    """(config dict, config path, weights path) of a directory that must hold both files."""
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise AdapterCheckpointError(f"{path} is not {what} (it does not exist or is not a "
                                     f"directory)")
    for required in (config_path, weights_path):
        if not required.is_file():
            raise AdapterCheckpointError(f"{path} is not {what}: {required.name} is missing")
    try:
        config = loads_json(config_path.read_text(), config_path, AdapterCheckpointError)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterCheckpointError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise AdapterCheckpointError(f"{config_path} does not hold a JSON object")
    return config, config_path, weights_path


def read_adapter(path) -> AdapterFile:
    """Read and check an adapter directory's JSON, its safetensors header and that every factor
    is finite (tensors are read one at a time for that, none is kept)."""
    path = Path(path)
    config, config_path, weights_path = read_adapter_json(path, "an adapter directory")
    if config.get("format") != FORMAT:
        raise AdapterCheckpointError(f"{config_path} is not a megatron_lora adapter config "
                                     f"(expected \"format\": \"{FORMAT}\")")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterCheckpointError(
            f"{config_path}: format_version {version!r} is not supported; this megatron_lora "
            f"reads format_version {FORMAT_VERSION}")
    check_safetensors_size(weights_path, AdapterCheckpointError)  # before hashing it
    digest = sha256_of_file(weights_path)
    if digest != config.get("weights_sha256"):
        raise AdapterCheckpointError(
            f"{weights_path} is truncated, corrupt or from another save: its sha256 {digest[:12]}… "
            f"does not match adapter_config.json's {str(config.get('weights_sha256'))[:12]}…")
    try:
        lora_config = LoraConfig(**config["lora_config"])
    except (TypeError, ValueError, KeyError) as error:
        raise AdapterCheckpointError(f"{config_path}: invalid lora_config: {error}") from None
    try:
        with safe_open(weights_path, framework="pt") as handle:
            keys = list(handle.keys())
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: str(handle.get_slice(k).get_dtype()) for k in keys}
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise AdapterCheckpointError(f"{weights_path} cannot be read as safetensors: {error}") \
            from None
    check_config_against_tensors(config, lora_config, factor_pairs(shapes, dtypes, weights_path),
                                 config_path)
    refuse_non_finite_file(weights_path, AdapterCheckpointError)  # before any parameter is touched
    return AdapterFile(path, config, lora_config, shapes, dtypes)


# --- the tensors are the truth: adapter_config.json must describe them -----------------------

_LAYER_INDEX = re.compile(r"decoder\.layers\.(\d+)\.")
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_HIDDEN_IN = ("linear_qkv", "linear_fc1", "output_layer")  # A: [r, hidden_size]
_HIDDEN_OUT = ("linear_proj", "linear_fc2")  # B: [hidden_size, r]


def _few(names, count: int = 3) -> str:
    """A few names, then how many more: for one-line messages."""
    names = sorted(names)
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(names[:count]) + more


def factor_pairs(shapes: Dict[str, Tuple[int, ...]], dtypes: Dict[str, str],
                 weights_path: Path) -> Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """{module: (A shape, B shape)}: every key a 2-D floating-point factor with its partner
    of the same rank, else AdapterCheckpointError naming the key."""
    by_module: Dict[str, Dict[str, Tuple[int, ...]]] = {}
    for key, shape in sorted(shapes.items()):
        suffix = next((s for s in FACTOR_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise AdapterCheckpointError(f"{weights_path}: unexpected key {key!r}: adapter keys end "
                                         f"in .lora_A.weight or .lora_B.weight")
        if dtypes[key] not in _FLOAT_DTYPES:
            raise AdapterCheckpointError(f"{weights_path}: {key}: dtype {dtypes[key]} is not a "
                                         f"floating-point factor dtype ({', '.join(_FLOAT_DTYPES)})")
        if len(shape) != 2:
            raise AdapterCheckpointError(f"{weights_path}: {key} has shape {list(shape)}; a factor "
                                         f"is a matrix")
        by_module.setdefault(key[: -len(suffix)], {})[suffix] = shape
    pairs = {}
    for module, factors in by_module.items():
        for suffix in FACTOR_SUFFIXES:
            if suffix not in factors:
                raise AdapterCheckpointError(f"{weights_path}: missing key {module + suffix!r} "
                                             f"(its partner factor is in the file)")
        shape_a, shape_b = factors[FACTOR_SUFFIXES[0]], factors[FACTOR_SUFFIXES[1]]
        if shape_a[0] != shape_b[1]:
            raise AdapterCheckpointError(
                f"{weights_path}: {module}: lora_A is {list(shape_a)} and lora_B is "
                f"{list(shape_b)}; A's rows and B's columns are the rank and must be equal")
        pairs[module] = (shape_a, shape_b)
    return pairs


def _base_value(base: dict, field: str, config_path: Path, kind=int):
    value = base.get(field)
    if value is None:
        return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise AdapterCheckpointError(f"{config_path}: base_model.{field} is {value!r}; expected a "
                                     f"positive integer")
    if kind is bool and not isinstance(value, bool):
        raise AdapterCheckpointError(f"{config_path}: base_model.{field} is {value!r}; expected "
                                     f"true or false")
    return value


def _layer_agnostic(lora: LoraConfig) -> bool:
    """Targets that select the same modules in every layer (then each layer is in the file)."""

    targets = lora.target_modules or list(DEFAULT_TARGETS)
    return lora.exclude_modules is None and not any(
        t.startswith("re:") or any(c in t for c in "*?[") or "layers" in t for t in targets)


def check_config_against_tensors(config: dict, lora: LoraConfig, pairs, config_path: Path) -> None:
    """adapter_config.json's rank, module list and base-model description against the
    safetensors header (``pairs`` from :func:`factor_pairs`; the weights' sha256 does not
    cover the JSON, so it is checked here): AdapterCheckpointError naming the file, the field
    and both values."""
    _check_rank_and_modules(config, lora, pairs, config_path)
    base = _declared_base_sizes(config, config_path)
    for module, shapes in sorted(pairs.items()):
        _check_shapes_against_base(module, shapes, base, config_path)
    _check_layer_count(base["num_layers"], lora, pairs, config_path)


def _disagreement(config_path, field, claimed, actual, key, shape) -> AdapterCheckpointError:
    return AdapterCheckpointError(f"{config_path}: {field} is {claimed!r}, but the tensors say "
                                  f"{actual!r} ({key} has shape {list(shape)})")


def _check_rank_and_modules(config: dict, lora: LoraConfig, pairs, config_path: Path) -> None:
    for module, (shape_a, _) in sorted(pairs.items()):
        rank = lora.rank_for(module)
        if shape_a[0] != rank:
            field = "lora_config.r" if rank == lora.r else "lora_config.rank_pattern"
            raise _disagreement(config_path, field, rank, shape_a[0],
                                module + FACTOR_SUFFIXES[0], shape_a)
    listed = config.get("modules")
    if not isinstance(listed, list) or not all(isinstance(m, str) for m in listed):
        raise AdapterCheckpointError(f"{config_path}: modules is {str(listed)[:60]!r}; expected "
                                     f"the list of adapted module names")
    if set(listed) != set(pairs):
        unlisted, absent = set(pairs) - set(listed), set(listed) - set(pairs)
        raise AdapterCheckpointError(
            f"{config_path}: modules does not match the tensors: "
            + "; ".join(part for part in (
                f"listed without tensors: {_few(absent)}" if absent else "",
                f"tensors not listed: {_few(unlisted)}" if unlisted else "") if part))


def _declared_base_sizes(config: dict, config_path: Path) -> dict:
    """The base-model sizes the file declares (None where it declares none), each type-checked;
    the query groups default to the heads and the head size to hidden / heads, as in megatron."""
    base = config.get("base_model", {})
    if not isinstance(base, dict):
        raise AdapterCheckpointError(f"{config_path}: base_model is {str(base)[:60]!r}; expected "
                                     f"an object of base-model sizes")
    sizes = {name: _base_value(base, name, config_path, bool if name == "gated_linear_unit" else int)
             for name in ("hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                          "ffn_hidden_size", "gated_linear_unit", "vocab_size", "num_layers")}
    heads, hidden = sizes["num_attention_heads"], sizes["hidden_size"]
    sizes["num_query_groups"] = sizes["num_query_groups"] or heads
    if heads and sizes["num_query_groups"] and heads % sizes["num_query_groups"]:
        raise AdapterCheckpointError(
            f"{config_path}: base_model.num_attention_heads {heads} is not a multiple of "
            f"base_model.num_query_groups {sizes['num_query_groups']}; query groups must divide "
            f"the heads")
    if sizes["kv_channels"] is None and heads and hidden:
        sizes["kv_channels"] = hidden // heads if hidden % heads == 0 else None
    return sizes


def _check_shapes_against_base(module: str, shapes, base: dict, config_path: Path) -> None:
    """One module's factor shapes against the declared base sizes it depends on."""
    (shape_a, shape_b), leaf = shapes, module.rsplit(".", 1)[-1]
    key_a, key_b = module + FACTOR_SUFFIXES[0], module + FACTOR_SUFFIXES[1]
    hidden, heads, groups = base["hidden_size"], base["num_attention_heads"], base["num_query_groups"]
    head_dim, ffn, vocab = base["kv_channels"], base["ffn_hidden_size"], base["vocab_size"]
    if hidden and leaf in _HIDDEN_IN and shape_a[1] != hidden:
        raise _disagreement(config_path, "base_model.hidden_size", hidden, shape_a[1], key_a, shape_a)
    if hidden and leaf in _HIDDEN_OUT and shape_b[0] != hidden:
        raise _disagreement(config_path, "base_model.hidden_size", hidden, shape_b[0], key_b, shape_b)
    if leaf == "linear_qkv" and heads and head_dim \
            and shape_b[0] != qkv_rows(heads, groups, head_dim):
        raise AdapterCheckpointError(
            f"{config_path}: base_model heads ({heads} attention heads, {groups} query groups, "
            f"{head_dim} channels each) give {qkv_rows(heads, groups, head_dim)} qkv rows, but "
            f"{key_b} has shape {list(shape_b)}")
    if leaf == "linear_proj" and heads and head_dim and shape_a[1] != heads * head_dim:
        raise _disagreement(config_path, "base_model.num_attention_heads × kv_channels",
                            heads * head_dim, shape_a[1], key_a, shape_a)
    if re.fullmatch(r"decoder\.layers\.\d+\.mlp\.linear_fc[12]", module) and ffn:
        if leaf == "linear_fc2" and shape_a[1] != ffn:
            raise _disagreement(config_path, "base_model.ffn_hidden_size", ffn, shape_a[1], key_a,
                                shape_a)
        halves = 2 if base["gated_linear_unit"] else 1  # SwiGLU's fc1 B: gate and up, 2 × ffn rows
        if leaf == "linear_fc1" and shape_b[0] != ffn * halves:
            raise _disagreement(config_path, "base_model.ffn_hidden_size", ffn,
                                shape_b[0] / halves if shape_b[0] % halves else shape_b[0] // halves,
                                key_b, shape_b)
    if module == "output_layer" and vocab and shape_b[0] != vocab:
        raise _disagreement(config_path, "base_model.vocab_size", vocab, shape_b[0], key_b, shape_b)


def _check_layer_count(num_layers, lora: LoraConfig, pairs, config_path: Path) -> None:
    layers = {int(m.group(1)) for m in map(_LAYER_INDEX.match, pairs) if m}
    if not (num_layers and layers):
        return
    if max(layers) >= num_layers:
        raise AdapterCheckpointError(
            f"{config_path}: base_model.num_layers is {num_layers}, but the tensors hold "
            f"layer {max(layers)} (layers 0-{max(layers)})")
    if _layer_agnostic(lora) and len(layers) != num_layers:
        raise AdapterCheckpointError(
            f"{config_path}: base_model.num_layers is {num_layers}, but the tensors hold "
            f"{len(layers)} layers, and target_modules {lora.target_modules} select modules "
            f"in every layer")
