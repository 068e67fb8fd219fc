"""Command-line flags: Megatron-LM's names for the model, layout and loop, plus the LoRA flags.

``add_lora_args`` is usable as Megatron-LM's ``extra_args_provider``;
``lora_model_provider`` wraps a Megatron-LM ``model_provider`` so that a user's own
``pretrain_gpt.py`` gains LoRA in three lines (see the README):

    from megatron_lora.arguments import add_lora_args, lora_model_provider
    pretrain(train_valid_test_datasets_provider, lora_model_provider(model_provider),
             ModelType.encoder_or_decoder, forward_step, extra_args_provider=add_lora_args)
"""

from __future__ import annotations

import argparse
import functools
from typing import Optional

from .config import LoraConfig, LoraConfigError
from .config import DEFAULT_TARGETS


def add_lora_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The LoRA flags (Megatron-LM extra_args_provider contract: takes and returns the parser)."""
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora-rank", type=int, default=None,
                       help="LoRA rank r; 0 or absent means full training (pretraining only)")
    group.add_argument("--lora-alpha", type=float, default=None,
                       help="LoRA alpha (scaling alpha / r); default: the rank, i.e. scaling 1")
    group.add_argument("--lora-dropout", type=float, default=None, help="dropout on the LoRA input")
    group.add_argument("--lora-target-modules", nargs="+", default=None,
                       help=f"module names, dotted suffixes, globs or re:<regex> "
                            f"(default: {' '.join(DEFAULT_TARGETS)})")
    group.add_argument("--lora-load", default=None,
                       help="start from this saved adapter directory (any TP/PP layout)")
    return parser


def lora_config_from_args(args, base: Optional[LoraConfig] = None) -> Optional[LoraConfig]:
    """The LoraConfig the flags ask for (over ``base``, e.g. a YAML lora section), or None
    for full training (rank 0 or absent and no base). Bad values raise LoraConfigError naming the
    flag and the value."""
    rank = getattr(args, "lora_rank", None)
    if rank is not None and rank < 0:
        raise LoraConfigError(f"--lora-rank {rank} is invalid: expected 0 (full training) or a "
                         f"positive rank such as 8 or 16")
    if rank == 0 or (rank is None and base is None):
        return None
    settings = base.to_dict() if base is not None else {}
    if rank is not None:
        settings["r"] = rank
    if getattr(args, "lora_alpha", None) is not None:
        settings["lora_alpha"] = args.lora_alpha
    elif rank is not None and base is None:
        settings["lora_alpha"] = float(rank)
    if getattr(args, "lora_dropout", None) is not None:
        settings["lora_dropout"] = args.lora_dropout
    if getattr(args, "lora_target_modules", None):
        settings["target_modules"] = list(args.lora_target_modules)
    if getattr(args, "seed", None) is not None:
        settings.setdefault("seed", args.seed)
    try:
        return LoraConfig(**settings)
    except LoraConfigError as error:  # name the flag, not only the dataclass field
        raise LoraConfigError(f"LoRA flags: {error}") from None


def lora_model_provider(model_provider, get_args=None):
    """Wrap a Megatron-LM ``model_provider(pre_process, post_process, ...)`` so that the model
    it builds gets LoRA from the flags (``--lora-rank`` > 0), and so that Megatron-LM's training
    loop completes the replicated LoRA gradients (its ``finalize_model_grads`` is swapped for
    :func:`megatron_lora.finalize_model_grads_with_lora`)."""

    @functools.wraps(model_provider)
    def provider(*args, **kwargs):
        from .grad_sync import finalize_model_grads_with_lora
        from .model import apply_lora

        margs = (get_args or _megatron_lm_args)()
        model = model_provider(*args, **kwargs)
        config = lora_config_from_args(margs)
        if config is None:
            return model
        apply_lora(model, config)
        if getattr(margs, "lora_load", None):
            from .checkpoint import load_adapter

            load_adapter(model, margs.lora_load)
        _route_megatron_lm_grad_sync(finalize_model_grads_with_lora)
        return model

    return provider


def _megatron_lm_args():
    from megatron.training import get_args  # Megatron-LM, not megatron-core

    return get_args()


def _route_megatron_lm_grad_sync(finalize):
    """Megatron-LM's train() installs ``megatron.training.training.finalize_model_grads`` as
    ``config.finalize_model_grads_func``; point that name at the LoRA-aware version."""
    try:
        from megatron.training import training
    except ImportError:  # megatron-core alone: the caller's own loop calls finalize_lora_grads
        return
    training.finalize_model_grads = finalize
