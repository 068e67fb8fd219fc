"""YAML experiment configs: the model, its parallel layout and the adapter in one file.

Everything is checked in plain Python before any process group exists, so a typo or a layout
that cannot work fails in a second with the key and the values named, not inside a collective
on the cluster. Users call `megatron_lora.load_experiment` (or this module's).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import enum
import inspect
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
import yaml
from megatron.core.activations import squared_relu
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_config import MLATransformerConfig

from .config import LoraConfig
from .errors import MegatronLoraError
from .untrusted import BoundedSafeLoader, short

SECTIONS = ("megatron_config", "lora", "training")

PARAMS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# name -> (activation_func, whether it implies gated_linear_unit)
ACTIVATIONS = {
    "swiglu": (F.silu, True),
    "gelu": (F.gelu, False),
    "silu": (F.silu, False),
    "relu": (F.relu, False),
    "squared_relu": (squared_relu, False),
}

_REQUIRED = object()

# megatron_config keys that are not TransformerConfig fields (GPTModel arguments and the
# YAML-level spellings of callables and dtypes): name -> (type, default).
_MODEL_KEYS = {
    "vocab_size": (int, _REQUIRED),
    "seq_length": (int, _REQUIRED),
    "position_embedding_type": (Literal["rope", "learned_absolute", "none"], "rope"),
    # float: Hugging Face configs may give a non-integral rope_theta
    "rotary_base": (Union[int, float], 10000),
    "rotary_percent": (float, 1.0),
    # Llama 3.1's rope scaling (megatron-core's GPTModel arguments)
    "rope_scaling": (bool, False),
    "rope_scaling_factor": (float, 8.0),
    # Megatron-LM's name: the model's vocabulary is vocab_size rounded up to a multiple of
    # this; the padded rows are zero and their logits never count (docs/hf.md)
    "make_vocab_size_divisible_by": (int, 1),
    "untie_embeddings_and_output_weights": (bool, True),
    "seed": (int, 1234),
    "activation": (Literal[tuple(ACTIVATIONS)], "swiglu"),
    "params_dtype": (Literal[tuple(PARAMS_DTYPES)], "float32"),
}

# MLATransformerConfig is TransformerConfig plus the multi-latent-attention sizes; its fields
# are accepted, and the MLA-only ones only with `multi_latent_attention: true`.
_TC_FIELDS = [f.name for f in dataclasses.fields(MLATransformerConfig)]
# TransformerConfig's own annotations win: MLATransformerConfig re-annotates some of its fields
# more loosely (normalization as a plain str)
_TC_HINTS = {**typing.get_type_hints(MLATransformerConfig), **typing.get_type_hints(TransformerConfig)}
# megatron reads q_lora_rank=None as "no query down-projection" (one linear_q_proj), though
# its annotation says int
_TC_HINTS["q_lora_rank"] = Optional[int]
_PLAIN_TC_FIELDS = {f.name for f in dataclasses.fields(TransformerConfig)}
_MLA_ONLY_FIELDS = set(_TC_FIELDS) - _PLAIN_TC_FIELDS

# Defaults for a GPT/Llama-like model where they differ from TransformerConfig's.
_DEFAULTS = {
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "sequence_parallel": False,
    "expert_model_parallel_size": 1,
    "expert_tensor_parallel_size": None,
    "context_parallel_size": 1,
    "normalization": "RMSNorm",
    "add_bias_linear": False,
    **{k: default for k, (_, default) in _MODEL_KEYS.items() if default is not _REQUIRED},
}
_REQUIRED_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length")
_POSITIVE_KEYS = (
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "expert_tensor_parallel_size", "context_parallel_size", "num_layers", "hidden_size",
    "num_attention_heads", "num_query_groups", "ffn_hidden_size", "kv_channels",
    "num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk", "vocab_size", "seq_length",
    "rotary_base", "make_vocab_size_divisible_by",
)

# Sizes past int32 are typos (an extra digit, 1e26): no model dimension comes near it, and torch
# fails deep inside a kernel instead of naming the key.
_LARGEST_SIZE = 2**31 - 1

# Keys users will try that YAML does not take, with what to write instead.
_REDIRECTS = {
    "activation_func": "use `activation: swiglu` (or gelu, silu, relu, squared_relu)",
    "swiglu": "use `activation: swiglu`",
    "bf16": "use `params_dtype: bfloat16`",
    "fp16": "use `params_dtype: float16`",
    "pipeline_dtype": "it always equals `params_dtype`",
    "init_method": "use `init_method_std`",
    "output_layer_init_method": "use `init_method_std`",
    "embedding_init_method": "use `embedding_init_method_std`",
    "max_position_embeddings": "use `seq_length`",
    "disable_bias_linear": "use `add_bias_linear: false`",
}
_LORA_REDIRECTS = {"rank": "r", "lora_rank": "r", "lora_r": "r"}


class ExperimentConfigError(MegatronLoraError):
    """An experiment config that cannot run, with the key, the values and the file named."""


# ---------------------------------------------------------------- type checks against hints


class _Mismatch(Exception):
    pass


def _is_union(hint) -> bool:
    origin = typing.get_origin(hint)
    return origin is Union or origin is types.UnionType


def _arms(hint):
    """The alternatives of a Union/Optional hint, or [hint]."""
    if _is_union(hint):
        return list(typing.get_args(hint))
    return [hint]


def _is_enum(hint) -> bool:
    return inspect.isclass(hint) and issubclass(hint, enum.Enum)


def _expressible(hint) -> bool:
    """Whether YAML can write some value of this type (not a callable, dtype or object)."""
    if _is_union(hint):
        return any(_expressible(a) for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) in (Literal, list, tuple):
        return True
    return hint in (bool, int, float, str) or _is_enum(hint)


def _coerce(value, hint):
    """The canonical (plain, yaml-dumpable) form of value, or _Mismatch."""
    origin = typing.get_origin(hint)
    if _is_union(hint):
        for arm in typing.get_args(hint):
            try:
                return _coerce(value, arm)
            except _Mismatch:
                pass
    elif origin is Literal:
        # type() too, because True == 1 would otherwise pass for a Literal[1]
        if any(value == c and type(value) is type(c) for c in typing.get_args(hint)):
            return value
    elif hint is type(None) or hint is None:
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if isinstance(value, list):
            return [_coerce(v, item) for v in value]
    elif origin is tuple:
        items = typing.get_args(hint)
        if isinstance(value, (list, tuple)):
            if len(items) == 2 and items[1] is Ellipsis:
                return [_coerce(v, items[0]) for v in value]
            if len(items) == len(value):
                return [_coerce(v, t) for v, t in zip(value, items)]  # lists dump to YAML
    elif _is_enum(hint):
        if isinstance(value, hint):
            return value.name
        if isinstance(value, str) and value in hint.__members__:
            return value
    elif hint is Any:
        return value
    raise _Mismatch


def _describe(hint) -> str:
    if _is_union(hint):
        args = typing.get_args(hint)
        text = " or ".join(_describe(a) for a in args if a is not type(None) and _expressible(a))
        return f"null or {text}" if type(None) in args else text
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    if origin in (list, tuple):
        return "a list"
    if _is_enum(hint):
        return "one of " + ", ".join(repr(n) for n in hint.__members__)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def checked_value(name: str, value, hint):
    """``value`` in its canonical form if it is of type ``hint``, else an ExperimentConfigError
    naming ``name``, the value and what is valid (the schema check every YAML section uses)."""
    return _checked(name, value, hint)


def _checked(name: str, value, hint):
    if isinstance(value, float) and not math.isfinite(value):  # YAML's .nan / .inf
        raise ExperimentConfigError(f"{name} must be a finite number, got {value!r}")
    try:
        return _coerce(value, hint)
    except _Mismatch:
        raise ExperimentConfigError(
            f"{name} must be {_describe(hint)}, got {short(value)} ({type(value).__name__})"
        ) from None


def _to_megatron(value, hint):
    """Undo the YAML canonical form where TransformerConfig wants an enum or a tuple."""
    for arm in _arms(hint):
        if _is_enum(arm) and isinstance(value, str) and value in arm.__members__:
            return arm[value]
        if typing.get_origin(arm) is tuple and isinstance(value, list):
            return tuple(value)
    return value


_ALLOWED_TC = {
    name: _TC_HINTS[name]
    for name in _TC_FIELDS
    if not name.startswith("_") and name not in _REDIRECTS and _expressible(_TC_HINTS[name])
}
_MEGATRON_KEYS = {**_ALLOWED_TC, **{k: hint for k, (hint, _) in _MODEL_KEYS.items()}}
# The keys most configs set: searched first for a did-you-mean (so num_heads suggests
# num_attention_heads, not mamba_num_heads) and listed when nothing is close, where all
# ~200 TransformerConfig fields would bury them.
_COMMON_KEYS = list(
    dict.fromkeys(
        _REQUIRED_KEYS
        + tuple(_DEFAULTS)
        + ("num_query_groups", "ffn_hidden_size", "kv_channels", "gated_linear_unit",
           "add_qkv_bias", "layernorm_epsilon", "hidden_dropout", "attention_dropout",
           "init_method_std", "num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk")
    )
)


# ---------------------------------------------------------------- messages and small helpers


@contextlib.contextmanager
def _reported_from(source: Optional[str]):
    """Prefix every ExperimentConfigError raised inside with the file it came from."""
    try:
        yield
    except ExperimentConfigError as error:
        if source is None:
            raise
        raise ExperimentConfigError(f"{source}: {error}") from None


def unknown_key(section: Optional[str], key: str, valid, common=None, more: str = ""):
    """The error for an unknown key, with the closest valid one (from common first)."""
    what = f"{section}.{key} is not a known key" if section else f"{key!r} is not a known section"
    for pool in (common or [], valid):
        close = difflib.get_close_matches(key, list(pool), n=1, cutoff=0.6)
        if close:
            return ExperimentConfigError(f"{what}; did you mean {close[0]!r}?")
    kind = "keys" if section else "sections"
    return ExperimentConfigError(f"{what}; valid {kind}: {', '.join(common or valid)}{more}")


def _mapping(value, name: str, *, none_ok: bool = False) -> dict:
    if value is None and none_ok:
        return {}
    if not isinstance(value, Mapping):
        raise ExperimentConfigError(
            f"{name} must be a mapping of key: value, got {type(value).__name__} {value!r:.80}"
        )
    for key in value:
        if not isinstance(key, str):
            raise ExperimentConfigError(f"{name} has a key that is not a string: {short(key)}")
    return dict(value)


def _divides(values: dict, name: str, by: str, note: str = ""):
    if values[name] % values[by]:
        raise ExperimentConfigError(
            f"megatron_config: {name} ({values[name]}) is not divisible by {by} ({values[by]})"
            + (f"; {note}" if note else "")
        )


class _Loader(BoundedSafeLoader):
    """SafeLoader (no aliases, bounded nesting) that also reads `1e-5` as a float, as YAML 1.2
    does (1.1 makes it a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _parse_yaml(text: str, what: str):
    try:
        return yaml.load(text, Loader=_Loader)  # safe: _Loader builds plain data only
    except yaml.YAMLError as error:
        # one line: the problem and where, not PyYAML's multi-line excerpt
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ExperimentConfigError(f"{what} is not valid YAML{where}: {problem}") from None
    except ValueError as error:  # a value PyYAML cannot build, e.g. an integer too long
        raise ExperimentConfigError(f"{what} is not valid YAML: {str(error)[:120]}") from None


# ---------------------------------------------------------------- the config


@dataclass
class ExperimentConfig:
    """A validated experiment: megatron_config holds plain values (defaults filled in,
    params_dtype and activation as names); transformer_config() turns it into megatron's."""

    megatron_config: Dict[str, Any]
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: Dict[str, Any] = field(default_factory=dict)
    source: Optional[str] = None
    # the sections the file (or data) gave, so a caller can tell a lora: section from defaults
    sections: Tuple[str, ...] = field(default=(), compare=False)
    # the Hugging Face directory the model's shape came from (megatron_lora.hf.hf_experiment)
    hf_path: Optional[str] = field(default=None, compare=False)

    @property
    def tensor_model_parallel_size(self) -> int:
        return self.megatron_config["tensor_model_parallel_size"]

    @property
    def pipeline_model_parallel_size(self) -> int:
        return self.megatron_config["pipeline_model_parallel_size"]

    @property
    def sequence_parallel(self) -> bool:
        return self.megatron_config["sequence_parallel"]

    @property
    def expert_model_parallel_size(self) -> int:
        return self.megatron_config["expert_model_parallel_size"]

    @property
    def expert_tensor_parallel_size(self) -> int:
        etp = self.megatron_config["expert_tensor_parallel_size"]
        return self.tensor_model_parallel_size if etp is None else etp

    @property
    def seed(self) -> int:
        return self.megatron_config["seed"]

    @property
    def vocab_size(self) -> int:
        return self.megatron_config["vocab_size"]

    @property
    def padded_vocab_size(self) -> int:
        """The model's vocabulary: vocab_size rounded up to make_vocab_size_divisible_by."""
        multiple = self.megatron_config.get("make_vocab_size_divisible_by") or 1
        return -(-self.vocab_size // multiple) * multiple

    @property
    def seq_length(self) -> int:
        return self.megatron_config["seq_length"]

    @property
    def params_dtype(self) -> torch.dtype:
        return PARAMS_DTYPES[self.megatron_config["params_dtype"]]

    def check_world_size(self, world_size: int) -> int:
        """The data-parallel size this layout has in a world of world_size ranks."""
        with _reported_from(self.source):
            if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
                raise ExperimentConfigError(
                    f"world size must be a positive integer, got {world_size!r}"
                )
            # context_parallel_size is always 1 after validation, so it is left out here
            tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
            _check_grid(
                world_size,
                ("tensor_model_parallel_size", tp),
                ("pipeline_model_parallel_size", pp),
            )
            if self.megatron_config.get("num_moe_experts"):
                _check_grid(
                    world_size,
                    ("expert_tensor_parallel_size", self.expert_tensor_parallel_size),
                    ("expert_model_parallel_size", self.expert_model_parallel_size),
                    ("pipeline_model_parallel_size", pp),
                )
            return world_size // (tp * pp)

    def transformer_config(self, **extra) -> TransformerConfig:
        """megatron-core's TransformerConfig for this experiment; extra overrides any field
        (model builders pass e.g. use_cpu_initialization=True)."""
        mla = bool(self.megatron_config.get("multi_latent_attention"))
        config_class = MLATransformerConfig if mla else TransformerConfig
        mla_only = sorted(set(self.megatron_config) & _MLA_ONLY_FIELDS - set(_MODEL_KEYS))
        if mla_only and not mla:
            with _reported_from(self.source):
                raise ExperimentConfigError(
                    f"megatron_config sets {mla_only}, which only multi-latent attention "
                    f"uses; add `multi_latent_attention: true` or remove them"
                )
        kwargs = {
            key: _to_megatron(value, _TC_HINTS[key])
            for key, value in self.megatron_config.items()
            if key in _ALLOWED_TC and (mla or key in _PLAIN_TC_FIELDS)
        }
        dtype = self.params_dtype
        activation_func, gated = ACTIVATIONS[self.megatron_config["activation"]]
        kwargs.update(
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype is torch.bfloat16,
            fp16=dtype is torch.float16,
            activation_func=activation_func,
            gated_linear_unit=gated or self.megatron_config.get("gated_linear_unit", False),
        )
        kwargs.update(extra)
        with _reported_from(self.source):
            try:
                return config_class(**kwargs)
            except (ValueError, AssertionError, NotImplementedError) as error:
                raise ExperimentConfigError(
                    f"megatron-core's TransformerConfig rejects this config: {error}"
                ) from error

    def to_dict(self) -> dict:
        """Plain data that yaml.safe_dump writes and load_experiment(data=...) reads back."""
        return {
            "megatron_config": copy.deepcopy(self.megatron_config),
            "lora": self.lora.to_dict(),
            "training": copy.deepcopy(self.training),
        }


def _check_grid(world_size: int, *sizes):
    product = 1
    for _, size in sizes:
        product *= size
    if world_size % product:
        terms = " x ".join(f"{name} ({size})" for name, size in sizes)
        raise ExperimentConfigError(
            f"{terms} = {product} does not divide the world size {world_size}"
        )


# ---------------------------------------------------------------- validation


def _validate_megatron(section) -> dict:
    section = _mapping(section, "megatron_config")
    values = {}
    for key, value in section.items():
        if key in _REDIRECTS or (key in _TC_HINTS and key not in _MEGATRON_KEYS):
            advice = _REDIRECTS.get(
                key,
                "it takes a Python object that YAML cannot express; "
                "pass it to ExperimentConfig.transformer_config(**extra) instead",
            )
            raise ExperimentConfigError(f"megatron_config.{key} cannot be set in YAML: {advice}")
        if key not in _MEGATRON_KEYS:
            raise unknown_key(
                "megatron_config", key, _MEGATRON_KEYS, _COMMON_KEYS,
                more=", or any field of megatron-core's TransformerConfig",
            )
        values[key] = _checked(f"megatron_config.{key}", value, _MEGATRON_KEYS[key])

    missing = [key for key in _REQUIRED_KEYS if values.get(key) is None]
    if missing:
        raise ExperimentConfigError(
            f"megatron_config is missing required key(s): {', '.join(missing)}"
        )
    for key in _POSITIVE_KEYS:
        if values.get(key) is not None and values[key] <= 0:
            raise ExperimentConfigError(f"megatron_config.{key} must be > 0, got {values[key]}")
        if values.get(key) is not None and values[key] > _LARGEST_SIZE:
            raise ExperimentConfigError(
                f"megatron_config.{key} must be at most {_LARGEST_SIZE} (2**31 - 1), got "
                f"{values[key]}")
    if "seed" in values and values["seed"] < 0:
        raise ExperimentConfigError(f"megatron_config.seed must be >= 0, got {values['seed']}")
    if "rotary_percent" in values and not 0.0 < values["rotary_percent"] <= 1.0:
        raise ExperimentConfigError(
            f"megatron_config.rotary_percent must be in (0, 1], got {values['rotary_percent']}"
        )

    values = {**_DEFAULTS, **values}
    if values.get("num_query_groups") is None:
        values["num_query_groups"] = values["num_attention_heads"]
    if values.get("ffn_hidden_size") is None:
        values["ffn_hidden_size"] = 4 * values["hidden_size"]  # megatron's own default
    _check_layout(values)
    return values


def _check_layout(m: dict):
    """What makes a layout impossible, found before any process group is built."""
    if m["context_parallel_size"] != 1:
        raise ExperimentConfigError(
            f"megatron_config.context_parallel_size={m['context_parallel_size']}: context "
            "parallelism is not supported by megatron_lora; set it to 1"
        )
    if m["sequence_parallel"] and m["tensor_model_parallel_size"] == 1:
        raise ExperimentConfigError(
            "megatron_config.sequence_parallel=true needs tensor_model_parallel_size > 1 (got 1): "
            "it splits activations over the tensor-parallel group"
        )
    if m["activation"] == "swiglu" and m.get("gated_linear_unit") is False:
        raise ExperimentConfigError(
            "megatron_config: activation 'swiglu' is gated; gated_linear_unit: false contradicts "
            "it (use activation: silu for an ungated MLP)"
        )
    tp = "tensor_model_parallel_size"
    _divides(m, "num_attention_heads", tp)
    _divides(m, "num_query_groups", tp, "each tensor-parallel rank must hold whole query groups")
    _divides(m, "num_attention_heads", "num_query_groups")
    if m.get("kv_channels") is None:
        _divides(m, "hidden_size", "num_attention_heads", "or set kv_channels")
    _divides(m, "hidden_size", tp)
    _divides(m, "ffn_hidden_size", tp)
    multiple = m.get("make_vocab_size_divisible_by") or 1
    padded = -(-m["vocab_size"] // multiple) * multiple
    if padded % m[tp]:
        raise ExperimentConfigError(
            f"megatron_config: vocab_size ({m['vocab_size']}"
            + (f", padded to {padded}" if padded != m["vocab_size"] else "")
            + f") is not divisible by {tp} ({m[tp]}); set make_vocab_size_divisible_by to a "
            f"multiple of {m[tp]} (e.g. 128) to pad it")
    uneven = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
              "pipeline_model_parallel_layout")
    if not any(m.get(key) is not None for key in uneven):  # megatron checks uneven splits
        _divides(m, "num_layers", "pipeline_model_parallel_size")

    _check_recompute(m)

    experts, ep = m.get("num_moe_experts"), m["expert_model_parallel_size"]
    if ep > 1 and not experts:
        raise ExperimentConfigError(
            f"megatron_config.expert_model_parallel_size={ep} needs a mixture-of-experts model; "
            "set num_moe_experts"
        )
    if experts:
        _divides(m, "num_moe_experts", "expert_model_parallel_size")
        etp = m["expert_tensor_parallel_size"] or m[tp]
        moe_ffn = m.get("moe_ffn_hidden_size") or m["ffn_hidden_size"]
        if moe_ffn % etp:
            raise ExperimentConfigError(
                f"megatron_config: the expert ffn size ({moe_ffn}) is not divisible by the "
                f"expert tensor-parallel size ({etp})"
            )


# selective recompute modules proven exact with LoRA (docs/recompute.md); why the others are not
_RECOMPUTE_MODULES_REFUSED = {
    "layernorm": "megatron-core's CheckpointWithoutOutput calls TransformerEngine's FP8 state "
                 "even without fp8, so it fails without TransformerEngine",
    "moe_act": "recomputing the experts' activation alone is not proven exact with LoRA here",
    "shared_experts": "shared-expert recompute is not proven exact with LoRA here",
    "mla_up_proj": "recomputing the multi-latent attention up-projections is not proven exact "
                   "with LoRA here",
}


def _check_recompute(m: dict):
    """Recompute settings LoRA is not proven exact with, refused with the reason
    (docs/recompute.md); the combinations megatron checks itself are left to it."""
    granularity = m.get("recompute_granularity")
    if granularity is None:
        return
    for low_precision in ("fp8", "fp4"):
        if m.get(low_precision):
            raise ExperimentConfigError(
                f"megatron_config.recompute_granularity={granularity!r} with {low_precision}: "
                "megatron then recomputes through TransformerEngine's te_checkpoint, which is "
                "not proven exact with LoRA here"
            )
    if granularity == "selective":
        for module in m.get("recompute_modules") or ():
            if module in _RECOMPUTE_MODULES_REFUSED:
                raise ExperimentConfigError(
                    f"megatron_config.recompute_modules: {module!r} is refused: "
                    f"{_RECOMPUTE_MODULES_REFUSED[module]} (use 'core_attn', 'mlp' or 'moe')"
                )
    count, method = m.get("recompute_num_layers"), m.get("recompute_method")
    uneven = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
              "pipeline_model_parallel_layout")
    if granularity != "full" or count is None or any(m.get(k) is not None for k in uneven):
        return
    per_stage = m["num_layers"] // m["pipeline_model_parallel_size"]
    if not 1 <= count <= per_stage:
        raise ExperimentConfigError(
            f"megatron_config.recompute_num_layers={count} must be between 1 and the "
            f"{per_stage} layers of a pipeline stage"
        )
    if method == "uniform" and per_stage % count:
        raise ExperimentConfigError(
            f"megatron_config.recompute_num_layers={count} does not divide the {per_stage} "
            "layers of a pipeline stage, which recompute_method 'uniform' needs (megatron-core "
            "0.16 indexes past the stage's last layer)"
        )


def _validate_lora(section) -> LoraConfig:
    section = _mapping(section, "lora", none_ok=True)
    valid = [f.name for f in dataclasses.fields(LoraConfig)]
    for key in section:
        if key in _LORA_REDIRECTS:
            raise ExperimentConfigError(
                f"lora.{key} is not a known key; did you mean {_LORA_REDIRECTS[key]!r}?"
            )
        if key not in valid:
            raise unknown_key("lora", key, valid)
    try:
        return LoraConfig(**section)
    except ValueError as error:
        raise ExperimentConfigError(f"lora: {error}") from None


def _from_data(data: dict) -> ExperimentConfig:
    for key in data:
        if key not in SECTIONS:
            raise unknown_key(None, key, SECTIONS)
    if "megatron_config" not in data:
        raise ExperimentConfigError("the required section megatron_config is missing")
    return ExperimentConfig(
        megatron_config=_validate_megatron(data["megatron_config"]),
        lora=_validate_lora(data.get("lora")),
        training=_mapping(data.get("training"), "training", none_ok=True),
        sections=tuple(name for name in SECTIONS if data.get(name) is not None),
    )


# ---------------------------------------------------------------- overrides


def _key_path(key) -> tuple:
    parts = tuple(key.split(".")) if isinstance(key, str) else ()
    if not parts or not all(parts):
        raise ExperimentConfigError(f"override key {key!r} is not a dotted name like lora.r")
    return parts


def _override_items(overrides, prefix=()):
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            path = prefix + _key_path(key)
            if isinstance(value, Mapping) and value:
                yield from _override_items(value, path)
            else:
                yield path, value
    elif isinstance(overrides, (list, tuple)):
        for item in overrides:
            if not isinstance(item, str) or "=" not in item:
                raise ExperimentConfigError(
                    f"override {item!r} is not key=value, "
                    "e.g. megatron_config.sequence_parallel=true"
                )
            key, _, text = item.partition("=")
            yield _key_path(key.strip()), _parse_yaml(text, f"the value of override {item!r}")
    else:
        raise ExperimentConfigError(
            "overrides must be a dict or a list of 'key=value' strings, "
            f"got {type(overrides).__name__}"
        )


def flatten_overrides(overrides) -> Dict[str, Any]:
    """Overrides in any form load_experiment takes (or a whole experiment's data), flattened
    to {"section.key": value}, so several sources can be merged with later ones winning."""
    if overrides is None:
        return {}
    return {".".join(path): value for path, value in _override_items(overrides)}


def _apply_overrides(data: dict, overrides) -> dict:
    for path, value in _override_items(overrides):
        node = data
        for depth, part in enumerate(path[:-1]):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ExperimentConfigError(
                    f"override {'.'.join(path)}: {'.'.join(path[: depth + 1])} is not a mapping"
                )
        node[path[-1]] = copy.deepcopy(value)
    return data


# ---------------------------------------------------------------- entry point


def _read_yaml_file(source: str):
    if not os.path.isfile(source):
        raise ExperimentConfigError("the file does not exist")
    try:
        with open(source, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise ExperimentConfigError(f"the file is not a YAML text file ({error})") from None
    return _parse_yaml(text, "the file")


def read_experiment_data(path) -> dict:
    """A YAML experiment file's sections as plain data, not yet validated (for a model whose
    shape comes from elsewhere: megatron_lora.hf takes them as overrides)."""
    source = os.fspath(path)
    with _reported_from(source):
        data = _mapping(_read_yaml_file(source), f"the experiment config (sections "
                                                 f"{', '.join(SECTIONS)})", none_ok=True)
        for key in data:
            if key not in SECTIONS:
                raise unknown_key(None, key, SECTIONS)
    return data


def load_experiment(
    path: Union[str, os.PathLike, None] = None,
    overrides=None,
    *,
    world_size: Optional[int] = None,
    data: Optional[Mapping] = None,
) -> ExperimentConfig:
    """Read, override and validate an experiment config.

    path: a YAML file, or data: the same content as a dict (exactly one of them).
    overrides: {"megatron_config": {"tensor_model_parallel_size": 4}}, the dotted
    {"megatron_config.tensor_model_parallel_size": 4}, or ["lora.r=16", ...] (values read as
    YAML); applied before validation. world_size: also run check_world_size.
    Raises ExperimentConfigError naming the file, the key and the values.
    """
    if (path is None) == (data is None):
        raise ExperimentConfigError("load_experiment takes exactly one of path= and data=")
    source = os.fspath(path) if path is not None else None
    with _reported_from(source):
        if source is not None:
            data = _read_yaml_file(source)
            if data is None:
                raise ExperimentConfigError("the file is empty; it needs a megatron_config section")
        else:
            data = copy.deepcopy(data)
        data = _mapping(data, f"the experiment config (sections {', '.join(SECTIONS)})")
        if overrides is not None:
            data = _apply_overrides(data, overrides)
        config = _from_data(data)
    config.source = source
    if world_size is not None:
        config.check_world_size(world_size)
    return config
