"""YAML experiment configs: shipped files load, overrides apply, and every mistake is named."""

import re
from pathlib import Path

import pytest
import torch
import yaml

from megatron_lora.experiment import (
    ExperimentConfig,
    ExperimentConfigError,
    LoraConfig,
    load_experiment,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = {  # file -> a world size it runs on, and the data-parallel size that gives
    "cpu_demo.yaml": (2, 1),
    "llama3_8b_tp4_sp.yaml": (8, 2),
    "llama3_70b_tp8_sp_pp2.yaml": (32, 2),
}


def small(**megatron):
    """A valid experiment dict, with megatron_config keys replaced (None removes one)."""
    base = {
        "tensor_model_parallel_size": 2,
        "num_layers": 4,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "ffn_hidden_size": 128,
        "vocab_size": 256,
        "seq_length": 32,
    }
    base.update(megatron)
    return {"megatron_config": {k: v for k, v in base.items() if v is not None}}


def raises(match):
    return pytest.raises(ExperimentConfigError, match=match)


def fails(match, **megatron):
    with raises(match):
        load_experiment(data=small(**megatron))


def write(tmp_path, content, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


# ---------------------------------------------------------------- shipped configs


def test_every_config_file_is_tested():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_loads_and_builds(name):
    world, dp = SHIPPED[name]
    config = load_experiment(CONFIGS / name, world_size=world)
    assert config.source == str(CONFIGS / name)
    assert config.check_world_size(world) == dp
    assert config.sequence_parallel and config.tensor_model_parallel_size > 1
    assert config.lora.target_modules == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]

    tc = config.transformer_config(use_cpu_initialization=True, perform_initialization=False)
    assert tc.tensor_model_parallel_size == config.tensor_model_parallel_size
    assert tc.pipeline_model_parallel_size == config.pipeline_model_parallel_size
    assert tc.sequence_parallel and tc.gated_linear_unit
    assert tc.activation_func is torch.nn.functional.silu
    assert tc.params_dtype == tc.pipeline_dtype == config.params_dtype
    assert tc.bf16 == (config.params_dtype is torch.bfloat16)
    assert tc.normalization == "RMSNorm" and not tc.add_bias_linear
    assert tc.use_cpu_initialization and not tc.perform_initialization

    # to_dict is plain data that loads back to the same config
    again = load_experiment(data=yaml.safe_load(yaml.safe_dump(config.to_dict())))
    assert again.to_dict() == config.to_dict()


def test_cpu_demo_values():
    config = load_experiment(CONFIGS / "cpu_demo.yaml")
    m = config.megatron_config
    shape = (m["num_layers"], m["hidden_size"], m["ffn_hidden_size"], config.vocab_size)
    assert shape == (4, 128, 352, 512)
    assert config.lora == LoraConfig(
        r=8, lora_alpha=16, target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    )
    assert config.training["lr"] == pytest.approx(1e-3)
    assert config.training["lr_decay_style"] == "cosine"


def test_llama_shapes():
    m8 = load_experiment(CONFIGS / "llama3_8b_tp4_sp.yaml").megatron_config
    assert (m8["num_layers"], m8["hidden_size"], m8["ffn_hidden_size"]) == (32, 4096, 14336)
    assert (m8["rotary_base"], m8["layernorm_epsilon"]) == (500000, 1e-5)
    assert m8["params_dtype"] == "bfloat16"
    m70 = load_experiment(CONFIGS / "llama3_70b_tp8_sp_pp2.yaml").megatron_config
    assert (m70["num_layers"], m70["hidden_size"], m70["num_query_groups"]) == (80, 8192, 8)
    assert (m70["tensor_model_parallel_size"], m70["pipeline_model_parallel_size"]) == (8, 2)


# ---------------------------------------------------------------- defaults and conversions


def test_defaults_are_llama_like():
    data = small(num_query_groups=None, ffn_hidden_size=None)
    config = load_experiment(data=data)
    m = config.megatron_config
    assert m["num_query_groups"] == 4 and m["ffn_hidden_size"] == 4 * 64
    assert (m["normalization"], m["add_bias_linear"]) == ("RMSNorm", False)
    assert m["activation"] == "swiglu"
    assert (m["position_embedding_type"], m["rotary_base"], config.seed) == ("rope", 10000, 1234)
    assert config.params_dtype is torch.float32
    assert config.lora == LoraConfig() and config.training == {} and config.source is None
    assert config.expert_tensor_parallel_size == config.tensor_model_parallel_size == 2
    assert data == small(num_query_groups=None, ffn_hidden_size=None)  # input untouched


def test_gelu_is_ungated_unless_asked():
    tc = load_experiment(data=small(activation="gelu")).transformer_config()
    assert tc.activation_func is torch.nn.functional.gelu and not tc.gated_linear_unit
    tc = load_experiment(data=small(activation="gelu", gated_linear_unit=True)).transformer_config()
    assert tc.gated_linear_unit


def test_floats_written_without_a_dot_are_numbers(tmp_path):
    # plain YAML 1.1 reads 1e-5 as a string
    text = yaml.safe_dump(small()) + "training:\n  lr: 3e-4\n"
    text = text.replace("num_layers: 4", "num_layers: 4\n  layernorm_epsilon: 1e-6")
    path = write(tmp_path, text)
    config = load_experiment(path)
    assert config.megatron_config["layernorm_epsilon"] == 1e-6 and config.training["lr"] == 3e-4


def test_enum_and_tuple_fields_round_trip():
    config = load_experiment(data=small(attention_backend="local", window_size=[8, 0]))
    assert config.megatron_config["window_size"] == [8, 0]
    yaml.safe_dump(config.to_dict())
    tc = config.transformer_config()
    assert tc.attention_backend.name == "local" and tc.window_size == (8, 0)


# ---------------------------------------------------------------- overrides


def test_overrides_nested_dict():
    config = load_experiment(
        data=small(),
        overrides={
            "megatron_config": {"tensor_model_parallel_size": 4, "num_query_groups": 4},
            "lora": {"r": 4},
        },
    )
    assert config.tensor_model_parallel_size == 4 and config.lora.r == 4
    assert config.megatron_config["num_query_groups"] == 4


def test_overrides_dotted_dict(tmp_path):
    path = write(tmp_path, small())
    config = load_experiment(
        path, {"megatron_config.sequence_parallel": True, "training.optimizer.name": "adam"}
    )
    assert config.sequence_parallel and config.training == {"optimizer": {"name": "adam"}}


def test_overrides_key_value_strings(tmp_path):
    path = write(tmp_path, small())
    config = load_experiment(
        path,
        [
            "megatron_config.sequence_parallel=true",
            "megatron_config.params_dtype=bfloat16",
            "lora.target_modules=[linear_qkv, linear_proj]",
            "lora.lora_alpha = 32",
        ],
    )
    assert config.sequence_parallel and config.params_dtype is torch.bfloat16
    assert config.lora.target_modules == ["linear_qkv", "linear_proj"]
    assert config.lora.lora_alpha == 32


def test_overrides_are_validated():
    overrides = [
        "megatron_config.tensor_model_parallel_size=1",
        "megatron_config.sequence_parallel=true",
    ]
    with raises("sequence_parallel=true needs tensor_model_parallel_size > 1"):
        load_experiment(data=small(), overrides=overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["lora.r"], "is not key=value"),
        (["lora.r=[1"], "value of override 'lora.r=\\[1' is not valid YAML"),
        ("lora.r=4", "must be a dict or a list"),
        ({"lora..r": 4}, "is not a dotted name"),
        ({"lora.r.x": 4}, "lora.r is not a mapping"),
    ],
)
def test_bad_overrides(overrides, match):
    data = small()
    data["lora"] = {"r": 8}
    with raises(match):
        load_experiment(data=data, overrides=overrides)


# ---------------------------------------------------------------- unknown keys


def test_unknown_section_with_path(tmp_path):
    data = small()
    data["lorra"] = {}
    path = write(tmp_path, data)
    with raises(re.escape(f"{path}: 'lorra' is not a known section; did you mean 'lora'?")):
        load_experiment(path)


def test_unknown_megatron_key_did_you_mean(tmp_path):
    path = write(tmp_path, small(tensor_model_paralel_size=2))
    message = (
        "megatron_config.tensor_model_paralel_size is not a known key; "
        "did you mean 'tensor_model_parallel_size'?"
    )
    with raises(re.escape(f"{path}: {message}")):
        load_experiment(path)


def test_did_you_mean_prefers_common_keys():
    fails("num_heads is not a known key; did you mean 'num_attention_heads'", num_heads=4)


def test_unknown_section_lists_sections():
    with raises("'model' is not a known section; valid sections: megatron_config, lora, training"):
        load_experiment(data={**small(), "model": {}})


def test_unknown_megatron_key_lists_valid_keys():
    fails(
        r"megatron_config.zzz is not a known key; valid keys: num_layers, .*vocab_size.*"
        r"sequence_parallel.*any field of megatron-core's TransformerConfig",
        zzz=1,
    )


def test_unknown_lora_key():
    data = small()
    data["lora"] = {"r": 8, "lora_alpah": 16}
    with raises("lora.lora_alpah is not a known key; did you mean 'lora_alpha'"):
        load_experiment(data=data)
    data["lora"] = {"rank": 8}
    with raises("lora.rank is not a known key; did you mean 'r'"):
        load_experiment(data=data)


def test_lora_value_errors_are_wrapped(tmp_path):
    data = small()
    data["lora"] = {"r": 0}
    path = write(tmp_path, data)
    with raises(re.escape(f"{path}: lora: LoraConfig.r=0 is invalid")):
        load_experiment(path)


# ---------------------------------------------------------------- types and values


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("num_layers", "4", r"megatron_config.num_layers must be an integer, got '4' \(str\)"),
        ("num_layers", True, r"megatron_config.num_layers must be an integer, got True \(bool\)"),
        ("num_layers", 4.0, r"megatron_config.num_layers must be an integer, got 4.0 \(float\)"),
        ("sequence_parallel", 1, r"sequence_parallel must be true or false, got 1 \(int\)"),
        ("hidden_dropout", "x", r"megatron_config.hidden_dropout must be a number, got 'x'"),
        ("normalization", "rms", r"normalization must be one of 'LayerNorm', 'RMSNorm', got 'rms'"),
        ("expert_tensor_parallel_size", "2", r"must be null or an integer, got '2'"),
        ("num_layers", 0, r"megatron_config.num_layers must be > 0, got 0"),
        ("rotary_percent", 1.5, r"rotary_percent must be in \(0, 1\], got 1.5"),
    ],
)
def test_bad_types_and_values(key, value, match):
    fails(match, **{key: value})


def test_bad_params_dtype():
    fails(
        r"params_dtype must be one of 'float32', 'bfloat16', 'float16', got 'fp8' \(str\)",
        params_dtype="fp8",
    )
    fails(r"params_dtype must be one of .*, got 16 \(int\)", params_dtype=16)


def test_bad_activation():
    fails(
        r"activation must be one of 'swiglu', 'gelu', 'silu', 'relu', 'squared_relu', got 'geglu'",
        activation="geglu",
    )
    fails(r"'swiglu' is gated; gated_linear_unit: false contradicts it", gated_linear_unit=False)


@pytest.mark.parametrize(
    "key, match",
    [
        ("activation_func", r"activation_func cannot be set in YAML: use `activation: swiglu`"),
        ("bf16", r"megatron_config.bf16 cannot be set in YAML: use `params_dtype: bfloat16`"),
        ("pipeline_dtype", r"pipeline_dtype cannot be set in YAML: it always equals"),
        ("init_method", r"init_method cannot be set in YAML: use `init_method_std`"),
        ("autocast_dtype", r"autocast_dtype cannot be set in YAML: it takes a Python object"),
        ("finalize_model_grads_func", r"finalize_model_grads_func cannot be set in YAML"),
    ],
)
def test_rejected_callable_fields(key, match):
    fails(match, **{key: "x"})


def test_missing_required_keys():
    fails(
        r"megatron_config is missing required key\(s\): num_layers, vocab_size",
        num_layers=None,
        vocab_size=None,
    )


def test_missing_megatron_section():
    with raises("the required section megatron_config is missing"):
        load_experiment(data={"lora": {"r": 4}})


def test_training_must_be_a_mapping():
    data = small()
    data["training"] = [1, 2]
    with raises("training must be a mapping"):
        load_experiment(data=data)


# ---------------------------------------------------------------- layout consistency


TP = "tensor_model_parallel_size"
NOT_DIVISIBLE = r"{} \({}\) is not divisible by {} \({}\)"


@pytest.mark.parametrize(
    "megatron, match",
    [
        ({TP: 1, "sequence_parallel": True},
         r"sequence_parallel=true needs tensor_model_parallel_size > 1 \(got 1\)"),
        ({TP: 4, "num_attention_heads": 6, "hidden_size": 96},
         NOT_DIVISIBLE.format("num_attention_heads", 6, TP, 4)),
        ({"num_query_groups": 1},
         NOT_DIVISIBLE.format("num_query_groups", 1, TP, 2) + "; each tensor-parallel rank"),
        ({TP: 1, "num_query_groups": 8},
         NOT_DIVISIBLE.format("num_attention_heads", 4, "num_query_groups", 8)),
        ({"hidden_size": 66},
         NOT_DIVISIBLE.format("hidden_size", 66, "num_attention_heads", 4) + "; or set kv_ch"),
        ({TP: 4, "num_query_groups": 4, "hidden_size": 66, "kv_channels": 16},
         NOT_DIVISIBLE.format("hidden_size", 66, TP, 4)),
        ({"ffn_hidden_size": 129}, NOT_DIVISIBLE.format("ffn_hidden_size", 129, TP, 2)),
        ({"vocab_size": 255},
         NOT_DIVISIBLE.format("vocab_size", 255, TP, 2) + "; set make_vocab_size_divisible_by"),
        ({"vocab_size": 1001, "make_vocab_size_divisible_by": 5},
         r"vocab_size \(1001, padded to 1005\) is not divisible by " + TP + r" \(2\)"),
        ({"num_layers": 3, "pipeline_model_parallel_size": 2},
         NOT_DIVISIBLE.format("num_layers", 3, "pipeline_model_parallel_size", 2)),
        ({"expert_model_parallel_size": 2},
         r"expert_model_parallel_size=2 needs a mixture-of-experts model; set num_moe_experts"),
        ({"num_moe_experts": 6, "expert_model_parallel_size": 4},
         NOT_DIVISIBLE.format("num_moe_experts", 6, "expert_model_parallel_size", 4)),
        ({"num_moe_experts": 4, "moe_ffn_hidden_size": 33},
         r"the expert ffn size \(33\) is not divisible by the expert tensor-parallel size \(2\)"),
        ({"context_parallel_size": 2},
         r"context_parallel_size=2: context parallelism is not supported"),
    ],
)
def test_layout_errors(megatron, match):
    fails(match, **megatron)


def test_a_padded_vocabulary_is_the_same_at_every_tp_size():
    for tp in (1, 2, 4):
        config = load_experiment(data=small(
            vocab_size=1001, make_vocab_size_divisible_by=128, tensor_model_parallel_size=tp,
            num_query_groups=4))
        assert (config.vocab_size, config.padded_vocab_size) == (1001, 1024)


def test_world_size_checks(tmp_path):
    path = write(tmp_path, small(pipeline_model_parallel_size=2))
    config = load_experiment(path)
    assert config.check_world_size(8) == 2
    message = (
        "tensor_model_parallel_size (2) x pipeline_model_parallel_size (2) = 4 "
        "does not divide the world size 6"
    )
    with raises(re.escape(f"{path}: {message}")):
        config.check_world_size(6)
    with raises(re.escape(message)):
        load_experiment(path, world_size=6)
    with raises("world size must be a positive integer, got 0"):
        config.check_world_size(0)


def test_world_size_checks_the_expert_grid():
    config = load_experiment(
        data=small(tensor_model_parallel_size=1, num_moe_experts=8, expert_model_parallel_size=4)
    )
    assert config.check_world_size(4) == 4
    message = (
        "expert_tensor_parallel_size (1) x expert_model_parallel_size (4) x "
        "pipeline_model_parallel_size (1) = 4 does not divide the world size 6"
    )
    with raises(re.escape(message)):
        config.check_world_size(6)


def test_megatron_errors_are_wrapped(tmp_path):
    # only megatron-core knows that full recompute needs a recompute_method
    path = write(tmp_path, small(recompute_granularity="full"))
    config = load_experiment(path)
    with raises(re.escape(f"{path}: megatron-core's TransformerConfig rejects") + ".*recompute"):
        config.transformer_config()


FULL = dict(recompute_granularity="full")


@pytest.mark.parametrize("settings, message", [
    (dict(FULL, recompute_method="block", recompute_num_layers=5),
     "recompute_num_layers=5 must be between 1 and the 4 layers of a pipeline stage"),
    (dict(FULL, recompute_method="block", recompute_num_layers=0),
     "recompute_num_layers=0 must be between 1 and the 4 layers"),
    (dict(FULL, recompute_method="block", recompute_num_layers=3, pipeline_model_parallel_size=2),
     "recompute_num_layers=3 must be between 1 and the 2 layers of a pipeline stage"),
    (dict(FULL, recompute_method="uniform", recompute_num_layers=3),
     "recompute_num_layers=3 does not divide the 4 layers of a pipeline stage, which "
     "recompute_method 'uniform' needs"),
    (dict(recompute_granularity="selective", recompute_modules=["core_attn", "layernorm"]),
     "recompute_modules: 'layernorm' is refused: megatron-core's CheckpointWithoutOutput"),
    (dict(recompute_granularity="selective", recompute_modules=["moe_act"]),
     "recompute_modules: 'moe_act' is refused"),
    (dict(FULL, recompute_method="block", recompute_num_layers=1, fp8="hybrid"),
     "recompute_granularity='full' with fp8: megatron then recomputes through "
     "TransformerEngine's te_checkpoint"),
    (dict(recompute_granularity="fulll"), "recompute_granularity must be null or one of"),
    (dict(FULL, recompute_method="blocks"), "recompute_method must be null or one of"),
])
def test_recompute_settings_lora_is_not_proven_with_are_refused(settings, message):
    with pytest.raises(ExperimentConfigError) as error:
        load_experiment(data=small(**settings))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("settings", [
    dict(FULL, recompute_method="uniform", recompute_num_layers=2),
    dict(FULL, recompute_method="block", recompute_num_layers=4),
    dict(FULL, recompute_method="uniform", recompute_num_layers=1,
         distribute_saved_activations=True, sequence_parallel=False),
    dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
])
def test_recompute_settings_proven_exact_are_accepted(settings):
    config = load_experiment(data=small(**settings)).transformer_config()
    assert config.recompute_granularity == settings["recompute_granularity"]


# ---------------------------------------------------------------- reading files


def test_path_and_data_are_exclusive(tmp_path):
    with raises("exactly one of path= and data="):
        load_experiment(write(tmp_path, small()), data=small())
    with raises("exactly one of path= and data="):
        load_experiment()


def test_non_mapping_yaml(tmp_path):
    path = write(tmp_path, "- megatron_config\n- lora\n")
    with raises(re.escape(f"{path}: the experiment config") + ".*must be a mapping"):
        load_experiment(path)
    empty = write(tmp_path, "# nothing\n", "empty.yaml")
    with raises(re.escape(f"{empty}: the file is empty")):
        load_experiment(empty)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "megatron_config:\n  num_layers: [4\n  hidden_size: 64\n")
    with raises(re.escape(f"{path}: the file is not valid YAML") + "(?s:.*)line 3"):
        load_experiment(path)


def test_yaml_objects_are_refused(tmp_path):
    path = write(tmp_path, "megatron_config: !!python/object/apply:os.system ['true']\n")
    with raises("is not valid YAML"):
        load_experiment(path)


def test_experiment_config_is_exported_from_the_package():
    import megatron_lora
    from megatron_lora.errors import MegatronLoraError

    assert megatron_lora.ExperimentConfig is ExperimentConfig
    assert megatron_lora.load_experiment is load_experiment
    assert issubclass(ExperimentConfigError, MegatronLoraError)


def test_the_config_records_which_sections_it_was_given(tmp_path):
    # the training scripts start from a lora: section only when the file has one
    plain = load_experiment(write(tmp_path, yaml.safe_dump(small())))
    assert plain.sections == ("megatron_config",) and plain.lora == LoraConfig()
    given = load_experiment(data={**small(), "lora": {"r": 4}, "training": None})
    assert given.sections == ("megatron_config", "lora") and given.lora.r == 4
