"""LoRA on a whole megatron-core model: targeting, freezing, adapters, merging, the report.

Every function here takes a model (a ``GPTModel``, any module tree holding megatron parallel
linears) or a list of model chunks (pipeline parallelism), and works on every rank without
communication, except ``apply_lora``, which is collective: all ranks call it, so that a target
found on no pipeline stage is an error and the report can give global figures.

Names. Modules are named by their *global* name: the name they would have in the
unpartitioned model. Under pipeline parallelism a stage's ``decoder.layers.0`` is global layer
``layer_number - 1``; under expert parallelism a rank's ``local_experts.0`` is its first global
expert. Targets match global names, the initialisation is seeded by them and checkpoints are
keyed by them, so an adapter is the same logical adapter whatever the layout.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import VocabParallelEmbedding

from .agreement import all_gather_bytes, first_over_world, sum_over_world
from .config import DEFAULT_TARGETS, LoraConfig, name_matches
from .dispatch import SUPPORTED_LAYERS, dispatch_megatron, transformer_engine_kind, wrapper_class
from .errors import AdapterError
from .layer import LoraLayer, LoraParallelLinear
from .parallel import ParallelLayout, is_packed_gate_up
from .recompute import connect_recomputed_regions, disconnect_recomputed_regions
from .topology import Topology

ModelLike = Union[torch.nn.Module, Sequence[torch.nn.Module]]


# --- global names --------------------------------------------------------------------------


def model_chunks(model: ModelLike) -> List[torch.nn.Module]:
    """The model as a list of chunks (one per virtual pipeline stage), checked to be modules."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        if not isinstance(chunk, torch.nn.Module):
            raise TypeError(
                f"expected a torch.nn.Module or a list of model chunks, got {type(chunk).__name__}"
            )
    return chunks


def _global_child_name(parent, child_name: str, child, ancestors) -> str:
    """The child's name in the unpartitioned model (layer and expert numbers made global)."""
    if not isinstance(parent, torch.nn.ModuleList) or not child_name.isdigit():
        return child_name
    layer_number = getattr(child, "layer_number", None)
    if isinstance(layer_number, int):  # TransformerLayer: layer_number is global and 1-based
        return str(layer_number - 1)
    if ancestors and getattr(ancestors[-1], "local_experts", None) is parent:
        for ancestor in reversed(ancestors):  # the MoE layer knows its experts' global numbers
            indices = getattr(ancestor, "local_expert_indices", None)
            if indices is not None:
                return str(indices[int(child_name)])
    return child_name


def global_named_modules(model: ModelLike) -> Iterator[Tuple[str, torch.nn.Module]]:
    """(global name, module) for every module of every chunk, in order."""

    def walk(module, name, ancestors):
        yield name, module
        for child_name, child in module._modules.items():
            if child is None:
                continue
            part = _global_child_name(module, child_name, child, ancestors)
            yield from walk(child, f"{name}.{part}" if name else part, ancestors + [module])

    for chunk in model_chunks(model):
        yield from walk(chunk, "", [])


def lora_layers(model: ModelLike) -> Iterator[Tuple[str, LoraLayer]]:
    """(global name, layer) for every LoRA wrapper (LoraLayer) in the model."""
    for name, module in global_named_modules(model):
        if isinstance(module, LoraLayer):
            yield name, module


def _find_modules(model: ModelLike, wanted) -> list:
    """(global name, parent, attribute, module) of every module ``wanted(module)`` accepts,
    without looking inside those nor inside a LoRA wrapper (its base layer is not a target of
    its own)."""
    found = []
    for chunk in model_chunks(model):
        stack = [(chunk, "", [])]
        while stack:
            module, name, ancestors = stack.pop()
            for child_name, child in module._modules.items():
                if child is None:
                    continue
                part = _global_child_name(module, child_name, child, ancestors)
                child_global = f"{name}.{part}" if name else part
                if wanted(child):
                    found.append((child_global, module, child_name, child))
                elif not isinstance(child, LoraLayer):
                    stack.append((child, child_global, ancestors + [module]))
    found.sort(key=lambda item: item[0])
    return found


def adaptable_modules(model: ModelLike):
    """(global name, parent, attribute, module) of every supported layer or existing wrapper."""
    return _find_modules(model, lambda m: isinstance(m, (LoraLayer,) + SUPPORTED_LAYERS))


def transformer_engine_layers(model: ModelLike) -> List[Tuple[str, str]]:
    """(global name, class name) of every TransformerEngine linear (or fused MLP) on this rank:
    layers LoRA cannot wrap yet (dispatch.transformer_engine_kind)."""
    return [(name, transformer_engine_kind(module)) for name, _, _, module
            in _find_modules(model, lambda m: transformer_engine_kind(m) is not None)]


# --- matching ------------------------------------------------------------------------------


def name_shapes(names: Iterable[str]) -> List[str]:
    """Names with layer/expert numbers folded to '*', for error messages."""
    return sorted({re.sub(r"\.\d+(?=\.|$)", ".*", name) for name in names})


# --- the report ----------------------------------------------------------------------------


@dataclass
class LoraReport:
    """What apply_lora did. Global counts are of the logical (unpartitioned) model."""

    adapter_name: str
    adapted_modules: List[str] = field(default_factory=list)  # this rank, global names
    local_trainable: int = 0
    local_total: int = 0
    global_adapted: int = 0
    global_trainable: int = 0
    global_total: int = 0
    rank: int = 0

    @property
    def local_share(self) -> float:
        return self.local_trainable / max(1, self.local_total)

    @property
    def global_share(self) -> float:
        return self.global_trainable / max(1, self.global_total)

    def __str__(self) -> str:
        return (
            f"LoRA adapter {self.adapter_name!r}: {self.global_adapted} modules adapted; "
            f"trainable {self.global_trainable:,} of {self.global_total:,} parameters "
            f"({100 * self.global_share:.3f}%) in the whole model; rank {self.rank}: "
            f"{len(self.adapted_modules)} modules, {self.local_trainable:,} of "
            f"{self.local_total:,} local parameters ({100 * self.local_share:.3f}%)"
        )


def _logical_counts(model: ModelLike) -> Tuple[int, int]:
    """(trainable, total) logical parameters this rank is the owner of for counting.

    A TP shard is scaled up to its full tensor; only TP rank 0 of DP rank 0 counts dense
    parameters (expert ones: expert-TP rank 0 of expert-DP rank 0), so a sum over the world
    counts every logical parameter exactly once (tied embeddings: their first-stage copy).
    """
    topology = Topology.current()
    trainable = total = 0
    seen = set()
    for chunk in model_chunks(model):
        for param in chunk.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            if getattr(param, "shared", False):
                continue  # the last stage's copy of tied embeddings: counted on the first
            if not topology.owns(param):
                continue
            scale = topology.tensor_parallel_size_of(param) if getattr(
                param, "tensor_model_parallel", False
            ) else 1
            total += param.numel() * scale
            if param.requires_grad:
                trainable += param.numel() * scale
    return trainable, total


def lora_report(model: ModelLike, adapter_name: str) -> LoraReport:
    """Counts for ``adapter_name``: collective (all ranks call it) when distributed."""
    adapted_layers = [(name, layer) for name, layer in lora_layers(model)
                      if adapter_name in layer.lora_A]
    adapted = [name for name, _ in adapted_layers]
    seen, local_trainable, local_total = set(), 0, 0
    for chunk in model_chunks(model):
        for param in chunk.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                local_total += param.numel()
                local_trainable += param.numel() if param.requires_grad else 0
    trainable, total = _logical_counts(model)
    topology = Topology.current()
    # a module counts where its parameters do: expert ones on expert-TP / expert-DP rank 0
    counted_adapted = sum(topology.owns(layer.weight) for _, layer in adapted_layers)
    global_trainable, global_total, global_adapted = sum_over_world(
        [trainable, total, counted_adapted]
    )
    return LoraReport(
        adapter_name=adapter_name,
        adapted_modules=adapted,
        local_trainable=local_trainable,
        local_total=local_total,
        global_adapted=global_adapted,
        global_trainable=global_trainable,
        global_total=global_total,
        rank=dist.get_rank() if dist.is_available() and dist.is_initialized() else 0,
    )


# --- apply_lora ----------------------------------------------------------------------------


def apply_lora(
    model: ModelLike,
    config: LoraConfig,
    adapter_name: str = "default",
    *,
    verbose: bool = True,
    fused_collectives: bool = True,
) -> ModelLike:
    """Add the adapter ``adapter_name`` to every targeted layer, in place; returns ``model``.

    Targets are ``config.target_modules`` (default: linear_qkv, linear_proj, linear_fc1,
    linear_fc2) minus ``config.exclude_modules``, matched against global module names (see
    :func:`name_matches`). Every base parameter is frozen; the new adapter becomes the active
    (and only trainable) one. Calling it again with another name adds a second adapter to
    the layers it targets. Collective: call it on every rank. Raises AdapterError on every
    rank, before any change to the model, when the selection is unusable (see
    :func:`_select_layers`).
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    selected = _select_layers(model, config)
    _check_rank_fits(selected, config)
    _check_layer_types_take(model, selected, config)
    _check_name_is_free(selected, adapter_name)
    for name, parent, attribute, module in selected:
        if isinstance(module, LoraLayer):
            module.update_layer(adapter_name, config)
        else:
            wrapped = dispatch_megatron(
                module, adapter_name, config, module_name=name,
                packed_gate_up=is_packed_gate_up(name, module),
                fused_collectives=fused_collectives,
            )
            setattr(parent, attribute, wrapped)
    _tie_output_layers(model, fused_collectives)
    _freeze_base_and_activate(model, adapter_name)
    report = lora_report(model, adapter_name)
    if verbose and report.rank == 0:
        print(report, flush=True)
    for chunk in model_chunks(model):
        chunk.lora_report = report
    return model


def _tie_output_layers(model: ModelLike, fused_collectives: bool) -> None:
    """With tied word embeddings (pipeline size 1: the refusal above covers the rest), the
    output layer adds the embedding adapters' delta on the shared weight too (see
    LoraParallelLinear), so that a merged and an unmerged model give the same logits."""
    for chunk in model_chunks(model):
        embedding = getattr(getattr(chunk, "embedding", None), "word_embeddings", None)
        output = getattr(chunk, "output_layer", None)
        if not (getattr(chunk, "share_embeddings_and_output_weights", False)
                and isinstance(embedding, LoraLayer) and output is not None):
            continue
        if not isinstance(output, LoraLayer):
            output = LoraParallelLinear(output, None, module_name="output_layer",
                                        fused_collectives=fused_collectives)
            chunk.output_layer = output
        output.tie_to_embedding(embedding)


def _select_layers(model: ModelLike, config: LoraConfig) -> list:
    """The (name, parent, attribute, module) of every layer the config adapts on this rank.
    Refused on every rank: a target that matches no layer on any rank, and excludes that
    leave nothing to adapt anywhere."""
    targets = list(config.target_modules or DEFAULT_TARGETS)
    excludes = list(config.exclude_modules or [])
    candidates = adaptable_modules(model)
    match_counts = sum_over_world(
        [sum(name_matches(pattern, name) for name, *_ in candidates) for pattern in targets]
    )
    unmatched = [pattern for pattern, count in zip(targets, match_counts) if count == 0]
    _refuse_transformer_engine(model, targets, unmatched)
    if unmatched:
        raise AdapterError(
            f"LoRA target(s) {unmatched} match no supported layer on any rank. Layers that "
            f"exist: {name_shapes(name for name, *_ in candidates)} (a target is a name, a "
            f"dotted suffix such as 'mlp.linear_fc1', a glob such as "
            f"'decoder.layers.*.mlp.linear_fc1', or 're:<regex>')"
        )
    selected = [
        item for item in candidates
        if any(name_matches(p, item[0]) for p in targets)
        and not any(name_matches(p, item[0]) for p in excludes)
    ]
    if sum_over_world([len(selected)])[0] == 0:
        raise AdapterError(
            f"LoRA exclude_modules {excludes} remove every layer target_modules {targets} select: "
            f"the adapter would adapt nothing and train nothing"
        )
    return selected


TRANSFORMER_ENGINE_WAY_OUT = (
    "LoRA has no TransformerEngine wrappers yet: build the model with megatron's local spec "
    "(get_gpt_layer_local_spec, as megatron_lora.gpt.build_gpt_model does)")


def _refuse_transformer_engine(model: ModelLike, targets: List[str], unmatched: List[str]) -> None:
    """Refuse, on every rank, a model holding TransformerEngine linears: LoRA cannot adapt them,
    so broad targets would silently leave them untouched and the default targets, whose layers
    they are, would match nothing. Counted over every rank (pipeline stages hold different
    layers), each layer once."""
    mine = json.dumps(transformer_engine_layers(model)).encode()
    layers = dict(pair for payload in all_gather_bytes(mine) for pair in json.loads(payload))
    if not layers:
        return
    kinds = collections.Counter(layers.values())
    held = (f"{len(layers)} TransformerEngine layer(s): "
            + ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())))
    only_on_them = [p for p in unmatched if any(name_matches(p, name) for name in layers)]
    if only_on_them:
        raise AdapterError(f"LoRA target(s) {only_on_them} match no supported layer on any rank: "
                           f"they match the model's {held}; {TRANSFORMER_ENGINE_WAY_OUT}")
    raise AdapterError(f"the model holds {held} (e.g. {min(layers)}), which target_modules "
                       f"{targets} would leave untouched; {TRANSFORMER_ENGINE_WAY_OUT}")


def _check_rank_fits(selected: list, config: LoraConfig) -> None:
    """Refuse, on every rank, a rank above min(in_features, out_features) of a selected layer:
    such a rank adds parameters and no capacity."""
    sized = [(name, config.rank_for(name), min(layout.in_features, layout.out_features))
             for name, _, _, module in selected for layout in [_layout_of(module)]]
    too_small = [(name, rank, allowed) for name, rank, allowed in sized if rank > allowed]
    mine = None
    if too_small:
        name, rank, allowed = too_small[0]
        mine = (f"LoRA r={rank} is larger than min(in_features, out_features) of a targeted "
                f"layer ({name} allows {allowed}): such a rank adds parameters and no capacity; "
                f"give it a smaller rank with rank_pattern, e.g. "
                f"{{'{name.rsplit('.', 1)[-1]}': {allowed}}}")
    message = first_over_world(mine)  # every rank raises, not only the ones that saw it
    if message is not None:
        raise AdapterError(message)


def _layout_of(module) -> ParallelLayout:
    """A selected module's layout: a wrapper's own, or read from a layer not yet wrapped."""
    return module.layout if isinstance(module, LoraLayer) else ParallelLayout(module)


def _wrapper_type(module) -> type:
    """The LoraLayer subclass a selected module is, or will be wrapped by."""
    return type(module) if isinstance(module, LoraLayer) else wrapper_class(module)


def _placement_refusal(parent, module) -> Optional[str]:
    """Why a layer cannot be adapted where it sits (not proven exact there), or None."""
    # heavy (megatron's transformer package): only apply_lora's checks need it
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    layout = _layout_of(module)
    if isinstance(parent, MLASelfAttention) and layout.world_size > 1:
        # docs/layer_types.md, Multi-latent attention: at TP > 1 megatron's local-spec MLA gets
        # other gradients than at TP=1 (the base model too), so nothing there can be proven
        return ("multi-latent attention at tensor-parallel size "
                f"{layout.world_size} is not proven exact with LoRA (megatron's local MLA "
                "gives other base gradients there than at TP=1); use TP=1 for MLA models")
    return None


def _check_layer_types_take(model: ModelLike, selected: list, config: LoraConfig) -> None:
    """Refuse, on every rank, a config that a selected layer type is not proven exact with,
    and a layer where its placement is not."""
    tied = any(getattr(chunk, "share_embeddings_and_output_weights", False)
               for chunk in model_chunks(model))
    split_over_stages = any(not (getattr(chunk, "pre_process", True) and
                                 getattr(chunk, "post_process", True))
                            for chunk in model_chunks(model))
    tied_embeddings = [
        f"{name}: the word embeddings are tied to the output layer, whose copy of them is on "
        "the last pipeline stage; an adapter on the shared weight is proven at pipeline size 1 "
        "only (untie them, or target 'output_layer' alone)"
        for name, _, _, module in selected
        if tied and split_over_stages
        and isinstance(getattr(module, "base_layer", module), VocabParallelEmbedding)
    ]
    reasons = tied_embeddings + sorted({
        f"{name}: {reason}" for name, parent, _, module in selected
        for reason in [_wrapper_type(module).refusal(config), _placement_refusal(parent, module)]
        if reason is not None
    })
    reason = first_over_world(reasons[0] if reasons else None)  # every stage says why
    if reason is not None:
        raise AdapterError(f"LoRA refused by a targeted layer ({reason})")


def _check_name_is_free(selected: list, adapter_name: str) -> None:
    """Refuse, on every rank, a name that a selected layer already holds an adapter under."""
    clashes = [
        name for name, _, _, module in selected
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    ]
    if sum_over_world([len(clashes)])[0]:  # a stage without the clash must not go on alone
        where = f" on {clashes[:3]}{'…' if len(clashes) > 3 else ''}" if clashes else ""
        raise AdapterError(
            f"adapter {adapter_name!r} already exists{where};"
            f" choose another adapter_name or delete_adapter({adapter_name!r}) first"
        )


def _freeze_base_and_activate(model: ModelLike, adapter_name: str) -> None:
    """Freeze every base parameter, record the adapter on every chunk (also a pipeline stage
    where it adapted nothing) and make it the active, only trainable one."""
    for chunk in model_chunks(model):
        for param in chunk.parameters():
            param.requires_grad_(False)
        registered = getattr(chunk, "lora_adapter_names", [])
        chunk.lora_adapter_names = registered + [adapter_name]
    set_adapter(model, adapter_name)
    # a frozen base would cut megatron's recomputed regions off from autograd (docs/recompute.md)
    connect_recomputed_regions(model_chunks(model))


# --- adapter management ----------------------------------------------------------------------


def adapter_names(model: ModelLike) -> List[str]:
    """The adapters added to this model (on every pipeline stage, even one they skip)."""
    names: List[str] = []
    for chunk in model_chunks(model):
        names.extend(n for n in getattr(chunk, "lora_adapter_names", []) if n not in names)
    for _, layer in lora_layers(model):
        names.extend(n for n in layer.lora_A if n not in names)
    return names


def _require_known(model: ModelLike, names: List[str]) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {known}")


def set_adapter(model: ModelLike, adapter_names_: Union[str, Sequence[str]]) -> None:
    """Make these adapters active (their outputs summed) and trainable; the others neither.

    A layer that lacks one of them uses the ones it has.
    """
    names = [adapter_names_] if isinstance(adapter_names_, str) else list(adapter_names_)
    _require_known(model, names)
    for _, layer in lora_layers(model):
        layer.set_adapter([n for n in names if n in layer.lora_A])


def active_adapters(model: ModelLike) -> List[str]:
    names: List[str] = []
    for _, layer in lora_layers(model):
        names.extend(n for n in layer.active_adapters if n not in names)
    return names


def delete_adapter(model: ModelLike, adapter_name: str) -> None:
    """Remove ``adapter_name`` from every layer (it must not be merged)."""
    _require_known(model, [adapter_name])
    layers = [layer for _, layer in lora_layers(model)]
    merged = [layer.module_name for layer in layers if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(
            f"adapter {adapter_name!r} is merged into {merged[:3]}; unmerge_adapter first"
        )
    for layer in layers:
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
    for chunk in model_chunks(model):
        if adapter_name in getattr(chunk, "lora_adapter_names", []):
            chunk.lora_adapter_names = [n for n in chunk.lora_adapter_names if n != adapter_name]


@contextlib.contextmanager
def disable_adapters(model: ModelLike):
    """Inside: every LoRA layer computes the base model's output (adapters kept, unused)."""
    layers = [layer for _, layer in lora_layers(model)]
    merged = [layer.module_name for layer in layers if layer.merged_adapters]
    if merged:
        raise ValueError(
            f"disable_adapters() needs unmerged weights, but {merged[:3]} hold merged "
            f"adapters; call unmerge_adapter(model) first"
        )
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was_disabled in zip(layers, previous):
            layer.disabled = was_disabled


# --- merging ---------------------------------------------------------------------------------


def merge_adapter(model: ModelLike, adapter_names_: Optional[Sequence[str]] = None) -> None:
    """Add the adapters' deltas (default: the active ones) into the base weights, in place.

    Every rank adds its own shard's delta (B_i A or B A_i), so there is no communication; the
    base weight keeps its dtype. Merged adapters stop contributing in forward.
    """
    names = None if adapter_names_ is None else (
        [adapter_names_] if isinstance(adapter_names_, str) else list(adapter_names_)
    )
    if names is not None:
        _require_known(model, names)
    for _, layer in lora_layers(model):
        layer.merge(names)


def unmerge_adapter(model: ModelLike) -> None:
    """Subtract every merged delta again (see LoraParallelLinear.unmerge for the bound)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: ModelLike, adapter_names_: Optional[Sequence[str]] = None) -> ModelLike:
    """Merge (default: the active adapters) and put the plain megatron layers back."""
    merge_adapter(model, adapter_names_)
    for chunk in model_chunks(model):
        replacements = [
            (parent, attribute, module.base_layer)
            for parent in chunk.modules()
            for attribute, module in parent._modules.items()
            if isinstance(module, LoraLayer)
        ]
        for parent, attribute, base in replacements:
            setattr(parent, attribute, base)
        disconnect_recomputed_regions([chunk])
        for attribute in ("lora_report", "lora_adapter_names"):
            if hasattr(chunk, attribute):
                delattr(chunk, attribute)
    return model


def lora_state_dict(model: ModelLike, adapter_name: str) -> Dict[str, torch.Tensor]:
    """This rank's factors of one adapter keyed by global name (``<module>.lora_A.weight``)."""
    state = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            state[f"{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            state[f"{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
    return state
