"""Servable Hugging Face checkpoints: ``megatron-lora export-hf``.

Two sources give a directory that ``AutoModelForCausalLM.from_pretrained`` loads alone:

* a consolidated adapter: merged into its Hugging Face base (the directory the run started
  from, ``base_model.name_or_path``, or ``--base``) shard by shard, so memory holds one shard
  plus the adapter; the shard files, the index and every dtype stay the base's, every other
  file of the base (tokenizer, generation config, chat template) is copied;
* a full-training save of scripts/pretrain_gpt.py (``model/`` dist-checkpoint with its
  ``model_description.json``): read at TP=1 in this process and written as a Llama (or
  Mixtral) checkpoint with a config.json that transformers 4 and 5 read.

Only JSON and safetensors are read (never pickle); everything is checked before anything is
written, and the output directory is built beside its place and swapped in atomically.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .atomic import build_directory_atomically, refuse_symlink
from .adapter_file import WEIGHTS_NAME, read_adapter
from .config import LoraConfig
from .errors import MegatronLoraError
from .hf import hf_experiment
from .interop import (
    MODEL_TYPE_ARCHITECTURES,
    check_architecture,
    hf_state_dict,
    hf_vocab,
    megatron_to_hf_factors,
    shape_from_description,
)
from .tokenizers import TOKENIZER_ALL_FILES, TOKENIZER_FILES, holds_tokenizer
from .untrusted import loads_json

MARKER = "megatron_lora_export.json"  # what tells a directory export-hf wrote (--overwrite)
MARKER_FORMAT = "megatron_lora.export_hf"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_BYTES = 2 * 1024 ** 3
# weights in formats this exporter does not rewrite: copying them would ship unmerged weights
_OTHER_WEIGHTS = re.compile(r"(pytorch_model.*\.bin(\.index\.json)?|tf_model\.h5|"
                            r"flax_model\.msgpack|.*\.gguf|.*\.pt|.*\.pth|.*\.ckpt)")
_FUSED_EXPERTS = re.compile(r".*\.experts\.(gate_up_proj|down_proj)(\.weight)?")


class HFExportError(MegatronLoraError):
    """A source, base or output directory that export-hf cannot turn into a checkpoint."""


# --- the output directory ----------------------------------------------------------------------


def check_output_spares_inputs(out: Path, inputs: Dict[str, Optional[Path]], error) -> None:
    """Refuse (raising ``error``) an OUT that is, is inside, or holds an input: writing it
    would replace what the command reads. ``inputs``: what each input is called → its path.
    Every CLI command's output goes through this."""
    target = out.resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if target == source or source in target.parents:
            raise error(f"{out} is {'' if target == source else 'inside '}the {what} "
                        f"{path}; write the output elsewhere")
        if target in source.parents:
            raise error(f"{out} holds the {what} {path}; write the output elsewhere")


def check_output(out: Path, inputs: Dict[str, Optional[Path]], overwrite: bool,
                 error=HFExportError, replaces: str = "a previous export-hf output") -> None:
    """Every CLI command's output directory: refuse (raising ``error``) an OUT that is (or is
    inside, or holds) an input, a symbolic link, an existing file, and without --overwrite a
    non-empty directory (--overwrite replaces ``replaces``). ``inputs``: what each input is
    called → its path."""
    check_output_spares_inputs(out, inputs, error)
    refuse_symlink(out)
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise error(f"{out} exists and is not a directory; choose a new output directory")
    if not overwrite and any(out.iterdir()):
        raise error(f"{out} already exists and is not empty; choose a new output directory or "
                    f"pass --overwrite to replace {replaces}")


def _written_by_export_hf(existing: Path) -> Optional[str]:
    """None when ``existing`` is empty or was written by export-hf, else why not."""
    if not any(existing.iterdir()):
        return None
    try:
        marker = loads_json((existing / MARKER).read_text(), existing / MARKER, ValueError)
        if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT:
            return None
    except (OSError, ValueError):
        pass
    return f"it was not written by export-hf (no {MARKER})"


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)  # follows links (a hub cache's blobs): the content


def _marker(**facts) -> bytes:
    return (json.dumps({"format": MARKER_FORMAT, **facts}, indent=2, sort_keys=True) + "\n").encode()


# --- the Hugging Face base -----------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict:
    try:
        data = loads_json(path.read_text(), path, HFExportError)
    except FileNotFoundError:
        raise HFExportError(f"{path.parent} is not {what}: {path.name} is missing") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise HFExportError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise HFExportError(f"{path} does not hold a JSON object")
    return data


def read_base(path: Path):
    """(config.json, {tensor: shard file name}, {tensor: shape}) of a Hugging Face model
    directory stored as safetensors (one file or an index of shards)."""
    if not path.is_dir():
        raise HFExportError(f"--base {path} is not a directory")
    config = _read_json(path / "config.json", "a Hugging Face model directory")
    if (path / INDEX_NAME).is_file():
        weight_map = _read_json(path / INDEX_NAME, "a sharded checkpoint").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFExportError(f"{path / INDEX_NAME} has no weight_map of tensor: file")
    elif (path / SINGLE_NAME).is_file():
        weight_map = None
    else:
        pickled = sorted(p.name for p in path.iterdir() if _OTHER_WEIGHTS.fullmatch(p.name))
        if pickled:
            raise HFExportError(f"{path} holds its weights as {pickled[0]}, which is never "
                                f"loaded here (pickle); re-save the base with safetensors "
                                f"(save_pretrained does by default)")
        raise HFExportError(f"{path} holds no {SINGLE_NAME} or {INDEX_NAME}")
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
    located, shapes = {}, {}
    for name in files:
        if "/" in name or name.startswith("."):
            raise HFExportError(f"{path / INDEX_NAME} names {name!r}, not a file beside it")
        try:
            with safe_open(path / name, framework="pt") as handle:
                for key in handle.keys():
                    located[key] = name
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except FileNotFoundError:
            raise HFExportError(f"{path / name} is missing (listed in {INDEX_NAME})") from None
        except Exception as error:  # safetensors' own error types
            raise HFExportError(f"{path / name} cannot be read as safetensors: {error}") from None
    if weight_map:
        absent = sorted(k for k, f in weight_map.items() if located.get(k) != f)
        if absent:
            raise HFExportError(f"{path / INDEX_NAME} maps {absent[0]} to "
                                f"{weight_map[absent[0]]}, which does not hold it")
    return config, located, shapes


def architecture_of(config: dict, path: Path) -> str:
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPE_ARCHITECTURES:
        raise HFExportError(f"{path / 'config.json'}: model_type {model_type!r} is not one of "
                            f"{sorted(MODEL_TYPE_ARCHITECTURES)}")
    return MODEL_TYPE_ARCHITECTURES[model_type]


def check_base_fits(config: dict, architecture: str, base_model: dict, adapter: Path,
                    base: Path) -> None:
    """The base's config.json against the adapter's base description (both through
    megatron_lora.description, compared on the real vocabulary): one line naming both values
    of the first fact that differs."""
    from .description import ADAPTER_FIELDS, TIED, ModelDescription

    def comparable(described: ModelDescription) -> ModelDescription:
        facts = dict(described.facts)
        facts["vocab_size"] = described.unpadded_vocab_size  # padding is the run's, not the model's
        facts.setdefault(TIED, False)  # adapters record tying only when it is there
        if facts.get("num_moe_experts"):
            facts["moe_ffn_hidden_size"] = described.expert_ffn
        if facts.get("num_attention_heads"):
            facts["num_query_groups"], facts["kv_channels"] = described.groups, described.head_dim
        return ModelDescription(facts)

    try:
        # the sequence length does not matter here (a sliding window cannot act on 1 token)
        theirs = ModelDescription.from_experiment(hf_experiment(
            base, overrides={"megatron_config.seq_length": 1}))
    except MegatronLoraError as error:
        raise HFExportError(f"--base: {error}") from None
    ours = ModelDescription.from_json(base_model)
    for field, expected, value in comparable(ours).differences(comparable(theirs),
                                                                ADAPTER_FIELDS + (TIED,)):
        raise HFExportError(f"{adapter} is an adapter of another base: its base_model.{field} "
                            f"is {expected!r}, but {base}/config.json gives {value!r}")


# --- merging an adapter --------------------------------------------------------------------------


def adapter_deltas(adapter_dir: Path, lora: LoraConfig, shape, architecture: str):
    """{HF weight key: (A, B, scaling, embedding)} of a consolidated adapter: each megatron
    module converted on its own so it keeps its own scaling (rank_pattern, rslora)."""
    tensors = load_file(adapter_dir / WEIGHTS_NAME)
    deltas = {}
    for module in sorted({k.rsplit(".lora_", 1)[0] for k in tensors}):
        pair = {k: tensors[k] for k in (f"{module}.lora_A.weight", f"{module}.lora_B.weight")}
        hf = megatron_to_hf_factors(pair, shape, architecture, merging=True)
        for key in sorted(hf):
            if key.endswith((".lora_A.weight", ".lora_embedding_A")):
                embedding = key.endswith(".lora_embedding_A")
                hf_module = key.rsplit(".lora_", 1)[0]
                b_key = hf_module + (".lora_embedding_B" if embedding else ".lora_B.weight")
                deltas[hf_module + ".weight"] = (hf[key], hf[b_key], lora.scaling_for(module),
                                                 embedding)
    return deltas


def _delta(weight_a, weight_b, scaling: float, embedding: bool) -> torch.Tensor:
    """PEFT's delta in float32: s·B A, or s·(B A)ᵀ for an embedding ([vocab, hidden])."""
    product = weight_b.float() @ weight_a.float()
    return scaling * (product.T if embedding else product)


def _delta_shape(weight_a, weight_b, embedding: bool) -> Tuple[int, int]:
    rows, columns = weight_b.shape[0], weight_a.shape[1]
    return (columns, rows) if embedding else (rows, columns)


def merge_adapter(adapter_dir: Path, out: Path, base: Optional[Path] = None,
                  overwrite: bool = False) -> Path:
    """The adapter merged into its Hugging Face base, written as a checkpoint laid out like
    the base's (same shard files, index and dtypes). W += s·B A in float32, rounded once."""
    check_output(out, {"adapter": adapter_dir, "base": base}, overwrite)
    adapter = read_adapter(adapter_dir)
    base_model = adapter.config.get("base_model") or {}
    if base is None:
        if not base_model.get("name_or_path"):
            raise HFExportError(f"{adapter_dir}: no base model is known (its base_model has no "
                                f"name_or_path); pass --base HF_DIR")
        base = Path(base_model["name_or_path"])
        check_output(out, {"base": base}, overwrite)
    config, located, shapes = read_base(base)
    architecture = architecture_of(config, base)
    check_base_fits(config, architecture, base_model, adapter_dir, base)
    shape = shape_from_description(base_model)
    check_architecture(architecture, shape)
    fused = sorted(k for k in located if _FUSED_EXPERTS.fullmatch(k))
    if fused:
        raise HFExportError(f"{base / located[fused[0]]} stores the experts fused ({fused[0]}); "
                            f"export-hf merges per-expert tensors (experts.{{i}}.*.weight), as "
                            f"save_pretrained writes them")
    deltas = adapter_deltas(adapter_dir, adapter.lora_config, shape, architecture)
    tied_copy = "lm_head.weight"  # a tied table stored twice: both copies get the delta
    if (shape.get("tied") and "model.embed_tokens.weight" in deltas
            and tied_copy in located and tied_copy not in deltas):
        deltas[tied_copy] = deltas["model.embed_tokens.weight"]
    for key, (weight_a, weight_b, _, embedding) in sorted(deltas.items()):
        wanted = _delta_shape(weight_a, weight_b, embedding)
        if key not in located:
            raise HFExportError(f"{base} has no tensor {key}, which the adapter changes; "
                                f"an adapter of another base")
        if shapes[key] != wanted:
            raise HFExportError(f"{base / located[key]}: {key} has shape {list(shapes[key])}, "
                                f"but the adapter's delta is {list(wanted)}")
    weight_files = sorted(set(located.values()))

    def fill(staging: Path) -> None:
        for name in weight_files:
            with safe_open(base / name, framework="pt") as handle:
                metadata = handle.metadata()
            tensors = load_file(base / name)  # one shard in memory at a time
            for key in [k for k in tensors if k in deltas]:
                weight = tensors[key]
                merged = (weight.float() + _delta(*deltas[key])).to(weight.dtype)
                if not torch.isfinite(merged).all():
                    raise HFExportError(f"merging the adapter into {key} ({base / name}) gives "
                                        f"non-finite values in {weight.dtype}; nothing written")
                tensors[key] = merged
            save_file(tensors, staging / name, metadata=metadata)
            del tensors
        for entry in sorted(base.iterdir()):
            if (entry.name in weight_files or entry.name.startswith(".")
                    or _OTHER_WEIGHTS.fullmatch(entry.name) or entry.name == MARKER):
                continue
            _copy(entry, staging / entry.name)
        (staging / MARKER).write_bytes(_marker(
            source="adapter", adapter=str(adapter_dir.resolve()), base=str(base.resolve()),
            adapter_weights_sha256=adapter.config.get("weights_sha256")))

    return build_directory_atomically(out, fill, _written_by_export_hf)


# --- a full-training save --------------------------------------------------------------------


def is_trained_model(path: Path) -> bool:
    from .training.base import model_checkpoint_dir
    from .training.rundir import MODEL_DESCRIPTION

    directory = model_checkpoint_dir(path)
    return directory is not None and (directory / MODEL_DESCRIPTION).is_file()


def _transformer_default(field: str):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig.__dataclass_fields__[field].default


def _llama_family(description: dict, path: Path) -> str:
    """The family a trained model is written as; refuses what Llama / Mixtral cannot express."""
    expected = {"activation": "swiglu", "normalization": "RMSNorm", "add_bias_linear": False,
                "position_embedding_type": "rope", "rotary_percent": 1.0}
    for key, value in expected.items():
        if description.get(key) is not None and description[key] != value:
            raise HFExportError(f"{path}: {key} is {description[key]!r}; a Llama-style Hugging "
                                f"Face model needs {value!r}")
    # what the Llama / Mixtral config written here cannot say: refused, never dropped
    unwritten = {"add_qkv_bias": "q/k/v biases", "qk_layernorm": "q/k norms",
                 "rope_scaling": "rope scaling", "moe_router_pre_softmax":
                 "softmax before top-k routing", "moe_shared_expert_intermediate_size":
                 "a shared expert"}
    for key, what in unwritten.items():
        if description.get(key):
            raise HFExportError(f"{path}: {key} is {description[key]!r}: the model has {what}, "
                                f"which the Llama / Mixtral config written here cannot express")
    return "mixtral" if description.get("num_moe_experts") else "llama"


def _hf_config(description: dict, architecture: str, dtype: torch.dtype) -> dict:
    layers, hidden = description["num_layers"], description["hidden_size"]
    heads = description["num_attention_heads"]
    theta = float(description.get("rotary_base") or 10000)
    eps = description.get("layernorm_epsilon") or _transformer_default("layernorm_epsilon")
    dtype_name = str(dtype).replace("torch.", "")
    config = {
        "architectures": ["LlamaForCausalLM" if architecture == "llama" else "MixtralForCausalLM"],
        "model_type": architecture,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": description.get("num_query_groups") or heads,
        "head_dim": description.get("kv_channels") or hidden // heads,
        "vocab_size": description["vocab_size"],
        "max_position_embeddings": description["seq_length"],
        "rms_norm_eps": eps, "hidden_act": "silu",
        # transformers 5 reads rope_parameters, transformers 4 the top-level rope_theta
        "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "rope_theta": theta,
        "tie_word_embeddings": not description.get("untie_embeddings_and_output_weights", True),
        "attention_bias": False, "attention_dropout": 0.0,
        "torch_dtype": dtype_name, "dtype": dtype_name,
    }
    ffn = description.get("ffn_hidden_size") or 4 * hidden
    if architecture == "llama":
        config.update(intermediate_size=ffn, mlp_bias=False)
    else:
        config.update(intermediate_size=description.get("moe_ffn_hidden_size") or ffn,
                      num_local_experts=description["num_moe_experts"],
                      num_experts_per_tok=description.get("moe_router_topk")
                      or _transformer_default("moe_router_topk"))
    return config


def _load_trained_state(directory: Path, description: dict) -> Dict[str, torch.Tensor]:
    """The dist-checkpoint's tensors, read into the model built at TP=1 in this process."""
    # heavy (megatron's model, dist-checkpointing); only this path needs them
    import torch.distributed as dist

    from .cpu import make_cpu_ready
    from .experiment import load_experiment
    from .gpt import build_gpt_model, initialize_model_parallel
    from .training.base import load_base_weights

    make_cpu_ready(allow_with_cuda=True)  # a conversion: the CPU is enough
    if not dist.is_initialized():  # one process, an in-process store: no port to pick
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise HFExportError(f"export-hf reads {directory} in one process; this one is rank "
                            f"{dist.get_rank()} of {dist.get_world_size()}")
    megatron_config = {k: v for k, v in description.items() if v is not None}
    experiment = load_experiment(data={"megatron_config": megatron_config})
    initialize_model_parallel(experiment)
    model = build_gpt_model(experiment, layout_invariant_init=False)
    load_base_weights(model, directory)
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.endswith("_extra_state") and v is not None}


def _shards(state: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
    shards, size = [{}], 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def export_trained_model(run_dir: Path, out: Path, tokenizer_model: Optional[Path] = None,
                         overwrite: bool = False) -> Path:
    from .training.base import model_checkpoint_dir
    from .training.rundir import MODEL_DESCRIPTION

    directory = model_checkpoint_dir(run_dir)
    check_output(out, {"source": run_dir, "tokenizer directory": tokenizer_model}, overwrite)
    description = _read_json(directory / MODEL_DESCRIPTION, "a full-training save")
    architecture = _llama_family(description, directory / MODEL_DESCRIPTION)
    tokenizer_files = []
    if tokenizer_model is not None:
        if not tokenizer_model.is_dir():
            raise HFExportError(f"--tokenizer-model {tokenizer_model} is not a directory")
        tokenizer_files = [tokenizer_model / n for n in TOKENIZER_ALL_FILES
                           if (tokenizer_model / n).is_file()]
        if not holds_tokenizer(tokenizer_model):
            raise HFExportError(f"--tokenizer-model {tokenizer_model} holds none of "
                                f"{list(TOKENIZER_FILES[:3])}")
    # the saved tensors hold the padded vocabulary; the Hugging Face model the real one
    multiple = description.get("make_vocab_size_divisible_by") or 1
    padded = -(-description["vocab_size"] // multiple) * multiple
    shape = shape_from_description(dict(
        description, gated_linear_unit=True, vocab_size=padded,
        unpadded_vocab_size=description["vocab_size"],
        share_embeddings_and_output_weights=not description.get(
            "untie_embeddings_and_output_weights", True)))
    check_architecture(architecture, shape)
    state = hf_state_dict(_load_trained_state(directory, description), shape, architecture)
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise HFExportError(f"{directory}: {key} holds non-finite values; nothing written")
    config = _hf_config(description, architecture, next(iter(state.values())).dtype)
    config["vocab_size"] = hf_vocab(shape)

    def fill(staging: Path) -> None:
        shards = _shards(state)
        names = [SINGLE_NAME] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            save_file(shard, staging / name, metadata={"format": "pt"})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
            (staging / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for path in tokenizer_files:
            _copy(path, staging / path.name)
        (staging / MARKER).write_bytes(_marker(source="trained model",
                                               checkpoint=str(directory.resolve())))

    return build_directory_atomically(out, fill, _written_by_export_hf)


def export_hf(source: Path, out: Path, base: Optional[Path] = None,
              tokenizer_model: Optional[Path] = None, overwrite: bool = False) -> Path:
    """SOURCE (an adapter directory or a full-training save) → a Hugging Face checkpoint."""
    if is_trained_model(source):
        if base is not None:
            raise HFExportError(f"{source} is a whole trained model; --base is for an adapter")
        return export_trained_model(source, out, tokenizer_model, overwrite)
    if tokenizer_model is not None:
        raise HFExportError("--tokenizer-model is for a trained model; an adapter's merge "
                            "copies its base's tokenizer files")
    return merge_adapter(source, out, base, overwrite)
