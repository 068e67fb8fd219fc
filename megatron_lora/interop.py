"""Hugging Face PEFT export and import for GPT / Llama-shaped megatron-core models.

Megatron fuses what Llama keeps apart, so the adapter is re-laid out on the way (docs/design.md,
Hugging Face PEFT re-layout):

| megatron (global name)              | transformers Llama                       | factors            |
|-------------------------------------|------------------------------------------|--------------------|
| decoder.layers.i.self_attention.linear_qkv | model.layers.i.self_attn.{q,k,v}_proj | A copied to each; B de-interleaved per query group [q heads; k; v] |
| decoder.layers.i.self_attention.linear_proj | model.layers.i.self_attn.o_proj | as is |
| decoder.layers.i.mlp.linear_fc1     | model.layers.i.mlp.{gate,up}_proj         | A copied; B split [gate_all; up_all] |
| decoder.layers.i.mlp.linear_fc2     | model.layers.i.mlp.down_proj              | as is |
| output_layer                        | lm_head                                   | as is |

Export works from any TP/PP layout (the consolidated adapter is gathered first). Import takes
a PEFT adapter whose fused partners share A (as exported here) at the same rank, bit for bit;
partners with different A's become one factor of rank r·k (A's stacked, B's block-placed and
rescaled), which is still exact up to rounding. Base-model weights can be converted the same
way with :func:`hf_llama_state_dict` (used by the tests against real transformers + peft).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterCheckpointError,
    adapter_directory_files,
    adapter_tensors,
    collect_on_rank0,
    describe_base_model,
    describe_layout,
    load_adapter,
    read_adapter_json,
    shared_lora_config,
    write_directory_atomically,
)
from .agreement import is_distributed
from .config import LoraConfig
from .errors import MegatronLoraError
from .model import ModelLike, model_chunks
from .parallel import split_gate_up

PEFT_PREFIX = "base_model.model."
_LAYER = r"decoder\.layers\.(\d+)\."
_DIRECT = {  # megatron module -> HF module, factors unchanged
    "self_attention.linear_proj": "self_attn.o_proj",
    "mlp.linear_fc2": "mlp.down_proj",
}


class InteropError(MegatronLoraError):
    """The model or the adapter has a shape that the Llama mapping cannot express."""


def _model_shape(model: ModelLike) -> Dict[str, int]:
    config = getattr(model_chunks(model)[0], "config", None)
    if config is None:
        raise InteropError("PEFT interop needs a megatron GPTModel (its .config gives the heads)")
    heads, groups = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
    head_dim = config.kv_channels or config.hidden_size // heads
    return {"heads": heads, "groups": groups, "head_dim": head_dim, "hidden": config.hidden_size,
            "ffn": config.ffn_hidden_size, "glu": bool(config.gated_linear_unit)}


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


def megatron_to_hf_factors(tensors: Dict[str, torch.Tensor], shape) -> Dict[str, torch.Tensor]:
    """Canonical megatron adapter tensors → HF Llama module names (without the PEFT prefix)."""
    out: Dict[str, torch.Tensor] = {}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    for module in modules:
        weight_a, weight_b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
        if module == "output_layer":
            targets = {"lm_head": weight_b}
        else:
            match = re.fullmatch(_LAYER + r"(.+)", module)
            if match is None:
                raise InteropError(f"{module} has no Llama counterpart (supported: linear_qkv, "
                                   f"linear_proj, linear_fc1, linear_fc2, output_layer)")
            layer, rest = match.group(1), match.group(2)
            prefix = f"model.layers.{layer}."
            if rest == "self_attention.linear_qkv":
                _check_qkv_rows(module, weight_b.shape[0], shape)
                q, k, v = _split_qkv_rows(weight_b, shape)
                targets = {prefix + "self_attn.q_proj": q, prefix + "self_attn.k_proj": k,
                           prefix + "self_attn.v_proj": v}
            elif rest == "mlp.linear_fc1":
                if not shape["glu"]:
                    targets = {prefix + "mlp.up_proj": weight_b}
                else:
                    gate, up = split_gate_up(weight_b)
                    targets = {prefix + "mlp.gate_proj": gate, prefix + "mlp.up_proj": up}
            elif rest in _DIRECT:
                targets = {prefix + _DIRECT[rest]: weight_b}
            else:
                raise InteropError(f"{module} has no Llama counterpart")
        for name, b in targets.items():
            out[f"{name}.lora_A.weight"] = weight_a.clone()
            out[f"{name}.lora_B.weight"] = b.contiguous().clone()
    return out


def _peft_target_modules(hf_modules: List[str], num_layers: int) -> List[str]:
    """Leaf names when every layer has them (PEFT's usual form), else exact module names."""
    leaves = Counter(name.rsplit(".", 1)[-1] for name in hf_modules)
    complete = all(count == (1 if leaf == "lm_head" else num_layers) for leaf, count in leaves.items())
    return sorted(leaves) if complete else sorted(hf_modules)


def shape_from_description(base_model: Dict[str, object]) -> Dict[str, int]:
    """The head layout from an adapter_config.json's base_model description."""
    try:
        heads = int(base_model["num_attention_heads"])
        groups = int(base_model.get("num_query_groups") or heads)
        hidden = int(base_model["hidden_size"])
        head_dim = int(base_model.get("kv_channels") or 0)
        shape = {"heads": heads, "groups": groups, "head_dim": head_dim, "hidden": hidden,
                 "ffn": int(base_model["ffn_hidden_size"]),
                 "glu": bool(base_model.get("gated_linear_unit", False))}
    except (KeyError, TypeError, ValueError) as error:
        raise InteropError(f"the base-model description lacks {error}; it is needed "
                           f"to split linear_qkv into q/k/v") from None
    if heads <= 0 or groups <= 0 or heads % groups:
        raise InteropError(f"num_attention_heads {heads} is not a positive multiple of "
                           f"num_query_groups {groups}; the heads cannot be split into q/k/v")
    if not head_dim:
        if hidden % heads:
            raise InteropError(f"hidden_size {hidden} is not a multiple of num_attention_heads "
                               f"{heads} (and kv_channels is not given)")
        shape["head_dim"] = hidden // heads
    for field in ("num_layers", "vocab_size"):
        if base_model.get(field) is not None:
            shape[field] = int(base_model[field])
    return shape


def _check_qkv_rows(module: str, rows: int, shape) -> None:
    """linear_qkv's B rows must be whole query groups of this head layout."""
    expected = (shape["heads"] + 2 * shape["groups"]) * shape["head_dim"]
    if rows != expected:
        raise InteropError(
            f"{module}.lora_B.weight has {rows} rows, but {shape['heads']} attention heads in "
            f"{shape['groups']} query groups of {shape['head_dim']} channels need {expected}; "
            f"the heads of the base-model description do not fit")


def peft_adapter_files(tensors: Dict[str, torch.Tensor], lora: LoraConfig, shape,
                       num_layers: int, provenance: Optional[dict] = None) -> Dict[str, bytes]:
    """adapter_config.json and adapter_model.safetensors, as PEFT writes them, from the
    canonical megatron tensors."""
    hf = megatron_to_hf_factors({k: v.detach().cpu() for k, v in tensors.items()}, shape)
    hf_modules = sorted({k.rsplit(".lora_", 1)[0] for k in hf})
    ranks = {m: hf[f"{m}.lora_A.weight"].shape[0] for m in hf_modules}
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    differing = {m: r for m, r in ranks.items() if r != default_rank}

    def same_scaling_alpha(rank):  # keeps PEFT's per-module scaling equal to megatron's
        return lora.scaling * (rank ** 0.5 if lora.use_rslora else rank)

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": default_rank,
        "lora_alpha": same_scaling_alpha(default_rank),
        "lora_dropout": lora.lora_dropout,
        "use_rslora": lora.use_rslora,
        "target_modules": _peft_target_modules(hf_modules, num_layers),
        "rank_pattern": differing,
        "alpha_pattern": {m: same_scaling_alpha(r) for m, r in differing.items()},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        **({"megatron_lora": provenance} if provenance else {}),
    }
    weights = safetensors_bytes({PEFT_PREFIX + k: v.contiguous() for k, v in sorted(hf.items())},
                                metadata={"format": "pt"})
    return {WEIGHTS_NAME: weights,
            CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}


def export_peft(model: ModelLike, path, adapter_name: str = "default") -> Optional[Path]:
    """Write ``adapter_name`` as a Hugging Face PEFT LoRA adapter for the equivalent
    transformers Llama model (any TP/PP layout; collective; rank 0 writes). Like save_adapter,
    it replaces an adapter directory already at ``path`` atomically and refuses one holding
    other files (a PEFT model card, say); the CLI asks for --overwrite first."""
    shape = _model_shape(model)
    lora = LoraConfig(**shared_lora_config(model, adapter_name))
    tensors = collect_on_rank0(adapter_tensors(model, adapter_name))
    if is_distributed() and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()
        return None
    try:
        files = peft_adapter_files(
            tensors, lora, shape, describe_base_model(model)["num_layers"],
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
        raise AdapterCheckpointError(f"{config_path}: peft_type {config.get('peft_type')!r} is not "
                                     f"'LORA'")
    try:
        tensors = load_file(weights_path)
    except Exception as error:  # safetensors' own error types
        raise AdapterCheckpointError(f"{weights_path} cannot be read as safetensors: {error}") \
            from None
    check_peft_config_against_tensors(config, peft_modules(tensors, weights_path), config_path)
    return config, tensors


def peft_modules(tensors: Dict[str, torch.Tensor], weights_path) -> Dict[str, Dict[str, torch.Tensor]]:
    """{HF module name: {"A": tensor, "B": tensor}} of PEFT tensors; every key a LoRA factor
    with its partner, else an error naming the key."""
    factors: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, tensor in sorted(tensors.items()):
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if match is None:
            raise AdapterCheckpointError(f"{weights_path}: unexpected PEFT key {key!r}; LoRA keys "
                                         f"end in .lora_A.weight or .lora_B.weight")
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise AdapterCheckpointError(f"{weights_path}: {key} is a {tensor.dim()}-D "
                                         f"{tensor.dtype} tensor; a factor is a float matrix")
        factors.setdefault(match.group(1), {})[match.group(2)] = tensor
    for module, pair in factors.items():
        for side in "AB":
            if side not in pair:
                raise AdapterCheckpointError(
                    f"{weights_path}: missing key {PEFT_PREFIX + module}.lora_{side}.weight "
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
        try:
            return re.fullmatch(targets, module) is not None
        except re.error:
            return False
    return any(module == t or module.endswith("." + t) for t in targets)


def check_peft_config_against_tensors(config: dict, factors, config_path) -> None:
    """A PEFT adapter_config.json's r, rank_pattern, lora_alpha and target_modules against its
    tensors: AdapterCheckpointError naming the file, the field and both values."""
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterCheckpointError(f"{config_path}: r is {r!r}; expected a positive integer")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise AdapterCheckpointError(f"{config_path}: lora_alpha is {alpha!r}; expected a number "
                                     f"> 0")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise AdapterCheckpointError(f"{config_path}: {field} is {config.get(field)!r}; "
                                         f"expected an object of module name: value")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets
                                         and all(isinstance(t, str) for t in targets))):
        raise AdapterCheckpointError(f"{config_path}: target_modules is {targets!r}; expected "
                                     f"a list of module names or a regex string")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as error:
            raise AdapterCheckpointError(f"{config_path}: target_modules {targets!r} is not a "
                                         f"valid regular expression ({error})") from None
    for module, pair in sorted(factors.items()):
        rank = _pattern_value(config.get("rank_pattern"), module, None)
        field, rank = ("r", r) if rank is None else ("rank_pattern", rank)
        for side, actual in (("A", pair["A"].shape[0]), ("B", pair["B"].shape[1])):
            if actual != rank:
                raise AdapterCheckpointError(
                    f"{config_path}: {field} gives {module} rank {rank}, but "
                    f"{PEFT_PREFIX}{module}.lora_{side}.weight has shape {list(pair[side].shape)}")
        if not _targeted(targets, module):
            raise AdapterCheckpointError(f"{config_path}: target_modules {targets} does not select "
                                         f"{module}, which has factors in the file")


_HF_HIDDEN_IN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
_HF_BLOCKS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
              "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def check_peft_against_model(config: dict, factors, shape, path, described_by: str) -> None:
    """The PEFT tensors against the megatron model's description (``shape`` from
    shape_from_description or the model): InteropError naming what differs, and a missing
    tensor of a targeted module by its key."""
    heads_rows = shape["heads"] * shape["head_dim"]
    group_rows = shape["groups"] * shape["head_dim"]
    hidden = shape.get("hidden")
    expected_rows = {"q_proj": heads_rows, "k_proj": group_rows, "v_proj": group_rows,
                     "gate_proj": shape["ffn"], "up_proj": shape["ffn"] if shape["glu"] else None,
                     "o_proj": hidden, "down_proj": hidden, "lm_head": shape.get("vocab_size")}
    expected_cols = {"o_proj": heads_rows, "down_proj": shape["ffn"],
                     **{leaf: hidden for leaf in _HF_HIDDEN_IN}}
    if not shape["glu"]:
        expected_rows["up_proj"] = shape["ffn"]

    def differs(what, expected, module, side, tensor):
        return InteropError(
            f"{path} does not fit the model described by {described_by}: {what} is {expected} "
            f"there, but {PEFT_PREFIX}{module}.lora_{side}.weight has shape {list(tensor.shape)}")

    layers = set()
    for module, pair in sorted(factors.items()):
        leaf = module.rsplit(".", 1)[-1]
        match = re.match(r"model\.layers\.(\d+)\.", module)
        if match:
            layers.add(int(match.group(1)))
        rows, cols = expected_rows.get(leaf), expected_cols.get(leaf)
        if rows is not None and pair["B"].shape[0] != rows:
            field = {"q_proj": "heads × head_dim", "k_proj": "query groups × head_dim",
                     "v_proj": "query groups × head_dim", "gate_proj": "ffn_hidden_size",
                     "up_proj": "ffn_hidden_size", "lm_head": "vocab_size"}.get(leaf, "hidden_size")
            raise differs(field, rows, module, "B", pair["B"])
        if cols is not None and pair["A"].shape[1] != cols:
            field = {"o_proj": "heads × head_dim", "down_proj": "ffn_hidden_size"}.get(
                leaf, "hidden_size")
            raise differs(field, cols, module, "A", pair["A"])
    num_layers = shape.get("num_layers")
    if num_layers and layers and max(layers) >= num_layers:
        raise InteropError(f"{path} does not fit the model described by {described_by}: "
                           f"num_layers is {num_layers} there, but the adapter has layer "
                           f"{max(layers)}")
    targets = config.get("target_modules")
    if num_layers and isinstance(targets, list) and config.get("layers_to_transform") is None:
        for leaf in sorted(set(targets) & set(_HF_BLOCKS)):
            for layer in range(num_layers):
                module = f"model.layers.{layer}.{_HF_BLOCKS[leaf]}.{leaf}"
                if module not in factors:
                    raise InteropError(f"{path}: missing key {PEFT_PREFIX}{module}.lora_A.weight: "
                                       f"target_modules select {leaf} in each of the "
                                       f"{num_layers} layers")


def _peft_scaling(config, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    return alpha / (rank ** 0.5) if config.get("use_rslora") else alpha / rank


def _fuse(parts, config, target_rank: int, target_scaling: float):
    """HF modules sharing an input → one (A, [B per module]) at megatron's rank and scaling.

    A shared A at that rank and scaling (what export_peft writes) is kept as is: bit-exact.
    Otherwise the A's are stacked (zero-padded up to the rank) and each B is placed in its own
    column block, rescaled so that every module's delta is unchanged.
    """
    first_a = parts[0][1]
    if all(torch.equal(a, first_a) and a.shape[0] == target_rank
           and _peft_scaling(config, name, a.shape[0]) == target_scaling for name, a, _ in parts):
        return first_a, [b for _, _, b in parts]
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
    """PEFT tensors (prefix stripped) → (canonical megatron tensors, rank, LoraConfig kwargs)."""
    factors = peft_modules(tensors, "the PEFT adapter")
    groups: Dict[str, List[str]] = {}
    for module in factors:
        if module == "lm_head":
            groups.setdefault("output_layer", []).append(module)
            continue
        match = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)", module)
        if match is None:
            raise InteropError(f"PEFT module {module} has no megatron counterpart")
        layer, block, leaf = match.groups()
        target = {"q_proj": "self_attention.linear_qkv", "k_proj": "self_attention.linear_qkv",
                  "v_proj": "self_attention.linear_qkv", "o_proj": "self_attention.linear_proj",
                  "gate_proj": "mlp.linear_fc1", "up_proj": "mlp.linear_fc1",
                  "down_proj": "mlp.linear_fc2"}.get(leaf)
        if target is None:
            raise InteropError(f"PEFT module {module} has no megatron counterpart")
        groups.setdefault(f"decoder.layers.{layer}.{target}", []).append(module)

    # one megatron rank for all modules: the largest any fused group needs
    def needed_rank(members):
        a_list = [factors[m]["A"] for m in members]
        shared = all(torch.equal(a, a_list[0]) for a in a_list)
        return a_list[0].shape[0] if shared else sum(a.shape[0] for a in a_list)

    rank = max(needed_rank(members) for members in groups.values())
    alpha = config["lora_alpha"]
    scaling = alpha / (rank ** 0.5) if config.get("use_rslora") else alpha / rank
    out = {}
    for target, members in sorted(groups.items()):
        leaf_order = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "gate_proj": 0, "up_proj": 1}
        members = sorted(members, key=lambda m: leaf_order.get(m.rsplit(".", 1)[-1], 0))
        leaves = [m.rsplit(".", 1)[-1] for m in members]
        if target.endswith("linear_qkv") and leaves != ["q_proj", "k_proj", "v_proj"]:
            raise InteropError(f"{target}: PEFT adapts {leaves}; megatron's fused linear_qkv needs "
                               f"q_proj, k_proj and v_proj together")
        if target.endswith("linear_fc1") and shape["glu"] and leaves != ["gate_proj", "up_proj"]:
            raise InteropError(f"{target}: PEFT adapts {leaves}; megatron's fused linear_fc1 needs "
                               f"gate_proj and up_proj together")
        parts_a, parts_b = _fuse([(m, factors[m]["A"], factors[m]["B"]) for m in members],
                                 config, rank, scaling)
        if target.endswith("linear_qkv"):
            weight_b = _join_qkv_rows(*parts_b, shape)
        else:
            weight_b = torch.cat(parts_b, dim=0) if len(parts_b) > 1 else parts_b[0]
        out[f"{target}.lora_A.weight"] = parts_a.contiguous()
        out[f"{target}.lora_B.weight"] = weight_b.contiguous()
    lora_kwargs = {"r": rank, "lora_alpha": float(alpha), "use_rslora": bool(config.get("use_rslora")),
                   "lora_dropout": float(config.get("lora_dropout") or 0.0),
                   "target_modules": sorted(groups)}
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
    shape = dict(_model_shape(model), **{k: v for k, v in describe_base_model(model).items()
                                         if k in ("num_layers", "vocab_size")})
    check_peft_against_model(config, peft_modules(tensors, path), shape, path, "this model")
    files = megatron_adapter_files(config, tensors, shape, adapter_name)
    with tempfile.TemporaryDirectory(prefix="megatron_lora_import_") as scratch:
        staged = write_directory_atomically(Path(scratch) / "adapter", files)
        return load_adapter(model, staged, adapter_name, verbose=verbose)


# --- base weights, for checking against transformers -----------------------------------------


def hf_llama_state_dict(full_state: Dict[str, torch.Tensor], shape, num_layers: int):
    """A TP=1 megatron GPT state dict (plain keys) → transformers LlamaForCausalLM keys."""
    hf = {"model.embed_tokens.weight": full_state["embedding.word_embeddings.weight"],
          "model.norm.weight": full_state["decoder.final_layernorm.weight"],
          "lm_head.weight": full_state["output_layer.weight"]}
    for i in range(num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = _split_qkv_rows(full_state[src + "self_attention.linear_qkv.weight"], shape)
        gate, up = split_gate_up(full_state[src + "mlp.linear_fc1.weight"])
        hf.update({
            dst + "input_layernorm.weight": full_state[src + "input_layernorm.weight"],
            dst + "post_attention_layernorm.weight": full_state[src + "pre_mlp_layernorm.weight"],
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": full_state[src + "self_attention.linear_proj.weight"],
            dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": full_state[src + "mlp.linear_fc2.weight"],
        })
    return {k: v.contiguous() for k, v in hf.items()}
