"""Consolidated adapter checkpoints: saved at TP=2 + SP, loaded at TP=1, TP=4, PP=2, TP=2 + PP=2
and TP=2 + SP + PP=2 with the same logits; every broken adapter refused with the model untouched;
an atomic save that crashes half-way. See tests/checkpoint_checks.py."""

import pytest
import torch

from gpt_checks import LAYOUTS
from numerics import relative_error

LOAD_LAYOUTS = [pytest.param(world, layout, id=f"tp{layout[0]}-pp{layout[1]}{'-sp' if layout[2] else ''}")
                for world in (1, 2, 4) for layout in LAYOUTS[world]]



@pytest.mark.parametrize("world, layout", LOAD_LAYOUTS)
def test_adapter_saved_at_tp2_sp_loads_at_any_layout(saved, gpt_spawned, world, layout):
    expected = saved[0].random_logits
    loads = [rank_result.layouts[layout].load for rank_result in gpt_spawned(world)]
    logits = [load["random_logits"] for load in loads if load["random_logits"] is not None]
    assert logits, "no rank produced logits"
    for value in logits:
        assert relative_error(value, expected) < 1e-5
    assert all(load["name"] == "default" for load in loads)


@pytest.mark.parametrize("world, layout", LOAD_LAYOUTS)
@pytest.mark.parametrize("kind", ["dist_adapter", "dist_full"])
def test_dist_checkpoint_from_tp2_sp_loads_at_any_layout(saved, gpt_spawned, world, layout, kind):
    expected = saved[0].random_logits
    loads = [rank_result.layouts[layout].load for rank_result in gpt_spawned(world)]
    logits = [load[f"{kind}_logits"] for load in loads if load[f"{kind}_logits"] is not None]
    assert logits
    for value in logits:
        assert relative_error(value, expected) < 1e-5
    if kind == "dist_full":
        assert all(load["dist_full_changed"] for load in loads)  # the base was replaced too


def test_sharded_state_dict_keeps_base_keys_and_adds_lora_keys(saved):
    keys = saved[0].sharded_keys
    assert "decoder.layers.0.mlp.linear_fc1.weight" in keys  # no base_layer in base keys
    assert not any("base_layer" in key for key in keys)
    assert "decoder.layers.0.mlp.linear_fc1.lora_A.default.weight" in keys
    assert "output_layer.lora_B.default.weight" in keys


def test_saved_config_describes_adapter_layout_and_base(saved):
    header = saved[0].random_header
    assert header["format"] == "megatron_lora.adapter" and header["format_version"] == 1
    assert header["lora_config"]["r"] == 4 and header["lora_config"]["lora_alpha"] == 8.0
    assert header["trained_layout"]["tensor_model_parallel_size"] == 2
    assert header["trained_layout"]["sequence_parallel"] is True
    base = header["base_model"]
    assert (base["num_layers"], base["hidden_size"], base["num_attention_heads"],
            base["num_query_groups"], base["ffn_hidden_size"], base["gated_linear_unit"],
            base["vocab_size"]) == (4, 64, 8, 4, 96, True, 128)
    assert len(header["modules"]) == 17 and len(header["weights_sha256"]) == 64


def test_overfit_at_tp2_sp_then_greedy_generation_at_tp1(saved, gpt_spawned):
    losses, norms = saved[0].overfit_losses, saved[0].overfit_norms
    assert losses[-1] <= 0.3 * losses[0], losses
    assert norms[-1] <= 0.3 * norms[0], norms
    load = gpt_spawned(1)[0].layouts[(1, 1, False)].load
    assert torch.equal(load["sequence"], saved[0].sequence)
    assert torch.equal(load["generated"], load["sequence"])  # prompt 4 tokens, 13 generated


EXPECTED_ERRORS = {
    "missing_key": "missing key 'decoder.layers.1.mlp.linear_fc1.lora_A.weight'",
    "extra_key": "extra key(s) ['decoder.layers.9.mlp.linear_fc1.lora_A.weight'",
    "wrong_shape": "decoder.layers.1.mlp.linear_fc1.lora_A.weight: shape [4, 72] in the file, "
                   "[4, 64] expected",
    "tp_does_not_divide": "decoder.layers.2.mlp.linear_fc2.lora_A.weight: dimension 1 of shape "
                          "[4, 97] cannot be split evenly over tensor-parallel size 2",
    "integer_dtype": "dtype I32 is not a floating-point factor dtype",
    "format_version": "format_version 99 is not supported",
    "other_base": "base_model.hidden_size is 128, but the tensors say 64 "
                  "(decoder.layers.0.mlp.linear_fc1.lora_A.weight has shape [4, 64])",
    "shape_against_description": "base_model.hidden_size is 64, but the tensors say 72",
    "rank_edited": "lora_config.r is 2, but the tensors say 4",
    "truncated": "is truncated, corrupt or from another save",
    "corrupt": "is truncated, corrupt or from another save",
    "truncated_checked": "cannot be read as safetensors",
    "not_safetensors": "cannot be read as safetensors",
    "not_adapter": "is not an adapter directory: adapter_config.json is missing",
    "missing_directory": "is not an adapter directory",
}


@pytest.mark.parametrize("case", sorted(EXPECTED_ERRORS))
def test_broken_adapter_is_refused_and_the_model_untouched(saved, case):
    for rank_result in saved:  # every rank raises, and no rank changed anything
        message = rank_result.errors[case]
        assert message is not None, f"{case} was loaded"
        assert EXPECTED_ERRORS[case] in message
        assert rank_result.untouched[case]


def test_a_file_with_modules_the_model_adapter_lacks_is_refused_untouched(saved):
    """The whole adapter into a model whose "default" adapts only linear_fc1: it used to copy
    layer 0's fc1 and then raise a KeyError."""
    for rank_result in saved:
        message, untouched = rank_result.coverage["more_in_file"]
        assert message is not None and untouched
        assert "module(s) in the file are not adapted by the model's adapter 'default'" in message
        assert "decoder.layers.0.mlp.linear_fc2" in message and "random:" in message


def test_a_file_with_fewer_modules_is_refused_unless_allow_subset(saved):
    for rank_result in saved:
        coverage = rank_result.coverage
        message, untouched = coverage["fewer_in_file"]
        assert message is not None and untouched
        assert "13 module(s) adapted by the model's adapter 'default' have no factors in the " \
               "file: decoder.layers.0.mlp.linear_fc2" in message
        assert "allow_subset=True" in message
        assert coverage["subset_name"] == "default"
        fc1 = [f"decoder.layers.{i}.mlp.linear_fc1" for i in range(4)]
        assert coverage["subset_loaded"] == fc1  # the file's modules now hold its factors
        assert len(coverage["subset_kept"]) == 13 and not set(fc1) & set(coverage["subset_kept"])
    logs = [rank_result.coverage["subset_log"] for rank_result in saved]
    assert len(logs[0]) == 1 and logs[1:] == [[]]  # rank 0 says which modules kept theirs
    assert "13 module(s) keep their current factors: decoder.layers.0.mlp.linear_fc2" in logs[0][0]


def test_a_good_adapter_still_loads_after_refusals(saved):
    for rank_result in saved:
        assert relative_error(rank_result.reloaded_logits, rank_result.random_logits) == 0.0


def test_a_save_rank_0_cannot_write_raises_on_every_rank(saved):
    errors = [rank_result.refused_save for rank_result in saved]
    assert len(errors) == 2 and all(error and "is not a directory" in error for error in errors)


def test_crash_during_save_leaves_the_previous_adapter(saved):
    crash = saved[0].crash
    assert crash["error"] == "simulated crash during save"
    assert crash["previous_intact"] and crash["still_loads"] == 1
    assert crash["leftovers"] == []


@pytest.mark.parametrize("world, layout", LOAD_LAYOUTS)
def test_resave_and_peft_export_are_bit_identical_from_any_layout(gpt_spawned, world, layout):
    for rank_result in gpt_spawned(world):
        load = rank_result.layouts[layout].load
        assert load["resave_identical"] and load["reexport_identical"]
        assert load["peft_round_trip_identical"]  # megatron -> PEFT -> megatron, bit for bit


@pytest.mark.parametrize("world, layout", LOAD_LAYOUTS)
def test_peft_import_of_the_export_gives_the_same_logits(saved, gpt_spawned, world, layout):
    expected = saved[0].random_logits
    for rank_result in gpt_spawned(world):
        logits = rank_result.layouts[layout].load["peft_import_logits"]
        if logits is not None:
            assert relative_error(logits, expected) < 1e-5


def test_transformers_and_peft_read_the_export(saved, gpt_spawned):
    load = gpt_spawned(1)[0].layouts[(1, 1, False)].load
    assert relative_error(load["hf_base_logits"], load["megatron_base_logits"]) < 1e-5  # the converter
    assert relative_error(load["peft_logits"], saved[0].random_logits) < 1e-5  # PeftModel vs TP=2+SP
    assert relative_error(load["peft_logits"], load["hf_base_logits"]) > 1e-3  # the adapter matters


def test_a_peft_made_adapter_imports_exactly(gpt_spawned):
    load = gpt_spawned(1)[0].layouts[(1, 1, False)].load
    assert relative_error(load["native_peft_logits"], load["hf_base_logits"]) > 1e-3
    assert relative_error(load["native_imported_logits"], load["native_peft_logits"]) < 1e-5


def test_fc1_b_is_saved_as_gate_all_then_up_all(saved, gpt_spawned):
    """Fails if fc1's B were gathered or sliced contiguously (gate and up of ranks mixed)."""
    name = "decoder.layers.1.mlp.linear_fc1"
    tp1_b = gpt_spawned(1)[0].layouts[(1, 1, False)].parity["factors"][name][1]  # the same adapter
    for rank_result in saved:
        fc1 = rank_result.fc1
        assert torch.equal(fc1["saved_b"], tp1_b)
        assert fc1["gate_up_slice"] and not fc1["contiguous_slice"]


@pytest.mark.parametrize("world", [1, 4])
def test_expert_adapters_saved_at_ep2_load_at_ep1_and_ep4(saved, gpt_spawned, world):
    saved_moe = saved[0].moe
    names = {n for rank_result in saved for n in rank_result.moe["names"]}
    assert len(names) == 4 * (1 + 4 * 2)  # per layer: qkv + 4 experts x (fc1, fc2), global numbers
    assert "decoder.layers.3.mlp.experts.local_experts.3.linear_fc2" in names
    assert relative_error(saved_moe["logits"], saved_moe["base_logits"]) > 1e-3  # the adapter matters
    for rank_result in gpt_spawned(world):
        loaded = rank_result.moe
        assert relative_error(loaded["logits"], saved_moe["logits"]) < 1e-5
    loaded_names = {n for rank_result in gpt_spawned(world) for n in rank_result.moe["names"]}
    assert loaded_names == names
