"""Consolidated adapter checkpoints that load at any TP / PP / EP layout.

An adapter directory holds ``adapter_config.json`` (the LoraConfig, the format version, the
layout it was trained with, a description of the base model and the sha256 of the weights)
and ``adapter_model.safetensors`` (full logical factors keyed by global module name, in the
canonical layout: SwiGLU fc1's B as [gate_all; up_all]). Saving gathers over TP and PP to
global rank 0, which writes a temporary directory and swaps it in atomically. Loading reads
only JSON and safetensors (never pickle), checks every key, shape and dtype against the model
on every rank *before* touching a parameter, and then reads just this rank's slices.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .agreement import all_gather_bytes, collective_device, is_distributed, raise_if_any_rank_failed
from .atomic import write_synced
from .config import LoraConfig
from .description import ModelDescription, qkv_rows
from .errors import MegatronLoraError
from .model import (
    DEFAULT_TARGETS,
    ModelLike,
    adaptable_modules,
    adapter_names,
    apply_lora,
    lora_layers,
    model_chunks,
    name_matches,
    name_shapes,
)
from .parallel import LORA_A, LORA_B, ParallelLayout, is_packed_gate_up
from .topology import Topology
from .watchdog import end_process_if_helper_dies
from .safe_pickle import check_dist_checkpoint
from .untrusted import check_safetensors_size, loads_json, sha256_of_file

FORMAT = "megatron_lora.adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class AdapterCheckpointError(MegatronLoraError):
    """An adapter directory that cannot be saved to, read, or loaded into this model."""


# --- describing the model ------------------------------------------------------------------


def describe_base_model(model: ModelLike) -> Dict[str, object]:
    """The shape facts an adapter depends on, from the live model (megatron_lora.description)."""
    return ModelDescription.from_model(model).for_adapter()


def describe_transformer_config(config, vocab_size: Optional[int]) -> Dict[str, object]:
    """describe_base_model's facts from a TransformerConfig and the vocabulary size."""
    return ModelDescription.from_transformer_config(config, vocab_size).for_adapter()


def describe_layout(model: ModelLike) -> Dict[str, object]:
    layout = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
              "expert_model_parallel_size": 1, "expert_tensor_parallel_size": 1,
              "sequence_parallel": bool(getattr(getattr(model_chunks(model)[0], "config", None),
                                                "sequence_parallel", False))}
    topology = Topology.current()
    if topology.initialized:
        layout.update(tensor_model_parallel_size=topology.tp_size,
                      pipeline_model_parallel_size=topology.pp_size,
                      expert_model_parallel_size=topology.ep_size,
                      expert_tensor_parallel_size=topology.etp_size)
    return layout


# --- moving tensors to rank 0 without pickle ------------------------------------------------


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


# --- atomic directory writes ----------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second),
                       rename_exchange)
    if result == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # filesystem without exchange support: caller falls back
    raise OSError(ctypes.get_errno(), f"cannot swap {first} and {second}")


def write_directory_atomically(path, files: Dict[str, bytes]) -> Path:
    """Write ``files`` as the directory ``path`` so a crash leaves the old one or the new one.

    An existing ``path`` is replaced only if it holds nothing but adapter files.
    """
    def adapter_files_only(existing: Path) -> Optional[str]:
        foreign = sorted(p.name for p in existing.iterdir()
                         if p.name not in (CONFIG_NAME, WEIGHTS_NAME))
        return f"it holds files that are not an adapter's ({foreign[:5]})" if foreign else None

    def fill(staging: Path) -> None:
        for name, data in files.items():
            write_synced(staging / name, data)

    return build_directory_atomically(path, fill, adapter_files_only)


def build_directory_atomically(path, fill: Callable[[Path], None],
                               not_replaceable: Callable[[Path], Optional[str]]) -> Path:
    """Build the directory ``path`` with ``fill(staging)`` so a crash (or an error in
    ``fill``) leaves the old one or the new one.

    ``fill`` writes into a temporary sibling directory, whose files are then fsynced, and the
    directory is swapped in with one atomic exchange (two renames where the filesystem cannot
    exchange). An existing ``path`` is replaced only if ``not_replaceable(path)`` gives None;
    otherwise its reason is in the error.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise AdapterCheckpointError(f"{path} exists and is not a directory")
        reason = not_replaceable(path)
        if reason:
            raise AdapterCheckpointError(f"refusing to replace {path}: {reason}; choose an empty "
                                         f"or new directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
    try:
        fill(staging)
        for written in staging.rglob("*"):  # fsync what fill wrote, however it wrote it
            _fsync_path(written)
        _fsync_path(staging)
        if not path.exists():
            os.rename(staging, path)
        elif not _exchange(staging, path):
            previous = Path(tempfile.mkdtemp(prefix=f".{path.name}.previous-", dir=path.parent))
            os.rename(path, previous / path.name)
            os.rename(staging, path)
            shutil.rmtree(previous, ignore_errors=True)
        _fsync_path(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after an exchange: the old directory
    return path


# --- save ---------------------------------------------------------------------------------


def adapter_tensors(model: ModelLike, adapter_name: str) -> Dict[str, torch.Tensor]:
    """This rank's share of the consolidated adapter (collective over each layer's TP group)."""
    tensors, topology = {}, Topology.current()
    for name, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        weight_a, weight_b = layer.full_factors(adapter_name)
        # one rank per logical layer writes it: the layer's own TP rank 0 on the first replica
        if topology.owns(getattr(layer.base_layer, "weight", None), tp_rank=layer.layout.rank):
            tensors[f"{name}.lora_A.weight"] = weight_a
            tensors[f"{name}.lora_B.weight"] = weight_b
    return tensors


def shared_lora_config(model: ModelLike, adapter_name: str) -> dict:
    """The adapter's LoraConfig as a dict, from whichever rank holds one of its layers (a
    pipeline stage may hold none). Collective."""
    names = adapter_names(model)
    if adapter_name not in names:
        raise AdapterCheckpointError(f"unknown adapter {adapter_name!r}; this model has {names}")
    configs = [layer.lora_configs[adapter_name].to_dict() for _, layer in lora_layers(model)
               if adapter_name in layer.lora_configs]
    shared = all_gather_bytes(json.dumps(configs[0]).encode() if configs else b"")
    return next((json.loads(c) for c in shared if c), None)


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


def save_adapter(model: ModelLike, path, adapter_name: str = "default",
                 *, extra_metadata: Optional[dict] = None) -> Optional[Path]:
    """Save one adapter as a consolidated, layout-free directory. Collective: call on every
    rank; global rank 0 writes. Returns the path on rank 0, None elsewhere. An adapter
    directory already at ``path`` is replaced atomically (periodic saves rely on it); a
    directory holding other files is refused (see write_directory_atomically)."""
    lora_config = shared_lora_config(model, adapter_name)
    tensors = collect_on_rank0(adapter_tensors(model, adapter_name))
    writer = not is_distributed() or dist.get_rank() == 0
    written, failure = None, None
    if writer:
        try:
            if not tensors:
                raise AdapterCheckpointError(f"adapter {adapter_name!r} has no factors to save")
            files = adapter_directory_files(tensors, lora_config, adapter_name,
                                            describe_layout(model), describe_base_model(model),
                                            extra_metadata)
            written = write_directory_atomically(path, files)
        except Exception as error:  # re-raised below, once every rank knows
            failure = error
    raise_if_any_rank_failed(failure, AdapterCheckpointError,  # every rank, or none
                             doing=f"saving the adapter to {path}")
    return written


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
    """Read and check an adapter directory's JSON and safetensors header (no tensors)."""
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


def _validate_against_model(model, adapter: AdapterFile, adapter_name: str):
    """This rank's view of the file against the model: (problems, {file module: module here},
    file modules here that are not LoRA-wrapped under ``adapter_name`` although the model has
    that adapter, modules here wrapped under ``adapter_name`` that the file has no factors for).
    """
    problems: List[str] = []
    differing = ModelDescription.from_json(adapter.config.get("base_model", {})).differences(
        ModelDescription.from_model(model))
    if differing:
        details = ", ".join(f"{k}: adapter {a!r} vs model {b!r}" for k, a, b in differing)
        problems.append(f"the adapter was trained for another base model ({details})")
        return problems, {}, [], []

    pairs = factor_pairs(adapter.shapes, adapter.dtypes, adapter.path / WEIGHTS_NAME)
    modules = {name: module for name, _, _, module in adaptable_modules(model)}
    model_has_adapter = adapter_name in adapter_names(model)

    def wrapped(module):
        return hasattr(module, "lora_A") and adapter_name in module.lora_A

    found, not_wrapped = {}, []
    for module_name, shapes in sorted(pairs.items()):
        r = adapter.lora_config.rank_for(module_name)
        module = modules.get(module_name)
        if module is None:
            continue
        if model_has_adapter and not wrapped(module):
            not_wrapped.append(module_name)
            continue
        layout = module.layout if hasattr(module, "layout") else ParallelLayout(
            module, packed_gate_up=is_packed_gate_up(module_name, module))
        if wrapped(module) and module.lora_A[adapter_name].weight.shape[0] != r:
            problems.append(f"{module_name}: the model's adapter {adapter_name!r} has rank "
                            f"{module.lora_A[adapter_name].weight.shape[0]}, the file has rank {r}")
        for factor, suffix, actual, expected in zip((LORA_A, LORA_B), FACTOR_SUFFIXES, shapes,
                                                    layout.full_factor_shapes(r)):
            split_dim, parts = layout.split_dim, layout.split_parts
            if factor == layout.sharded_factor and actual[split_dim] % parts:
                problems.append(
                    f"{module_name + suffix}: dimension {split_dim} of shape {list(actual)} cannot "
                    f"be split evenly over tensor-parallel size {layout.world_size}"
                    + (" (gate and up halves)" if parts != layout.world_size else ""))
            elif tuple(actual) != tuple(expected):
                problems.append(f"{module_name + suffix}: shape {list(actual)} in the file, "
                                f"{list(expected)} expected by the model")
        found[module_name] = module
    # modules the saved config targets on this rank must all be in the file
    targets = adapter.lora_config.target_modules or []
    excludes = adapter.lora_config.exclude_modules or []
    for name in modules:
        targeted = any(name_matches(p, name) for p in targets) and not any(
            name_matches(p, name) for p in excludes)
        if targeted and name not in pairs and not model_has_adapter:
            problems.append(f"missing key {name + FACTOR_SUFFIXES[0]!r}: the adapter's "
                            f"target_modules select {name}, but the file has no factors for it")
    unfilled = sorted(name for name, module in modules.items()
                      if wrapped(module) and name not in pairs) if model_has_adapter else []
    return problems, found, not_wrapped, unfilled


def _agree_on_problems(path, problems: List[str], missing_here: List[str], existing: List[str],
                       not_wrapped: List[str], unfilled: List[str], adapter_name: str,
                       allow_subset: bool) -> List[str]:
    """Raise on every rank if any rank found a problem (so no rank applies anything); else
    return the model's modules under ``adapter_name`` that keep their factors (the file has
    none for them; only with ``allow_subset``).

    ``missing_here``: the file's modules this rank does not have; those missing on every rank
    are extra keys.
    """
    message = "; ".join(problems[:8]) + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else "")
    views = [json.loads(v) for v in all_gather_bytes(json.dumps(
        [message, missing_here, not_wrapped, unfilled]).encode())]
    message = next((m for m, *_ in views if m), "")
    extra = sorted(set.intersection(*(set(v[1]) for v in views)))
    not_wrapped = sorted(set().union(*(v[2] for v in views)))
    unfilled = sorted(set().union(*(v[3] for v in views)))
    if not message and extra:
        keys = [name + suffix for name in extra for suffix in FACTOR_SUFFIXES]
        message = (f"extra key(s) {keys[:4]}{' …' if len(keys) > 4 else ''}: no layer of this "
                   f"model has that name (layers that exist: {name_shapes(existing)})")
    if not message and (not_wrapped or (unfilled and not allow_subset)):
        parts = []
        if not_wrapped:
            parts.append(f"{len(not_wrapped)} module(s) in the file are not adapted by the "
                         f"model's adapter {adapter_name!r}: {_few(not_wrapped)}")
        if unfilled:
            parts.append(f"{len(unfilled)} module(s) adapted by the model's adapter "
                         f"{adapter_name!r} have no factors in the file: {_few(unfilled)}")
        message = ("the file and the model's adapter cover different modules: "
                   + "; ".join(parts)
                   + ("" if not_wrapped else "; pass allow_subset=True to load the file's modules "
                                             "and keep the others' current factors"))
    if message:
        raise AdapterCheckpointError(f"{path}: {message}")
    return unfilled


# --- load ----------------------------------------------------------------------------------


def load_adapter(model: ModelLike, path, adapter_name: Optional[str] = None,
                 *, verbose: bool = False, allow_subset: bool = False) -> str:
    """Load a saved adapter into ``model`` at its current layout; returns the adapter name.

    Collective: call on every rank. Everything is validated on every rank first; on any
    problem every rank raises AdapterCheckpointError and no parameter has changed. A new
    adapter name is added (and made active) through apply_lora, covering the file's modules;
    an existing one is overwritten in place, and then the file must cover exactly the modules
    that adapter adapts. ``allow_subset=True`` lets the file cover only some of them: those
    keep their current factors, and rank 0 logs which (a warning of the
    ``megatron_lora.checkpoint`` logger). A module in the file that the existing adapter does
    not adapt is always an error.
    """
    adapter = read_adapter(path)
    name = adapter_name or adapter.config.get("adapter_name") or "default"
    problems, found, not_wrapped, unfilled = _validate_against_model(model, adapter, name)
    in_file = {k.rsplit(".lora_", 1)[0] for k in adapter.shapes}
    existing = [module_name for module_name, *_ in adaptable_modules(model)]
    kept = _agree_on_problems(adapter.path, problems, sorted(in_file - set(existing)), existing,
                              not_wrapped, unfilled, name, allow_subset)

    if name not in adapter_names(model):
        config = replace(adapter.lora_config, target_modules=sorted(adapter.config["modules"]),
                         exclude_modules=None)
        apply_lora(model, config, name, verbose=verbose)
        for _, layer in lora_layers(model):  # keep the saved config, not the names used above
            if name in layer.lora_configs:
                layer.lora_configs[name] = adapter.lora_config
    layers = dict(lora_layers(model))
    with safe_open(adapter.path / WEIGHTS_NAME, framework="pt") as handle, torch.no_grad():
        for module_name in found:
            layer = layers[module_name]
            for factor, suffix in zip((LORA_A, LORA_B), FACTOR_SUFFIXES):
                local = layer.layout.read_slice(handle, module_name + suffix, factor)
                getattr(layer, factor)[name].weight.copy_(local)
    if kept and (not is_distributed() or dist.get_rank() == 0):
        logging.getLogger(__name__).warning(
            "%s loaded into adapter %r for %d module(s); %d module(s) keep their current factors: "
            "%s", adapter.path, name, len(in_file), len(kept), _few(kept, 8))
    return name


# --- megatron dist-checkpointing -------------------------------------------------------------


def _is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def adapter_sharded_state_dict(model: ModelLike) -> dict:
    """The LoRA entries of the model's megatron sharded state dict (every adapter, every chunk).

    The wrapper's ``sharded_state_dict`` keeps the base's keys unchanged and adds the factors
    under keys holding ``.lora_A.`` / ``.lora_B.``, so a full-model save with
    ``megatron.core.dist_checkpointing`` carries the adapters along and this filter gives the
    adapter-only view.
    """
    state = {}
    for chunk in model_chunks(model):
        state.update({k: v for k, v in chunk.sharded_state_dict().items() if _is_lora_key(k)})
    if not state:
        raise AdapterCheckpointError("the model has no LoRA adapters to checkpoint")
    return state


def save_dist_checkpoint(sharded_state_dict, directory) -> None:
    """megatron-core ``dist_checkpointing.save``, guarded: if one of its writer threads or
    processes dies, this rank ends at once with the cause on stderr instead of waiting for
    the writer forever (see :mod:`megatron_lora.watchdog`). Collective."""
    # heavy (megatron's dist-checkpointing strategies); only megatron dist-checkpoints need it
    from megatron.core import dist_checkpointing


    with end_process_if_helper_dies(f"saving the megatron dist-checkpoint {directory}"):
        dist_checkpointing.save(sharded_state_dict, str(directory))


def save_adapter_distributed(model: ModelLike, directory) -> None:
    """Adapter-only megatron dist-checkpoint (every rank writes its shards). Collective."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    save_dist_checkpoint(adapter_sharded_state_dict(model), directory)


def load_adapter_distributed(model: ModelLike, directory) -> None:
    """Load an adapter-only (or full-model) dist-checkpoint into the model's existing adapters,
    at any TP/PP layout. The checkpoint is read into fresh buffers first, so a failing load
    (missing keys, other shapes) changes no parameter. Collective."""
    # heavy (megatron's dist-checkpointing strategies); only megatron dist-checkpoints need it
    from megatron.core import dist_checkpointing

    state = adapter_sharded_state_dict(model)
    parameters = {key: item.data for key, item in state.items()}
    for item in state.values():  # read into new buffers, not into the parameters
        item.data = torch.empty_like(item.data)
    check_dist_checkpoint(directory)  # its pickles hold checkpoint data only, or it is refused
    try:
        loaded = dist_checkpointing.load(state, str(directory))
    except Exception as error:  # megatron raises several types (CheckpointingException, …)
        raise AdapterCheckpointError(f"cannot load the adapter from {directory}: {error}") from None
    missing = sorted(set(parameters) - set(loaded))
    if missing:
        raise AdapterCheckpointError(f"{directory} lacks adapter keys {missing[:4]}")
    with torch.no_grad():
        for key, parameter in parameters.items():
            parameter.copy_(loaded[key])
