"""The Hugging Face name table in-process (no spawn): refusals with the reason, an imported
adapter's per-module ranks, and rank_pattern itself."""

import pytest
import torch

from megatron_lora import LoraConfig
from megatron_lora.config import LoraConfigError
from megatron_lora.interop import (InteropError, check_architecture, check_peft_against_model,
                                   hf_to_megatron_factors, megatron_to_hf_factors, peft_modules,
                                   shape_from_description)

MOE = dict(num_layers=2, hidden_size=16, num_attention_heads=4, num_query_groups=2,
           ffn_hidden_size=24, gated_linear_unit=True, num_moe_experts=4, vocab_size=32)
SHARED = dict(MOE, moe_shared_expert_intermediate_size=8)
PEFT = "base_model.model."


def factors(r, out, inp, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=generator), torch.randn(out, r, generator=generator)


def test_the_architecture_must_fit_the_model():
    assert check_architecture(None, shape_from_description(MOE)) == "mixtral"
    assert check_architecture(None, shape_from_description(SHARED)) == "qwen2_moe"
    with pytest.raises(InteropError, match="'mixtral' has no shared expert.*use 'qwen2_moe'"):
        check_architecture("mixtral", shape_from_description(SHARED))
    with pytest.raises(InteropError, match="'llama' has no experts"):
        check_architecture("llama", shape_from_description(MOE))
    with pytest.raises(InteropError, match=r"'gpt_oss' is not one of \['llama', 'mixtral', 'qwen2_moe', 'qwen3_moe'\]"):
        check_architecture("gpt_oss", shape_from_description(MOE))


def test_a_module_without_a_counterpart_is_named():
    a, b = factors(2, 16, 16, 0)
    tensors = {"decoder.layers.0.self_attention.linear_q_down_proj.lora_A.weight": a,
               "decoder.layers.0.self_attention.linear_q_down_proj.lora_B.weight": b}
    with pytest.raises(InteropError, match="linear_q_down_proj has no counterpart in Hugging Face "
                                           "'mixtral' models"):
        megatron_to_hf_factors(tensors, shape_from_description(MOE))


def peft_file(modules):
    tensors = {}
    for index, (module, (out, inp)) in enumerate(modules.items()):
        a, b = factors(2, out, inp, index)
        kind = ("lora_embedding_A", "lora_embedding_B") if module.endswith("embed_tokens") \
            else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PEFT}{module}.{kind[0]}"], tensors[f"{PEFT}{module}.{kind[1]}"] = a, b
    return tensors


def check(modules, description=MOE, targets=None):
    tensors = peft_file(modules)
    config = {"r": 2, "lora_alpha": 4, "target_modules": targets or ["x"]}
    check_peft_against_model(config, peft_modules(tensors, "f"), shape_from_description(description),
                             "adapter", "this model")
    return config, tensors


def test_wrong_files_are_refused_with_what_differs():
    experts = "model.layers.0.block_sparse_moe.experts"
    with pytest.raises(InteropError, match="num_moe_experts is 4 there, but the adapter has expert 7"):
        check({f"{experts}.7.w2": (16, 24)})
    with pytest.raises(InteropError, match=r"moe_ffn_hidden_size is 24 there, but "
                                           r".*experts\.0\.w2\.lora_A\.weight has shape \[2, 20\]"):
        check({f"{experts}.0.w2": (16, 20)})
    with pytest.raises(InteropError, match="needs num_moe_experts, which that model does not set"):
        check({f"{experts}.0.w2": (16, 24)}, description=dict(MOE, num_moe_experts=None))
    with pytest.raises(InteropError, match="has lora_A/B factors, but it is an embedding"):
        tensors = {f"{PEFT}model.embed_tokens.lora_A.weight": torch.zeros(2, 32),
                   f"{PEFT}model.embed_tokens.lora_B.weight": torch.zeros(16, 2)}
        check_peft_against_model({}, peft_modules(tensors, "f"), shape_from_description(MOE), "adapter", "m")
    with pytest.raises(InteropError, match=r"missing key .*layers\.1\.block_sparse_moe\.gate\.lora_A"):
        check({"model.layers.0.block_sparse_moe.gate": (4, 16)}, targets=["gate"])
    with pytest.raises(InteropError, match="mixes module names of"):
        check({"model.layers.0.block_sparse_moe.gate": (4, 16), "model.layers.0.mlp.gate": (4, 16)},
              targets=["gate"])


def test_fused_partners_must_come_together():
    config, tensors = check({"model.layers.0.mlp.experts.1.gate_proj": (24, 16)})
    with pytest.raises(InteropError, match=r"PEFT adapts \['gate_proj'\]; megatron's fused "
                                           r"linear_fc1 needs \['gate_proj', 'up_proj'\] together"):
        hf_to_megatron_factors(config, {k[len(PEFT):]: v for k, v in tensors.items()},
                               shape_from_description(MOE))


def test_import_gives_each_module_the_rank_its_group_needs():
    modules = {"model.layers.0.mlp.experts.1.gate_proj": (24, 16),
               "model.layers.0.mlp.experts.1.up_proj": (24, 16),
               "model.layers.0.mlp.experts.1.down_proj": (16, 24),
               "model.layers.0.mlp.gate": (4, 16), "model.embed_tokens": (16, 32)}
    config, tensors = check(modules, description=SHARED)
    out, lora = hf_to_megatron_factors(config, {k[len(PEFT):]: v for k, v in tensors.items()},
                                       shape_from_description(SHARED))
    fc1 = "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1"
    assert lora["r"] == 2 and lora["rank_pattern"] == {fc1: 4}  # gate and up A's stacked
    assert out[fc1 + ".lora_A.weight"].shape == (4, 16)
    assert out["embedding.word_embeddings.lora_A.weight"].shape == (2, 32)  # [r, vocab]
    lora_config = LoraConfig(**lora)
    assert lora_config.rank_for(fc1) == 4 and lora_config.scaling_for(fc1) == 1.0
    assert lora_config.rank_for("decoder.layers.0.mlp.router") == 2
    # each part's delta is unchanged: s_hf · B A = s · [B_gate; B_up] [A_gate; A_up] rows
    a, b = out[fc1 + ".lora_A.weight"], out[fc1 + ".lora_B.weight"]
    gate_a = tensors[f"{PEFT}model.layers.0.mlp.experts.1.gate_proj.lora_A.weight"]
    gate_b = tensors[f"{PEFT}model.layers.0.mlp.experts.1.gate_proj.lora_B.weight"]
    assert torch.allclose(1.0 * (b @ a)[:24], 2.0 * gate_b @ gate_a, atol=1e-6)


def test_rank_pattern_is_validated_and_matches_like_targets():
    config = LoraConfig(r=16, rank_pattern={"router": 4, "re:.*experts.*": 8})
    assert config.rank_for("decoder.layers.3.mlp.router") == 4
    assert config.rank_for("decoder.layers.3.mlp.experts.local_experts.2.linear_fc1") == 8
    assert config.rank_for("decoder.layers.3.self_attention.linear_qkv") == 16
    assert config.scaling_for("decoder.layers.3.mlp.router") == 8.0 / 4
    with pytest.raises(LoraConfigError, match=r"rank_pattern\['router'\]=0 is invalid"):
        LoraConfig(rank_pattern={"router": 0})
    with pytest.raises(LoraConfigError, match="rank_pattern=.*expected a mapping"):
        LoraConfig(rank_pattern=["router"])


def test_an_adapter_on_tied_embeddings_is_not_exported_as_one_peft_cannot_match():
    tied = shape_from_description(dict(MOE, share_embeddings_and_output_weights=True))
    a, b = factors(2, 16, 32, 0)
    tensors = {"embedding.word_embeddings.lora_A.weight": a, "embedding.word_embeddings.lora_B.weight": b}
    with pytest.raises(InteropError, match="tied to the output layer.*does not reach lm_head"):
        megatron_to_hf_factors(tensors, tied)
    assert "model.embed_tokens.lora_embedding_A" in megatron_to_hf_factors(tensors, shape_from_description(MOE))
