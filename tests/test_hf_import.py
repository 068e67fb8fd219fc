"""Hugging Face checkpoints in (megatron_lora.hf): every supported family, made by transformers
in the test, read into megatron-core at TP=1, TP=2 + SP and PP=2 (dense) or EP=2 and
TP=2 + SP + EP=2 (MoE) gives transformers' own fp32 logits and per-token loss; each rank reads
only its own slices. See tests/hf_checks.py."""

import json

import pytest
import torch

from hf_checks import FAMILIES, MOE, WORLD, layouts_of, make_family_models, transformers4_spelling
from numerics import relative_error

FP32 = 1e-5
CASES = [pytest.param(family, layout, id=f"{family}-{layout}")
         for family in FAMILIES for layout in layouts_of(family)]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    return make_family_models(tmp_path_factory.mktemp("hf_models"))


@pytest.fixture(scope="module")
def loaded(family_models):
    from megatron_lora.cpu import spawn_gloo

    from hf_checks import run_all

    return spawn_gloo(run_all, WORLD, args=(family_models,), timeout=420)


@pytest.mark.parametrize("family, layout", CASES)
def test_imported_model_gives_transformers_logits_and_loss(family_models, loaded, family, layout):
    expected = family_models[family]
    results = [rank[family][layout] for rank in loaded if rank[family][layout].logits is not None]
    assert results  # the last pipeline stage of every replica
    for result in results:
        assert result.logits.shape == expected.logits.shape  # padded vocabulary cut
        assert relative_error(result.logits, expected.logits) < FP32
        assert relative_error(result.loss.float(), expected.loss) < FP32


@pytest.mark.parametrize("family, layout", [c for c in CASES if "tp2" in c.values[1]
                                            or "ep2" in c.values[1]])
def test_each_rank_reads_only_its_own_slices(loaded, family, layout):
    split = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
             "embed_tokens", "lm_head", ".w1.", ".w2.", ".w3.")
    for rank in loaded:
        reads = rank[family][layout].reads
        assert reads
        for name, read, total in reads:
            expert = ".experts." in name
            tp_split = "tp2" in layout and not expert and any(s in name for s in split)
            if tp_split:  # half (of the padded vocabulary's rows, for the tables)
                padded = total * 1024 // 1001 if ("embed" in name or "lm_head" in name) else total
                assert read * 2 <= padded and read < total, (name, read, total)
        if "ep2" in layout:  # half the experts per rank, never the others
            experts = {name.split(".experts.")[1].split(".")[0] for name, _, _ in reads
                       if ".experts." in name}
            assert len(experts) == 2, experts


def test_padded_vocabulary_rows_are_zero_and_never_count(family_models, loaded):
    """vocab 1001 at TP=2 is padded to 1024: the logits shown have 1001 columns and the loss
    equals transformers' (the padded rows take no probability)."""
    assert family_models["llama"].logits.shape[-1] == 1001
    for rank in loaded:
        assert rank["llama"]["tp2-sp"].logits.shape[-1] == 1001


def test_both_rope_spellings_give_the_same_model(family_models, tmp_path):
    from megatron_lora.hf import hf_experiment

    for family in ("llama", "mixtral"):
        directory = family_models[family].directory
        legacy = transformers4_spelling(__import__("pathlib").Path(directory), tmp_path / family)
        assert "rope_parameters" not in json.loads((legacy / "config.json").read_text())
        new, old = hf_experiment(directory), hf_experiment(legacy)
        assert new.megatron_config == old.megatron_config
    llama = hf_experiment(family_models["llama"].directory).megatron_config
    assert (llama["rotary_base"], llama["rope_scaling"], llama["rope_scaling_factor"]) == \
        (500000, True, 8.0)


def test_config_json_decides_the_shape_and_the_rest_is_free(family_models):
    from megatron_lora.hf import HuggingFaceError, hf_experiment

    directory = family_models["qwen3"].directory
    experiment = hf_experiment(directory, overrides={"megatron_config.seq_length": 32,
                                                     "megatron_config.hidden_size": 64},
                               world_size=2)
    m = experiment.megatron_config
    assert (m["kv_channels"], m["qk_layernorm"], m["untie_embeddings_and_output_weights"],
            m["seq_length"], m["layernorm_epsilon"]) == (32, True, False, 32, 1e-5)
    with pytest.raises(HuggingFaceError, match=r"hidden_size 128 contradicts .*config.json "
                                               r"\(hidden_size 64\)"):
        hf_experiment(directory, overrides=["megatron_config.hidden_size=128"])
    moe = hf_experiment(family_models["qwen2_moe"].directory).megatron_config
    assert (moe["num_moe_experts"], moe["moe_ffn_hidden_size"], moe["moe_router_pre_softmax"],
            moe["moe_shared_expert_intermediate_size"], moe["add_qkv_bias"]) == (4, 48, True, 80, True)
    assert not hf_experiment(family_models["mixtral"].directory).megatron_config[
        "moe_router_pre_softmax"]


def test_one_description_of_the_model_from_config_json(family_models):
    """megatron_lora.description: config.json, the experiment and the file's tensors agree on
    the derived sizes (qkv rows, expert ffn, padded vocabulary)."""
    from megatron_lora.description import ModelDescription
    from megatron_lora.hf import HFCheckpoint, hf_experiment

    for family in ("qwen3", "qwen2_moe", "llama"):
        directory = family_models[family].directory
        described = ModelDescription.from_hf_directory(directory)
        assert not described.differences(ModelDescription.from_experiment(hf_experiment(directory)))
        checkpoint = HFCheckpoint(directory)
        rows = sum(checkpoint.shape(f"model.layers.0.self_attn.{p}_proj.weight")[0] for p in "qkv")
        assert described.qkv_rows == rows
    moe = ModelDescription.from_hf_directory(family_models["qwen2_moe"].directory)
    assert (moe.expert_ffn, moe.get("moe_shared_expert_intermediate_size")) == (48, 80)
    llama = ModelDescription.from_hf_directory(family_models["llama"].directory).for_adapter()
    assert (llama["vocab_size"], llama["unpadded_vocab_size"]) == (1024, 1001)
    assert llama["name_or_path"]

