"""Megatron-LM integration: add_lora_args as extra_args_provider, lora_config_from_args, and
lora_model_provider around a Megatron-LM-style model_provider (run in a spawned group)."""

from argparse import ArgumentParser

import pytest

from megatron_lora.arguments import add_lora_args, lora_config_from_args


def parse(*flags):
    return add_lora_args(ArgumentParser()).parse_args(list(flags))


def test_no_rank_means_full_training():
    assert lora_config_from_args(parse()) is None
    assert lora_config_from_args(parse("--lora-rank", "0")) is None


def test_flags_give_a_lora_config():
    config = lora_config_from_args(parse("--lora-rank", "16", "--lora-alpha", "32",
                                         "--lora-dropout", "0.1", "--lora-target-modules",
                                         "linear_qkv", "mlp.linear_fc1"))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32.0, 0.1)
    assert config.target_modules == ["linear_qkv", "mlp.linear_fc1"]
    assert lora_config_from_args(parse("--lora-rank", "8")).lora_alpha == 8.0  # scaling 1


def test_bad_flags_name_the_flag():
    with pytest.raises(ValueError, match=r"--lora-rank -3 is invalid"):
        lora_config_from_args(parse("--lora-rank", "-3"))
    with pytest.raises(ValueError, match=r"lora_dropout=1.5 is invalid"):
        lora_config_from_args(parse("--lora-rank", "4", "--lora-dropout", "1.5"))


def test_model_provider_wrapper_adds_lora(gpt_spawned):
    out = gpt_spawned(1)[0].layouts[(1, 1, False)].megatron_lm_provider
    assert out["names"] == [f"decoder.layers.{i}.mlp.linear_fc{j}" for i in range(4) for j in (1, 2)]
    assert out["ranks"] == {4}
    assert out["trainable"] == ["lora_A", "lora_B"]
