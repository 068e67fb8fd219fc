"""LoraConfig: what an adapter is, validated the moment it is made."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Union

from .errors import MegatronLoraError
from .untrusted import pattern_problem, regex_fullmatch, short

# what apply_lora adapts when a LoraConfig names no target_modules
DEFAULT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
INIT_CHOICES = (True, False, "kaiming", "gaussian", "xavier")
LORA_DTYPE_CHOICES = (None, "float32", "bfloat16", "float16", "float64")


class LoraConfigError(MegatronLoraError):
    """A LoraConfig field with a value it cannot take (the message names the field and value)."""


def _invalid(field_name: str, value, valid: str) -> LoraConfigError:
    return LoraConfigError(f"LoraConfig.{field_name}={short(value)} is invalid: {valid}")


def _as_name_list(field_name: str, value) -> Optional[List[str]]:
    if value is None:
        return None
    given = value  # errors name what the user wrote
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise _invalid(field_name, value, "expected a module name, or a list of non-empty names")
    if not value:
        raise _invalid(field_name, value, "expected at least one module name (or None)")
    for name in value:  # a bad regex fails here, not later while matching module names
        if name.startswith("re:"):
            problem = pattern_problem(name[3:])
            if problem:
                raise _invalid(field_name, given, f"{short(name)} is not a valid regular "
                                                  f"expression ({problem})")
    return list(value)


def name_matches(pattern: str, name: str) -> bool:
    """A target matches a global module name by one of four rules:

    ``re:<regex>`` full regex match; a pattern with ``*``, ``?`` or ``[`` is a glob over the
    whole name (``decoder.layers.*.mlp.linear_fc1``); otherwise the exact name or a dotted
    suffix of it (``linear_fc1``, ``mlp.linear_fc1``).
    """
    if pattern.startswith("re:"):
        return regex_fullmatch(pattern[3:], name, pattern)  # time-bounded: patterns come from files
    if any(char in pattern for char in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


@dataclass
class LoraConfig:
    """Settings of one LoRA adapter.

    r: rank (> 0); lora_alpha: scaling numerator (> 0); the delta is scaled by
    lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
    rank_pattern: {module pattern: rank} for modules whose rank is not r (PEFT's field of the
    same name; patterns match as target_modules do, the first match wins); the scaling follows
    each module's rank. A router of 8 experts, say, takes no rank above 8.
    init_lora_weights: True/"kaiming" (A kaiming-uniform), "gaussian" (A ~ N(0, 1/r)),
    "xavier" (A xavier-uniform), all with B = 0 so a new adapter changes nothing; False draws
    both A and B at random (for tests). Fans come from the full, unsharded shapes.
    lora_dtype: storage dtype of the factors; None keeps the base weight's dtype.
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: Optional[Union[List[str], str]] = None
    exclude_modules: Optional[Union[List[str], str]] = None
    init_lora_weights: Union[bool, str] = True
    use_rslora: bool = False
    seed: int = 0
    lora_dtype: Optional[str] = None
    rank_pattern: Optional[Dict[str, int]] = None

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise _invalid("r", self.r, "expected a positive integer rank, e.g. 8 or 16")
        if (
            isinstance(self.lora_alpha, bool)
            or not isinstance(self.lora_alpha, (int, float))
            or not math.isfinite(self.lora_alpha)
            or self.lora_alpha <= 0
        ):
            raise _invalid("lora_alpha", self.lora_alpha, "expected a finite number > 0")
        if (
            isinstance(self.lora_dropout, bool)
            or not isinstance(self.lora_dropout, (int, float))
            or not 0.0 <= self.lora_dropout < 1.0
        ):
            raise _invalid("lora_dropout", self.lora_dropout, "expected a probability in [0, 1)")
        self.target_modules = _as_name_list("target_modules", self.target_modules)
        self.exclude_modules = _as_name_list("exclude_modules", self.exclude_modules)
        if not any(
            self.init_lora_weights is choice
            or (isinstance(choice, str) and self.init_lora_weights == choice)
            for choice in INIT_CHOICES
        ):
            raise _invalid(
                "init_lora_weights",
                self.init_lora_weights,
                "expected one of True, False, 'kaiming', 'gaussian', 'xavier'",
            )
        if not isinstance(self.use_rslora, bool):
            raise _invalid("use_rslora", self.use_rslora, "expected True or False")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise _invalid("seed", self.seed, "expected an integer >= 0")
        if self.lora_dtype not in LORA_DTYPE_CHOICES:
            raise _invalid(
                "lora_dtype",
                self.lora_dtype,
                "expected None (the base weight's dtype) or one of "
                "'float32', 'bfloat16', 'float16', 'float64'",
            )

        self._check_rank_pattern()

    def _check_rank_pattern(self) -> None:
        if self.rank_pattern is None:
            return
        if not isinstance(self.rank_pattern, dict):
            raise _invalid("rank_pattern", self.rank_pattern,
                           "expected a mapping of module pattern to rank, e.g. {'router': 4}")
        for pattern, rank in self.rank_pattern.items():
            _as_name_list("rank_pattern", [pattern])  # a valid pattern, as in target_modules
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise _invalid(f"rank_pattern[{pattern!r}]", rank, "expected a positive integer rank")
        self.rank_pattern = dict(self.rank_pattern) or None

    def rank_for(self, module_name: str) -> int:
        """The module's rank: the first rank_pattern entry that matches it, else r."""
        for pattern, rank in (self.rank_pattern or {}).items():
            if name_matches(pattern, module_name):
                return rank
        return self.r

    def scaling_at(self, rank: int) -> float:
        """lora_alpha / rank, or lora_alpha / sqrt(rank) with use_rslora."""
        if self.use_rslora:
            return self.lora_alpha / math.sqrt(rank)
        return self.lora_alpha / rank

    @property
    def scaling(self) -> float:
        return self.scaling_at(self.r)

    def scaling_for(self, module_name: str) -> float:
        return self.scaling_at(self.rank_for(module_name))

    def to_dict(self) -> dict:
        return asdict(self)
