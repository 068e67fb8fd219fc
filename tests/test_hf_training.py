"""The scripts from a Hugging Face directory: a tiny Llama made by transformers with its own
tokenizer (tokenizers' BPE with a chat template, loaded by AutoTokenizer), LoRA fine-tuning on
chat rows (--sft, packed) at TP=2 + SP through torchrun with no --config (config.json gives the
model, its vocabulary of 1001 padded to 1024), the adapter recording where its base came from."""

import json
import subprocess
import sys

import pytest

from hf_checks import make_llama_with_tokenizer
from test_training import ROOT, torchrun


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_run")
    base = make_llama_with_tokenizer(root / "llama")
    # chat rows: the fine-tuning is --sft, packed, with the loss on the answers
    for name, numbers in (("train", range(64)), ("heldout", range(100, 108))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": f"the quick brown fox number {i}"},
            {"role": "assistant", "content": "jumps over the lazy dog"}]}) + "\n"
            for i in numbers))
    save = root / "run"
    result = torchrun("finetune_gpt.py", "--pretrained-checkpoint", base,
                      "--tensor-model-parallel-size", 2, "--sequence-parallel",
                      "--seq-length", 64, "--sft", "--sft-sequence-packing",
                      "--data-path", root / "train.jsonl",
                      "--valid-data-path", root / "heldout.jsonl",
                      "--lora-rank", 4, "--lora-alpha", 8, "--train-iters", 8, "--lr", 1e-2,
                      "--micro-batch-size", 2, "--eval-iters", 1, "--eval-interval", 4,
                      "--save", save, "--no-progress-bar", timeout=300)
    return base, save, result


def test_finetuning_from_a_hugging_face_directory_learns(hf_run):
    base, save, result = hf_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    before = float(result.stdout.split("held-out loss before training: ")[1].split()[0])
    after = float(result.stdout.split("held-out loss after training: ")[1].split()[0])
    assert after < before
    assert "--sft data: 64 training and 8 held-out conversations, packed" in result.stdout
    # the held-out loss on the answer tokens, before the first step and at each interval
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "valid_loss" in r][:3] == [0, 4, 8]


def test_the_adapter_records_its_base_and_the_padded_vocabulary(hf_run):
    base, save, result = hf_run
    assert result.returncode == 0, result.stderr[-3000:]
    described = json.loads((save / "adapter" / "adapter_config.json").read_text())["base_model"]
    assert described["name_or_path"] == str(base.resolve())
    assert (described["vocab_size"], described["unpadded_vocab_size"]) == (1024, 1001)


def test_the_tokenizer_is_the_models_own(tmp_path):
    from megatron_lora.tokenizers import build_tokenizer

    base = make_llama_with_tokenizer(tmp_path / "llama")
    tokenizer = build_tokenizer("HuggingFaceTokenizer", base)
    ids = tokenizer.tokenize("the lazy dog")
    assert tokenizer.detokenize(ids) == "the lazy dog"
    assert tokenizer.eod == tokenizer.hf.convert_tokens_to_ids("<|end|>")
    assert tokenizer.vocab_size <= 1001


def test_generate_from_a_hugging_face_directory_equals_transformers(tmp_path):
    """scripts/generate.py on the Hugging Face directory at TP=2 + SP, the prompt in the
    tokenizer's chat template: greedy tokens equal transformers' generate, token for token,
    and none is a padded vocabulary id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_llama_with_tokenizer(tmp_path / "llama")
    out = tmp_path / "out.jsonl"
    result = torchrun("generate.py", "--pretrained-checkpoint", base,
                      "--tensor-model-parallel-size", 2, "--sequence-parallel",
                      "--seq-length", 64, "--prompt", "the lazy dog", "--max-new-tokens", 10,
                      "--output", out, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ours = json.loads(out.read_text().splitlines()[0])["tokens"]
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "the lazy dog"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True).float().eval()
    expected = model.generate(ids, max_new_tokens=10, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in expected:  # ours stops before the stop token
        expected = expected[:expected.index(tokenizer.eos_token_id)]
    assert ours == expected
    assert all(token < 1001 for token in ours)


def _megatron_logits_with_adapter(rank, world, base, adapter, tokens):
    """Spawned at TP=2 + SP: the Hugging Face base loaded, the trained adapter loaded."""
    from megatron_lora import apply_lora
    from megatron_lora.adapter_file import read_adapter
    from megatron_lora.checkpoint import load_adapter
    from megatron_lora.gpt import (build_gpt_model, gathered_logits, gpt_forward_inputs,
                                   initialize_model_parallel)
    from megatron_lora.hf import hf_experiment, load_hf_weights

    experiment = hf_experiment(base, overrides={"megatron_config": {
        "tensor_model_parallel_size": 2, "sequence_parallel": True, "seq_length": 32}},
        world_size=world)
    initialize_model_parallel(experiment)
    model = build_gpt_model(experiment, initialize=False)
    load_hf_weights(model, base, experiment)
    saved = read_adapter(adapter)
    lora = saved.lora_config.__class__(**{**saved.lora_config.to_dict(),
                                          "target_modules": sorted(saved.config["modules"])})
    apply_lora(model, lora, verbose=False)
    load_adapter(model, adapter)
    model.eval()
    import torch

    with torch.no_grad():
        position_ids, mask = gpt_forward_inputs(tokens)
        return gathered_logits(model(tokens, position_ids, mask), vocab_size=1001)


def test_the_trained_adapter_serves_in_peft_and_merged_in_transformers(hf_run, tmp_path):
    """The adapter trained from the Hugging Face directory, loaded back at TP=2 + SP, gives the
    logits that real peft gives with its export-peft output (nothing passed but the adapter
    directory) and that transformers gives with its export-hf merged checkpoint."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from megatron_lora.cli import main as cli
    from megatron_lora.cpu import spawn_gloo
    from numerics import relative_error

    base, save, result = hf_run
    assert result.returncode == 0, result.stderr[-3000:]
    adapter, peft_dir, merged = save / "adapter", tmp_path / "peft", tmp_path / "merged"
    assert cli(["export-peft", str(adapter), str(peft_dir)]) == 0
    assert cli(["export-hf", str(adapter), str(merged)]) == 0
    assert json.loads((peft_dir / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(base.resolve())
    tokens = torch.randint(0, 1001, (2, 32), generator=torch.Generator().manual_seed(3))
    ours = spawn_gloo(_megatron_logits_with_adapter, 2,
                      args=(str(base), str(adapter), tokens), timeout=300)
    with torch.no_grad():
        peft_logits = AutoPeftModelForCausalLM.from_pretrained(
            peft_dir, local_files_only=True).float().eval()(tokens).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(
            merged, local_files_only=True).float().eval()(tokens).logits
        base_logits = AutoModelForCausalLM.from_pretrained(
            base, local_files_only=True).float().eval()(tokens).logits
    for rank_logits in ours:
        assert relative_error(rank_logits, peft_logits) < 1e-5
        assert relative_error(rank_logits, merged_logits) < 1e-5
    assert relative_error(peft_logits, base_logits) > 1e-4  # the adapter matters


def test_pretraining_starts_from_a_hugging_face_directory(tmp_path, hf_run):
    """pretrain_gpt.py (full training) from the Hugging Face directory, one process, on text
    preprocessed with the model's own tokenizer."""
    base, _, _ = hf_run
    corpus, data = tmp_path / "corpus.jsonl", tmp_path / "corpus"
    corpus.write_text("".join(json.dumps({"text": f"the quick brown fox number {i} jumps over "
                                                  f"the lazy dog"}) + "\n" for i in range(64)))
    prep = subprocess.run([sys.executable, "-m", "megatron_lora.data", "preprocess", "--input",
                           str(corpus), "--output-prefix", str(data),
                           "--tokenizer-model", str(base)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert prep.returncode == 0, prep.stderr
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_gpt.py"),
                             "--pretrained-checkpoint", str(base), "--seq-length", "32",
                             "--data-path", str(data), "--train-iters", "2",
                             "--micro-batch-size", "2", "--eval-iters", "1",
                             "--save", str(tmp_path / "full"), "--no-progress-bar"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "full" / "model" / "metadata.json").is_file()
