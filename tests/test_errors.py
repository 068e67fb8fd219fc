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
    message = spawned(2)[0].errors[case]
    assert message.startswith("ParallelLayoutError: "), message
    assert expected in message


# --- one base class: what the scripts and the CLI report as one line ----------------------------


def test_every_user_error_is_a_megatron_lora_error():
    from megatron_lora import AdapterError, MegatronLoraError, ParallelLayoutError
    from megatron_lora.adapter_file import AdapterCheckpointError
    from megatron_lora.data import DataError
    from megatron_lora.experiment import ExperimentConfigError
    from megatron_lora.interop import InteropError
    from megatron_lora.training import TrainingError

    for error in (AdapterError, AdapterCheckpointError, DataError, ExperimentConfigError,
                  InteropError, LoraConfigError, ParallelLayoutError, TrainingError):
        assert issubclass(error, MegatronLoraError), error
    assert issubclass(MegatronLoraError, ValueError)  # callers catching ValueError keep working


def _failing(error):
    def fail(*args, **kwargs):
        raise error

    return fail


@pytest.mark.parametrize("bug", [ValueError("a bug"), RuntimeError("a bug")])
def test_a_bug_in_the_training_script_keeps_its_traceback(monkeypatch, bug):
    import megatron_lora.training as training

    monkeypatch.setattr(training.launch, "parse_arguments", _failing(bug))
    with pytest.raises(type(bug), match="a bug"):
        training.main(["--train-iters", "1"], mode="finetune")


def test_a_user_error_in_the_training_script_is_one_line(monkeypatch, capsys):
    import megatron_lora.training as training
    from megatron_lora import AdapterError

    user_error = AdapterError("no such target")
    monkeypatch.setattr(training.launch, "parse_arguments", _failing(user_error))
    assert training.main(["--train-iters", "1"], mode="finetune") == 2
    assert capsys.readouterr().err == "finetune_gpt.py: error: no such target\n"


@pytest.mark.parametrize("bug", [ValueError("a bug"), KeyError("a bug")])
def test_a_bug_in_the_cli_keeps_its_traceback(monkeypatch, bug):
    import megatron_lora.cli as cli

    monkeypatch.setattr(cli, "_run", _failing(bug))
    with pytest.raises(type(bug), match="a bug"):
        cli.main(["inspect", "somewhere"])
