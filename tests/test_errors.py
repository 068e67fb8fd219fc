"""Bad input: every invalid LoraConfig field, unsupported layers, unreadable layouts."""

import math

import pytest
import torch

from megatron_lora import LoraConfig, LoraConfigError, dispatch_megatron


@pytest.mark.parametrize(
    "field,value,hint",
    [
        ("r", 0, "positive integer"),
        ("r", -3, "positive integer"),
        ("r", 2.5, "positive integer"),
        ("r", True, "positive integer"),
        ("lora_alpha", 0, "> 0"),
        ("lora_alpha", -1.0, "> 0"),
        ("lora_alpha", math.nan, "> 0"),
        ("lora_alpha", "16", "> 0"),
        ("lora_dropout", 1.0, "[0, 1)"),
        ("lora_dropout", -0.1, "[0, 1)"),
        ("lora_dropout", "0.1", "[0, 1)"),
        ("target_modules", 5, "module name"),
        ("target_modules", [], "at least one"),
        ("target_modules", ["linear_qkv", ""], "module name"),
        ("exclude_modules", {"a": 1}, "module name"),
        ("target_modules", ["re:linear_(qkv"], "'re:linear_(qkv' is not a valid regular expression"),
        ("exclude_modules", "re:*fc1", "not a valid regular expression"),
        ("init_lora_weights", "pissa", "'kaiming', 'gaussian', 'xavier'"),
        ("init_lora_weights", 1, "'kaiming', 'gaussian', 'xavier'"),
        ("use_rslora", "yes", "True or False"),
        ("seed", -1, ">= 0"),
        ("seed", 1.5, ">= 0"),
        ("lora_dtype", "fp8", "'float32', 'bfloat16'"),
    ],
)
def test_invalid_config_field_names_field_value_and_choices(field, value, hint):
    with pytest.raises(LoraConfigError) as error:  # the CLI reports exactly this class
        LoraConfig(**{field: value})
    message = str(error.value)
    assert f"LoraConfig.{field}={value!r}" in message
    assert hint in message


def test_unknown_field_is_refused():
    with pytest.raises(TypeError, match="rank"):
        LoraConfig(rank=8)


def test_valid_config_and_scaling():
    config = LoraConfig(r=16, lora_alpha=32, target_modules="linear_qkv")
    assert config.target_modules == ["linear_qkv"] and config.scaling == 2.0
    assert LoraConfig(r=16, lora_alpha=32, use_rslora=True).scaling == 8.0
    assert LoraConfig(init_lora_weights="kaiming").init_lora_weights == "kaiming"


def test_dispatch_returns_none_for_plain_modules():
    config = LoraConfig(r=4)
    assert dispatch_megatron(torch.nn.Linear(4, 4), "default", config) is None
    assert dispatch_megatron(torch.nn.Embedding(4, 4), "default", config) is None


@pytest.mark.parametrize(
    "case,expected",
    [
        ("no_group", "ColumnParallelLinear.tp_group is None"),
        ("missing_attribute", "no attribute 'input_is_parallel'"),
        ("wrong_weight", "weight has shape (3, 5)"),
    ],
)
def test_unreadable_parallel_state_gives_clear_error(spawned, case, expected):
    message = spawned(2)[0]["errors"][case]
    assert message.startswith("ParallelLayoutError: "), message
    assert expected in message
