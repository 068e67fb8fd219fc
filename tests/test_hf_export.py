"""Servable results: ``export-peft`` names its base, ``export-hf`` writes a Hugging Face
checkpoint that transformers loads alone.

A tiny random transformers Llama (every parameter perturbed, norms too) is saved sharded; an
adapter for it (random non-zero factors on every linear, the output layer and the word
embeddings, megatron's vocabulary padded 128 -> 136, one module at another rank) is written in
the megatron_lora format. Then: PEFT loading the export-peft output with nothing but the file
must give the logits of the export-hf merge; the merge keeps the base's shard files, index,
dtypes and other files. The same for a tiny Mixtral with expert and router adapters. A TP=1
megatron model saved as pretrain_gpt.py saves it must give its own logits in transformers.
Everything runs in this one process, on the CPU.
"""

import json
import os

import pytest
import torch

from numerics import relative_error

FP32 = 1e-5
RANK, ALPHA = 4, 8.0


def _perturbed_and_saved(model, path, shard="60KB"):
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:  # norm scales: not trivially 1
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(path, max_shard_size=shard)
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (path / "chat_template.jinja").write_text("{{ messages }}")
    return path


def _write_adapter(path, tensors, base_model, rank_pattern=None):
    from megatron_lora.adapter_file import adapter_directory_files, write_directory_atomically
    from megatron_lora.config import LoraConfig

    targets = sorted({k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in tensors})
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, rank_pattern=rank_pattern)
    layout = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
              "expert_model_parallel_size": 1, "expert_tensor_parallel_size": 1,
              "sequence_parallel": False}
    files = adapter_directory_files(tensors, lora.to_dict(), "default", layout, base_model)
    return write_directory_atomically(path, files)


def _factors(generator, tensors, module, rows, columns, rank=RANK):
    tensors[f"{module}.lora_A.weight"] = 0.1 * torch.randn(rank, columns, generator=generator)
    tensors[f"{module}.lora_B.weight"] = 0.1 * torch.randn(rows, rank, generator=generator)


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def _cli(*argv):
    from megatron_lora.cli import main

    return main([str(a) for a in argv])


TOKENS = torch.tensor([[3, 17, 99, 5, 64, 127, 12, 40], [8, 1, 2, 77, 100, 33, 9, 0]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(base dir, adapter dir): a sharded tiny Llama and a padded-vocabulary adapter for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                         tie_word_embeddings=False, rms_norm_eps=1e-5)
    base = _perturbed_and_saved(LlamaForCausalLM(config), root / "base")
    padded, heads, groups, head_dim = 136, 4, 2, 16
    generator, tensors = torch.Generator().manual_seed(1), {}
    for layer in range(2):
        prefix = f"decoder.layers.{layer}."
        _factors(generator, tensors, prefix + "self_attention.linear_qkv",
                 (heads + 2 * groups) * head_dim, 64)
        _factors(generator, tensors, prefix + "self_attention.linear_proj", 64, 64)
        _factors(generator, tensors, prefix + "mlp.linear_fc1", 2 * 96, 64)
        _factors(generator, tensors, prefix + "mlp.linear_fc2", 64, 96, rank=2)
    _factors(generator, tensors, "output_layer", padded, 64)
    _factors(generator, tensors, "embedding.word_embeddings", 64, padded)
    # megatron's padded rows: an export that kept them would not load in PEFT
    base_model = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": heads,
                  "num_query_groups": groups, "ffn_hidden_size": 96, "kv_channels": head_dim,
                  "gated_linear_unit": True, "vocab_size": padded, "unpadded_vocab_size": 128,
                  "name_or_path": str(base)}
    adapter = _write_adapter(root / "adapter", tensors, base_model,
                             rank_pattern={"linear_fc2": 2})
    return base, adapter


def test_export_peft_names_its_base_and_peft_needs_nothing_else(llama, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = llama
    assert _cli("export-peft", adapter, tmp_path / "peft") == 0
    assert _cli("export-hf", adapter, tmp_path / "merged") == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    assert config["task_type"] == "CAUSAL_LM"

    base_logits = _logits(AutoModelForCausalLM.from_pretrained(base), TOKENS)
    peft_logits = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                                    tmp_path / "peft"), TOKENS)
    auto_logits = _logits(AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft"), TOKENS)
    merged_logits = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), TOKENS)
    assert relative_error(merged_logits, peft_logits) <= FP32
    assert torch.equal(auto_logits, peft_logits)
    assert relative_error(peft_logits, base_logits) > 1e-2


def test_export_hf_keeps_the_base_layout_and_copies_its_other_files(llama, tmp_path):
    from safetensors import safe_open

    base, adapter = llama
    out = tmp_path / "merged"
    assert _cli("export-hf", adapter, out, "--base", base) == 0
    index = "model.safetensors.index.json"
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) >= 2
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert json.loads((out / index).read_text()) == json.loads((base / index).read_text())
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    changed = 0
    for shard in shards:
        with safe_open(base / shard, "pt") as old, safe_open(out / shard, "pt") as new:
            assert sorted(old.keys()) == sorted(new.keys())
            assert old.metadata() == new.metadata()
            for key in old.keys():
                before, after = old.get_tensor(key), new.get_tensor(key)
                assert before.dtype == after.dtype and before.shape == after.shape
                changed += not torch.equal(before, after)
    assert changed == 2 * 7 + 2  # every linear of both layers, lm_head, embed_tokens

    # a previous export is replaced on request; a directory of other things never
    assert _cli("export-hf", adapter, out, "--overwrite") == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM

    root = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                           num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    base = _perturbed_and_saved(MixtralForCausalLM(config), root / "base", shard="40KB")
    generator, tensors = torch.Generator().manual_seed(2), {}
    for layer in range(2):
        prefix = f"decoder.layers.{layer}."
        _factors(generator, tensors, prefix + "self_attention.linear_qkv", (4 + 4) * 8, 32)
        _factors(generator, tensors, prefix + "self_attention.linear_proj", 32, 32)
        _factors(generator, tensors, prefix + "mlp.router", 4, 32)
        for expert in range(4):
            experts = f"{prefix}mlp.experts.local_experts.{expert}."
            _factors(generator, tensors, experts + "linear_fc1", 2 * 48, 32)
            _factors(generator, tensors, experts + "linear_fc2", 32, 48)
    base_model = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                  "num_query_groups": 2, "ffn_hidden_size": 48, "kv_channels": 8,
                  "gated_linear_unit": True, "vocab_size": 64, "num_moe_experts": 4,
                  "moe_ffn_hidden_size": 48, "name_or_path": str(base)}
    return base, _write_adapter(root / "adapter", tensors, base_model)


def test_export_hf_of_mixtral_expert_adapters_gives_peft_logits(mixtral, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = mixtral
    assert _cli("export-peft", adapter, tmp_path / "peft") == 0
    assert _cli("export-hf", adapter, tmp_path / "merged") == 0
    tokens = TOKENS % 64
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(base), tokens)
    peft_logits = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                                    tmp_path / "peft"), tokens)
    merged_logits = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), tokens)
    assert relative_error(merged_logits, peft_logits) <= FP32
    assert relative_error(peft_logits, base_logits) > 1e-2


def test_a_trained_megatron_model_gives_its_logits_in_transformers(tmp_path):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from megatron_lora.dist_checkpoint import save_dist_checkpoint
    from megatron_lora.cpu import make_cpu_ready
    from megatron_lora.experiment import load_experiment
    from megatron_lora.gpt import (build_gpt_model, gathered_logits, gpt_forward_inputs,
                                   initialize_model_parallel)
    from megatron_lora.training.base import describe_model
    from megatron_lora.training.rundir import MODEL_DESCRIPTION

    make_cpu_ready()
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    experiment = load_experiment(data={"megatron_config": dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=96, vocab_size=128, seq_length=16, hidden_dropout=0.0,
        attention_dropout=0.0, rotary_base=500000, layernorm_epsilon=1e-6,
        init_method_std=0.05)})
    initialize_model_parallel(experiment)
    model = build_gpt_model(experiment)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
    model.eval()
    position_ids, mask = gpt_forward_inputs(TOKENS)
    with torch.no_grad():
        expected = gathered_logits(model(TOKENS, position_ids, mask)).float()
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    save_dist_checkpoint(model.sharded_state_dict(), run / "model")
    (run / "model" / MODEL_DESCRIPTION).write_text(json.dumps(describe_model(experiment)))
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    (tokenizer / "tokenizer_config.json").write_text("{}")

    assert _cli("export-hf", run, tmp_path / "hf", "--tokenizer-model", tokenizer) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 500000
    assert config["rms_norm_eps"] == 1e-6 and config["max_position_embeddings"] == 16
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert relative_error(_logits(hf, TOKENS), expected) <= FP32


def test_import_pads_the_trimmed_vocabulary_back_with_zeros(llama, tmp_path):
    from safetensors.torch import load_file

    _, adapter = llama
    assert _cli("export-peft", adapter, tmp_path / "peft") == 0
    assert _cli("import-peft", tmp_path / "peft", tmp_path / "back", "--like", adapter) == 0
    original = load_file(adapter / "adapter_model.safetensors")
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    for key, vocab_dim, shape in (("output_layer.lora_B.weight", 0, (136, RANK)),
                                  ("embedding.word_embeddings.lora_A.weight", 1, (RANK, 136))):
        assert back[key].shape == original[key].shape == shape
        assert torch.equal(back[key].narrow(vocab_dim, 0, 128), original[key].narrow(vocab_dim, 0, 128))
        assert not back[key].narrow(vocab_dim, 128, 8).any()  # padded rows: never used


@pytest.mark.parametrize("field, value", [("moe_shared_expert_intermediate_size", 64),
                                          ("add_qkv_bias", True), ("qk_layernorm", True),
                                          ("rope_scaling", True)])
def test_a_trained_model_the_written_config_cannot_express_is_refused(tmp_path, field, value):
    """export-hf of a pretrain save writes a Llama / Mixtral config: a shared expert, q/k/v
    biases, q/k norms or rope scaling would be dropped from it, so they are refused."""
    import json

    from megatron_lora.hf_export import HFExportError, export_trained_model

    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "metadata.json").write_text("{}")
    description = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                   "ffn_hidden_size": 96, "vocab_size": 128, "activation": "swiglu",
                   "normalization": "RMSNorm", "seq_length": 32, field: value}
    (model / "model_description.json").write_text(json.dumps(description))
    with pytest.raises(HFExportError, match=f"{field} is {value!r}"):
        export_trained_model(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()
