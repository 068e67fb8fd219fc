"""Saving and loading consolidated adapters across ranks, at any TP / PP / EP layout.

The file format (adapter_config.json + adapter_model.safetensors) and its offline checks are
megatron_lora.adapter_file's. Saving gathers over TP and PP to global rank 0
(megatron_lora.gather), which writes a temporary directory and swaps it in atomically. Loading
checks every key, shape and dtype against the model on every rank *before* touching a
parameter, and then reads just this rank's slices. Adapters inside megatron dist-checkpoints:
megatron_lora.dist_checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open

from .adapter_file import (  # noqa: F401  (the format's names, also importable from here)
    CONFIG_NAME,
    FACTOR_SUFFIXES,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    AdapterCheckpointError,
    AdapterFile,
    _few,
    adapter_directory_files,
    check_config_against_tensors,
    describe_transformer_config,
    factor_pairs,
    read_adapter,
    read_adapter_json,
    write_directory_atomically,
)
from .agreement import all_gather_bytes, is_distributed, raise_if_any_rank_failed
from .description import ModelDescription
from .dist_checkpoint import (  # noqa: F401  (importable from here, as the README shows)
    adapter_sharded_state_dict,
    load_adapter_distributed,
    save_adapter_distributed,
    save_dist_checkpoint,
)
from .gather import collect_on_rank0
from .model import (
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


# --- describing the model ------------------------------------------------------------------


def describe_base_model(model: ModelLike) -> Dict[str, object]:
    """The shape facts an adapter depends on, from the live model (megatron_lora.description)."""
    return ModelDescription.from_model(model).for_adapter()

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

# --- checked against the model, agreed across ranks --------------------------------------------


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
