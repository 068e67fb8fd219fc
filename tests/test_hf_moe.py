"""Expert, router, shared-expert and embedding adapters to and from Hugging Face PEFT names
(Mixtral: block_sparse_moe.experts.{i}.w1/w2/w3 and block_sparse_moe.gate; Qwen2-MoE:
mlp.experts.{i}.gate_proj/up_proj/down_proj, mlp.gate and mlp.shared_expert.*; both
model.embed_tokens as lora_embedding_A / _B), with experts numbered globally.

At each layout of checkpoint_checks.HF_MOE_LAYOUTS (EP=1, EP=2 and TP2+SP+EP2+ETP2) the same
logical adapter is exported, imported back and compared; a PEFT-made adapter (every module its
own A) is imported. At TP = EP = 1 the real transformers MixtralForCausalLM /
Qwen2MoeForCausalLM hold the same base weights and must give our logits: with the exported
adapter and with the PEFT-made one, loaded by real peft (Mixtral) or merged into the weights
by hand (Qwen2-MoE, which peft 0.21 cannot load with routed and shared experts both adapted:
huggingface/peft#3711). The same adapters, saved consolidated and as a megatron dist-checkpoint
at TP2+SP+EP2+ETP2, load at TP4+SP. See tests/checkpoint_checks.py.
"""

import pytest
import torch

from checkpoint_checks import HF_MOE_LAYOUTS, MOE_CHECKPOINT_PAIRS, NUM_EXPERTS
from gpt_checks import TINY_GPT, VARIANTS
from numerics import relative_error

FP32 = 1e-5
WORLD_OF = {layout_id: world for name, (_, layouts) in VARIANTS.items()
            for world, entries in layouts.items() for layout_id, *_ in entries}
REFERENCE_OF = {"mixtral": "alltoall-ep1", "qwen2_moe": "moe-shared-ep1"}
LAYOUTS = [pytest.param(layout_id, id=layout_id) for layout_id in HF_MOE_LAYOUTS]


def hf_checks(gpt_spawned, layout_id):
    return [rank_result.variants[layout_id].hf for rank_result in gpt_spawned(WORLD_OF[layout_id])]


def reference(gpt_spawned, layout_id):
    return gpt_spawned(1)[0].variants[REFERENCE_OF[HF_MOE_LAYOUTS[layout_id]]].hf


@pytest.mark.parametrize("layout_id", LAYOUTS)
def test_export_is_the_same_file_from_every_layout_and_imports_back_bit_exact(gpt_spawned, layout_id):
    expected = reference(gpt_spawned, layout_id)["exported"]
    for checks in hf_checks(gpt_spawned, layout_id):
        assert sorted(checks["exported"]) == sorted(expected)
        for key, tensor in expected.items():
            assert torch.equal(checks["exported"][key], tensor), key
        assert checks["round_trip_identical"]  # megatron -> PEFT -> megatron, bit for bit


@pytest.mark.parametrize("layout_id", LAYOUTS)
def test_a_peft_made_adapter_imports_with_the_same_logits_at_every_layout(gpt_spawned, layout_id):
    expected = reference(gpt_spawned, layout_id)
    logits = [c["hf_made_logits"] for c in hf_checks(gpt_spawned, layout_id) if c["hf_made_logits"] is not None]
    assert logits
    for value in logits:
        assert relative_error(value, expected["hf_made_logits"]) < FP32
    names = {n for c in hf_checks(gpt_spawned, layout_id) for n in c["hf_made_names"]}
    assert names == set(expected["hf_made_names"])  # every expert, by its global number


@pytest.mark.parametrize("architecture", ["mixtral", "qwen2_moe"])
def test_transformers_gives_our_logits_with_the_export_and_with_a_peft_made_adapter(gpt_spawned, architecture):
    checks = gpt_spawned(1)[0].variants[REFERENCE_OF[architecture]].hf
    assert relative_error(checks["hf_base_logits"], checks["base_logits"]) < FP32  # the converter
    assert relative_error(checks["logits"], checks["base_logits"]) > 1e-2  # the adapter matters
    assert relative_error(checks["hf_merged_export_logits"], checks["logits"]) < FP32
    assert relative_error(checks["hf_merged_hf-made_logits"], checks["hf_made_logits"]) < FP32
    if architecture == "mixtral":  # real peft reads the exported names and writes ours
        assert relative_error(checks["peft_export_logits"], checks["logits"]) < FP32
        assert relative_error(checks["peft_hf-made_logits"], checks["hf_made_logits"]) < FP32


@pytest.mark.parametrize("architecture", ["mixtral", "qwen2_moe"])
def test_exported_names_are_the_families_own(gpt_spawned, architecture):
    checks = gpt_spawned(1)[0].variants[REFERENCE_OF[architecture]].hf
    keys, last = set(checks["exported"]), TINY_GPT["num_layers"] - 1
    expert = NUM_EXPERTS - 1
    prefix = f"base_model.model.model.layers.{last}."
    if architecture == "mixtral":
        expected = [f"block_sparse_moe.experts.{expert}.{leaf}.lora_A.weight" for leaf in ("w1", "w2", "w3")]
        expected.append("block_sparse_moe.gate.lora_B.weight")
    else:
        expected = [f"mlp.experts.{expert}.{leaf}.lora_A.weight" for leaf in ("gate_proj", "up_proj", "down_proj")]
        expected += ["mlp.gate.lora_B.weight", "mlp.shared_expert.gate_proj.lora_A.weight",
                     "mlp.shared_expert.down_proj.lora_B.weight"]
    for name in expected:
        assert prefix + name in keys, name
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_B" in keys
    config = checks["export_config"]
    assert config["megatron_lora"]["hf_architecture"] == architecture
    assert "embed_tokens" in config["target_modules"] and "gate" in config["target_modules"]


@pytest.mark.parametrize("loading, saving", [pytest.param(k, v, id=f"{v}-to-{k}")
                                             for k, v in MOE_CHECKPOINT_PAIRS.items()])
def test_router_embedding_and_expert_adapters_load_at_another_layout(gpt_spawned, loading, saving):
    """Consolidated and megatron dist-checkpoint: saved at TP2+SP+EP2+ETP2, loaded at TP4+SP."""
    expected = reference(gpt_spawned, saving)["logits"]
    for rank_result in gpt_spawned(WORLD_OF[loading]):
        checks = rank_result.variants[loading].checkpoints
        assert checks["dist_changed"]  # the dist-checkpoint replaced other values
        for kind in ("consolidated_logits", "dist_logits"):
            if checks[kind] is not None:
                assert relative_error(checks[kind], expected) < FP32, kind
