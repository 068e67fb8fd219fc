"""megatron_lora.generation: KV-cached generation equals the full forward per token (TP=1 and
TP=2 + SP, with an adapter), transformers' and peft's generate on the same weights, seeded
sampling agrees on every rank, batched greedy equals one prompt at a time, and the exact-match
accuracy built on it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt_checks import experiment, random_lora

PROMPTS = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 6], [11], [2, 3, 5, 7, 11], [6, 6, 1]]  # ragged
NEW_TOKENS = 6
SAMPLING = dict(temperature=0.9, top_p=0.9, seed=5)
SCRIPT_PROMPT = "hi"  # bytes below the tiny model's vocabulary of 128
REAL_VOCAB = 40  # a "padded" model: ids >= 40 must never come out


def one_token_at_a_time(model, prompt, new_tokens):
    """The reference: the whole sequence through the model per token, argmax of the last."""
    from megatron_lora.gpt import gathered_logits, gpt_forward_inputs

    tokens = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new_tokens):
            position_ids, mask = gpt_forward_inputs(tokens)
            logits = gathered_logits(model(tokens, position_ids, mask))
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    return tokens[0, len(prompt):].tolist()


def adapted_generations(model):
    """What every world size computes on the model with its adapter."""
    from megatron_lora.generation import generate, greedy_complete

    return {"cached": greedy_complete(model, PROMPTS, NEW_TOKENS),
            "full_forward": greedy_complete(model, PROMPTS, NEW_TOKENS, use_cache=False),
            "sampled": generate(model, PROMPTS, NEW_TOKENS, **SAMPLING),
            "sampled_again": generate(model, PROMPTS, NEW_TOKENS, **SAMPLING),
            "sampled_other_seed": generate(model, PROMPTS, NEW_TOKENS,
                                           **dict(SAMPLING, seed=6)),
            "limited_greedy": greedy_complete(model, PROMPTS, NEW_TOKENS, vocab_size=REAL_VOCAB),
            "limited_sampled": generate(model, PROMPTS, NEW_TOKENS, vocab_size=REAL_VOCAB,
                                        temperature=5.0, seed=1),
            "limited_full_forward": greedy_complete(model, PROMPTS, NEW_TOKENS,
                                                    vocab_size=REAL_VOCAB, use_cache=False)}


def hf_generate(model, prompts, new_tokens):
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            result = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    do_sample=False, pad_token_id=0, eos_token_id=None)
            out.append(result[0, len(prompt):].tolist())
    return out


def generate_at_tp1(rank, world, scratch):
    """Spawned at TP=1: the same tiny GPT, generated from in several ways."""
    from checkpoint_checks import hf_llama_from
    from peft import PeftModel

    from megatron_lora import apply_lora
    from megatron_lora.checkpoint import save_adapter
    from megatron_lora.dist_checkpoint import save_dist_checkpoint
    from megatron_lora.tokenizers import ByteTokenizer
    from megatron_lora.generation import exact_matches, greedy_complete
    from megatron_lora.gpt import build_gpt_model, initialize_model_parallel
    from megatron_lora.interop import export_peft
    from megatron_lora.training import describe_model
    from megatron_lora.training.rundir import MODEL_DESCRIPTION

    exp = experiment(1, 1, False)
    initialize_model_parallel(exp)
    model = build_gpt_model(exp)
    model.eval()
    out = {"reference": [one_token_at_a_time(model, p, NEW_TOKENS) for p in PROMPTS],
           "batched": greedy_complete(model, PROMPTS, NEW_TOKENS),
           "single": [greedy_complete(model, [p], NEW_TOKENS)[0] for p in PROMPTS]}
    stop = out["reference"][0][2]  # the third token of the first row: it stops there
    out["stop"] = stop
    out["stopped"] = greedy_complete(model, PROMPTS, NEW_TOKENS, stop_tokens=[stop])
    hf = hf_llama_from(model)
    out["hf_base"] = hf_generate(hf, PROMPTS, NEW_TOKENS)

    # exact_matches (teacher forcing) against its definition: greedy generation that gives
    # the answer and then a line end; here the line end is a token the model does generate
    tokenizer = ByteTokenizer()
    texts = ["ab", "hello", "x y", "zz", "abc"]
    prompts = [tokenizer.tokenize(t) for t in texts]
    continued = greedy_complete(model, prompts, 5)
    line_end = continued[0][2]
    examples = []
    for text, row in zip(texts, continued):
        first_end = row.index(line_end) if line_end in row else len(row)
        # answers never hold a line end (generation would have stopped there)
        for length in sorted({min(2, first_end), first_end}):
            examples.append((text, tokenizer.detokenize(row[:length])))
    examples.append((texts[0], examples[0][1] + "q"))  # a wrong answer
    out["exact_matches"] = exact_matches(model, tokenizer, examples, batch_size=3,
                                         line_ends=[line_end])
    out["generated_matches"] = [
        greedy_complete(model, [tokenizer.tokenize(prompt)], len(answer) + 1,
                        stop_tokens=[line_end])[0] == tokenizer.tokenize(answer)
        for prompt, answer in examples]
    with pytest.raises(ValueError, match="sequence length"):
        greedy_complete(model, PROMPTS, exp.seq_length)

    # the base as the training scripts save it, for scripts/generate.py
    (scratch / "base" / "model").mkdir(parents=True)
    save_dist_checkpoint(model.sharded_state_dict(), scratch / "base" / "model")
    (scratch / "base" / "model" / MODEL_DESCRIPTION).write_text(json.dumps(describe_model(exp)))

    # with an adapter whose B is not zero: it changes what is generated
    apply_lora(model, random_lora(), verbose=False)
    out.update(adapted_generations(model))
    save_adapter(model, scratch / "adapter")
    out["script_expected"] = greedy_complete(model, [tokenizer.tokenize(SCRIPT_PROMPT)],
                                             NEW_TOKENS)[0]
    export_peft(model, scratch / "peft")
    peft_model = PeftModel.from_pretrained(hf, str(scratch / "peft")).eval()
    out["peft"] = hf_generate(peft_model, PROMPTS, NEW_TOKENS)
    return out


def generate_at_tp2_sp(rank, world):
    """Spawned on 2 ranks: TP=2 with sequence parallelism, the same model and adapter."""
    from megatron_lora import apply_lora
    from megatron_lora.gpt import build_gpt_model, initialize_model_parallel

    exp = experiment(2, 1, True)
    initialize_model_parallel(exp)
    model = build_gpt_model(exp)
    apply_lora(model, random_lora(), verbose=False)
    out = adapted_generations(model)
    out["sequence_parallel_after"] = model.config.sequence_parallel
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("gen")


@pytest.fixture(scope="module")
def tp1(scratch):
    from megatron_lora.cpu import spawn_gloo

    return spawn_gloo(generate_at_tp1, 1, args=(scratch,), timeout=240)[0]


@pytest.fixture(scope="module")
def tp2():
    from megatron_lora.cpu import spawn_gloo

    return spawn_gloo(generate_at_tp2_sp, 2, timeout=240)


def test_batched_greedy_equals_one_prompt_at_a_time(tp1):
    assert tp1["batched"] == tp1["single"] == tp1["reference"]
    # the prompts do continue differently: the rows are not trivially equal
    assert len({tuple(row) for row in tp1["reference"]}) > 1


def test_rows_stop_at_their_own_first_stop_token(tp1):
    stop = tp1["stop"]
    expected = [row[:row.index(stop)] if stop in row else row for row in tp1["reference"]]
    assert tp1["stopped"] == expected
    assert len(tp1["stopped"][0]) <= 2 < NEW_TOKENS


def test_exact_matches_is_the_verdict_of_greedy_generation(tp1):
    verdicts = tp1["exact_matches"]
    assert verdicts == tp1["generated_matches"]
    assert True in verdicts and False in verdicts


def test_kv_cache_equals_full_forward_with_adapter_at_tp1_and_tp2_sp(tp1, tp2):
    assert tp1["cached"] == tp1["full_forward"]
    assert tp1["cached"] != tp1["reference"]  # the adapter matters
    for rank in tp2:
        assert rank["cached"] == rank["full_forward"] == tp1["cached"]
        assert rank["sequence_parallel_after"] is True  # restored after generation


def test_greedy_equals_transformers_and_peft_generate(tp1):
    assert tp1["batched"] == tp1["hf_base"]
    assert tp1["cached"] == tp1["peft"]


def test_seeded_sampling_is_reproducible_and_the_same_on_every_rank(tp1, tp2):
    assert tp1["sampled"] == tp1["sampled_again"] != tp1["sampled_other_seed"]
    assert tp1["sampled"] != tp1["cached"]  # it does sample
    for rank in tp2:
        for key in ("sampled", "sampled_other_seed", "limited_sampled"):
            assert rank[key] == tp2[0][key]


def test_no_token_at_or_above_the_real_vocabulary(tp1, tp2):
    for out in (tp1, *tp2):
        for key in ("limited_greedy", "limited_sampled"):
            assert all(token < REAL_VOCAB for row in out[key] for token in row)
        assert out["limited_greedy"] == out["limited_full_forward"]
    # without the limit, the model does produce larger ids
    assert any(token >= REAL_VOCAB for row in tp1["cached"] for token in row)


ROOT = Path(__file__).resolve().parents[1]


def test_generate_script_prints_the_adapted_completion(tp1, scratch):
    output = scratch / "completions.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate.py"),
         "--pretrained-checkpoint", str(scratch / "base"), "--lora-load", str(scratch / "adapter"),
         "--prompt", SCRIPT_PROMPT, "--no-chat-template", "--max-new-tokens", str(NEW_TOKENS),
         "--output", str(output)],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert f"### prompt: {SCRIPT_PROMPT}" in result.stdout
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["tokens"] for row in rows] == [tp1["script_expected"]]


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "x"], "--pretrained-checkpoint is required"),
    (["--pretrained-checkpoint", "{base}", "--prompt", "x", "--pipeline-model-parallel-size",
      "2"], "--pipeline-model-parallel-size 2"),
    (["--pretrained-checkpoint", "{base}", "--prompt", "x", "--top-p", "0"], "--top-p 0"),
])
def test_generate_script_bad_input_is_one_line_and_exit_2(tp1, scratch, capsys, argv, message):
    import warnings

    sys.path.insert(0, str(ROOT / "scripts"))
    with warnings.catch_warnings():  # as the script runs: under its filters from the first import
        from script_setup import filter_known_warnings

        filter_known_warnings()
        from megatron_lora.generate_cli import main

        code = main([item.format(base=scratch / "base") for item in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("generate.py: error: ") and message in err
