"""Instruction data (--sft): answer masks against hand-computed ones for two chat templates,
multi-turn; rows refused with their file and line; the tokenization cache shared by processes
started at once; the loss as the mean over the global batch's counted tokens however the batch
is cut (1 x 8, 2 x 4, 8 x 1, DP = 2); packed = unpacked at TP = 1 and TP = 2 + SP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SPAWN_TIMEOUT_S
from numerics import relative_error

from megatron_lora.data import DataError

WORDS = ("system user assistant you are kind the fox sees a dog saw hello world ok "
         "think yes no").split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
          "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
          "{% endif %}")
# a template that drops earlier answers once the conversation goes on (as reasoning templates
# drop past thoughts): the answers of a rendering are not where the whole one has them
FORGETFUL = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
             "{% if m['role'] == 'assistant' and not loop.last %}ok{% else %}{{ m['content'] }}"
             "{% endif %}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]

CONVERSATION = [
    {"role": "system", "content": "you are kind"},
    {"role": "user", "content": "the fox sees a dog"},
    {"role": "assistant", "content": "saw"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "world hello"},
]


def make_tokenizer(directory: Path, template, eos: str, bos=None) -> Path:
    """A word-level Hugging Face tokenizer made with the tokenizers library, saved locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(["<unk>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS, "eos_token": eos,
                                  **({"bos_token": bos} if bos else {})})
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(directory))
    return directory


def hf_tokenizer(tmp_path, template, eos="<|im_end|>", bos=None):
    from megatron_lora.tokenizers import build_tokenizer

    directory = make_tokenizer(tmp_path / "tokenizer", template, eos, bos)
    return build_tokenizer("HuggingFaceTokenizer", directory)


def marked(tokenizer, messages):
    """The conversation's tokens, '+' before each that counts for the loss."""
    from megatron_lora.data.instructions import tokenize_conversation

    ids, counted = tokenize_conversation(tokenizer, messages, "test")
    names = tokenizer.hf.convert_ids_to_tokens(ids)
    return " ".join(("+" if flag else "") + name for name, flag in zip(names, counted))


# --- masks ----------------------------------------------------------------------------------


def test_chatml_mask_multi_turn(tmp_path):
    tokenizer = hf_tokenizer(tmp_path, CHATML)
    assert marked(tokenizer, CONVERSATION) == (
        "<|im_start|> system you are kind <|im_end|> "
        "<|im_start|> user the fox sees a dog <|im_end|> "
        "<|im_start|> assistant +saw +<|im_end|> "
        "<|im_start|> user hello <|im_end|> "
        "<|im_start|> assistant +world +hello +<|im_end|>")


def test_llama3_mask_multi_turn(tmp_path):
    tokenizer = hf_tokenizer(tmp_path, LLAMA3, eos="<|eot_id|>", bos="<|begin_of_text|>")
    assert marked(tokenizer, CONVERSATION) == (
        "<|begin_of_text|> "
        "<|start_header_id|> system <|end_header_id|> you are kind <|eot_id|> "
        "<|start_header_id|> user <|end_header_id|> the fox sees a dog <|eot_id|> "
        "<|start_header_id|> assistant <|end_header_id|> +saw +<|eot_id|> "
        "<|start_header_id|> user <|end_header_id|> hello <|eot_id|> "
        "<|start_header_id|> assistant <|end_header_id|> +world +hello +<|eot_id|>")


def test_prompt_response_rows_are_one_user_and_one_assistant_turn(tmp_path):
    from megatron_lora.data.instructions import conversation_of

    tokenizer = hf_tokenizer(tmp_path, CHATML)
    for row in ({"prompt": "hello", "response": "world"}, {"input": "hello", "output": "world"}):
        assert marked(tokenizer, conversation_of(row, "test")) == (
            "<|im_start|> user hello <|im_end|> <|im_start|> assistant +world +<|im_end|>")


def test_without_a_template_prompt_then_response_then_eos(tmp_path):
    from megatron_lora.data.instructions import conversation_of, tokenize_conversation
    from megatron_lora.tokenizers import build_tokenizer

    byte = build_tokenizer("byte")
    ids, counted = tokenize_conversation(
        byte, conversation_of({"prompt": "Q: hi\nA:", "response": " yo"}, "test"), "test")
    assert ids == list(b"Q: hi\nA: yo") + [byte.eod]
    assert counted == [False] * 8 + [True] * 4
    plain = hf_tokenizer(tmp_path, None)
    ids, counted = tokenize_conversation(
        plain, conversation_of({"prompt": "hello ", "response": "world"}, "test"), "test")
    assert plain.hf.convert_ids_to_tokens(ids) == ["hello", "world", "<|im_end|>"]
    assert counted == [False, True, True]


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    from megatron_lora.data.instructions import tokenize_conversation

    tokenizer = hf_tokenizer(tmp_path, FORGETFUL)
    with pytest.raises(DataError, match=r"where:7: the chat template renders earlier turns "
                                        r"differently .*message 2"):
        tokenize_conversation(tokenizer, CONVERSATION, "where:7")


# --- bad rows, long rows, blends ------------------------------------------------------------

GOOD = json.dumps({"messages": CONVERSATION[1:3]})
BAD_ROWS = [
    ("{not json", "not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "hello"},
                              {"role": "assistant", "content": "  "}]}),
     "no assistant content"),
    (json.dumps({"messages": [{"role": "robot", "content": "hello"}]}),
     "message 0 has role 'robot'; valid roles: system, user, assistant"),
    (json.dumps({"prompt": "hello"}), "'response' must be a string"),
    (json.dumps({"text": "hello"}), "expected 'messages', 'prompt'/'response'"),
    (json.dumps([1, 2]), "expected a JSON object, got list"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS, ids=[m.split()[0] for _, m in BAD_ROWS])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    from megatron_lora.data.instructions import load_tokenized
    from megatron_lora.tokenizers import build_tokenizer

    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n\n{row}\n")
    with pytest.raises(DataError) as caught:
        load_tokenized(path, hf_tokenizer(tmp_path, CHATML), log=lambda m: None)
    assert str(caught.value).startswith(f"{path}:3: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "sft-cache").exists()  # nothing written
    byte = build_tokenizer("byte")
    path.write_text(f"{GOOD}\n")
    with pytest.raises(DataError, match=rf"^{path}:1: a 'messages' conversation needs a "
                                        rf"tokenizer with a chat template"):
        load_tokenized(path, byte, log=lambda m: None)


def _settings(tmp_path, **overrides):
    from megatron_lora.training.settings import TrainingSettings

    return TrainingSettings(**{"sft": True, "split": "75,25,0",
                               "data_cache_path": str(tmp_path / "cache"), **overrides})


def test_long_conversations_truncated_or_refused(tmp_path):
    from megatron_lora.data.instructions import build_instruction_datasets

    tokenizer = hf_tokenizer(tmp_path, CHATML)
    path = tmp_path / "data.jsonl"
    long = {"messages": [{"role": "user", "content": "hello " * 20},
                         {"role": "assistant", "content": "world"}]}
    path.write_text("\n".join(json.dumps(r) for r in [json.loads(GOOD)] * 3 + [long]) + "\n")
    logged = []
    train, valid = build_instruction_datasets(
        _settings(tmp_path, data_path=str(path)), seq_length=16, seed=0, num_samples=(4, 2),
        tokenizer=tokenizer, log=logged.append)
    assert any(f"truncated 1 conversations longer than --seq-length 16 (the first: {path}:4)"
               in line for line in logged)
    assert len(train) == 4 and len(valid) == 2
    assert all(sample["tokens"].shape == (16,) for sample in (train[i] for i in range(4)))
    with pytest.raises(DataError, match=rf"^{path}:4: the conversation is longer than "
                                        rf"--seq-length 16"):
        build_instruction_datasets(_settings(tmp_path, data_path=str(path),
                                             sft_no_truncation=True),
                                   seq_length=16, seed=0, num_samples=(4, 2),
                                   tokenizer=tokenizer, log=logged.append)


def test_blend_of_two_files_by_weight(tmp_path):
    from megatron_lora.data.instructions import Blend, blend_order, build_instruction_datasets

    assert blend_order([3, 1], 8).count(0) == 6
    with pytest.raises(DataError, match="weight-file pairs"):
        Blend.parse(["a.jsonl", "b.jsonl"])
    with pytest.raises(DataError, match="every weight must be a positive number"):
        Blend.parse(["0", "a.jsonl", "1", "b.jsonl"])
    tokenizer = hf_tokenizer(tmp_path, CHATML)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text(json.dumps({"prompt": "hello", "response": "world"}) + "\n")
    second.write_text(json.dumps({"prompt": "the fox", "response": "saw"}) + "\n")
    train, _ = build_instruction_datasets(
        _settings(tmp_path, data_path=["3", str(first), "1", str(second)],
                  valid_data_path=str(second)),
        seq_length=16, seed=0, num_samples=(8, 1), tokenizer=tokenizer, log=lambda m: None)
    saw = tokenizer.hf.convert_tokens_to_ids("saw")
    from_second = sum(int((train[i]["labels"] == saw).any()) for i in range(len(train)))
    assert len(train) == 8 and from_second == 2


# --- the cache --------------------------------------------------------------------------------

_CACHE_WORKER = """
import hashlib, sys
from megatron_lora.data.instructions import load_tokenized
from megatron_lora.tokenizers import build_tokenizer
said = []
result = load_tokenized(sys.argv[1], build_tokenizer("HuggingFaceTokenizer", sys.argv[2]),
                        sys.argv[3], log=said.append)
digest = hashlib.sha256(result.tokens.numpy().tobytes() + result.counted.numpy().tobytes())
print("tokenized" if said else "read", digest.hexdigest())
"""


def test_cache_shared_by_two_processes_started_at_once(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tokenizer", CHATML, "<|im_end|>")
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(3000)))
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    command = [sys.executable, "-c", _CACHE_WORKER, str(path), str(tokenizer), str(cache)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for _ in range(2)]
    try:
        outputs = [process.communicate(timeout=180) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert all(process.returncode == 0 for process in processes), outputs
    verdicts = sorted(out.split()[0] for out, _ in outputs)
    digests = {out.split()[1] for out, _ in outputs}
    assert verdicts == ["read", "tokenized"] and len(digests) == 1
    assert [p.suffix for p in cache.iterdir() if not p.name.endswith(".lock")] == [".safetensors"]
    # another template is another cache entry
    template_file = tokenizer / "chat_template.jinja"
    if template_file.is_file():  # transformers 5 keeps the template in its own file
        template_file.write_text("ok " + template_file.read_text())
    else:
        config = json.loads((tokenizer / "tokenizer_config.json").read_text())
        config["chat_template"] = "ok " + config["chat_template"]
        (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert again.stdout.split()[:1] == ["tokenized"], again.stderr[-2000:]


def test_a_damaged_cache_entry_is_refused_not_used(tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_lora.data.instructions import load_tokenized

    tokenizer = hf_tokenizer(tmp_path, CHATML)
    path = tmp_path / "data.jsonl"
    path.write_text(GOOD + "\n")
    load_tokenized(path, tokenizer, log=lambda m: None)
    (entry,) = (tmp_path / "sft-cache").glob("*.safetensors")
    tensors = load_file(str(entry))
    tensors["tokens"][0] = 10 ** 6  # outside the vocabulary
    save_file(tensors, str(entry))
    with pytest.raises(DataError, match=rf"the tokenization cache {entry} is inconsistent"):
        load_tokenized(path, tokenizer, log=lambda m: None)
    entry.write_bytes(b"not safetensors")
    with pytest.raises(DataError, match=rf"the tokenization cache {entry} cannot be read"):
        load_tokenized(path, tokenizer, log=lambda m: None)


# --- the loss over the global batch, packing -------------------------------------------------


@pytest.fixture(scope="module")
def runs():
    import sft_checks
    from megatron_lora.cpu import spawn_gloo

    return (spawn_gloo(sft_checks.world_one, 1, timeout=SPAWN_TIMEOUT_S)[0],
            spawn_gloo(sft_checks.world_two, 2, timeout=SPAWN_TIMEOUT_S))


def _assert_same_step(actual, expected, what):
    assert actual["tokens"] == expected["tokens"], what
    assert abs(actual["loss"] - expected["loss"]) <= 1e-5 * abs(expected["loss"]), what
    assert actual["grads"].keys() == expected["grads"].keys(), what
    for name, (grad_a, grad_b) in expected["grads"].items():
        got_a, got_b = actual["grads"][name]
        assert relative_error(got_a, grad_a) < 1e-4, f"{what}: {name} A"
        assert relative_error(got_b, grad_b) < 1e-4, f"{what}: {name} B"
    assert abs(actual["grad_norm"] - expected["grad_norm"]) <= 1e-4 * expected["grad_norm"], what


def test_loss_is_the_mean_over_the_global_batch_tokens(runs):
    import sft_checks

    one, two = runs
    reference = one["8x1"]
    expected_tokens = sum(int(c[1:].sum()) for _, c in sft_checks.conversations())
    assert reference["tokens"] == expected_tokens
    _assert_same_step(one["4x2"], reference, "2 x 4 (accumulation)")
    _assert_same_step(one["1x8"], reference, "8 x 1 (accumulation)")
    for rank in range(2):
        _assert_same_step(two[rank]["dp2"], reference, f"DP=2, rank {rank}")


def test_packed_equals_unpacked(runs):
    one, two = runs
    assert one["packed_samples"] < 8  # the 8 conversations share fewer sequences
    _assert_same_step(one["packed"], one["8x1"], "packed, TP=1")
    for rank in range(2):
        _assert_same_step(two[rank]["tp2-sp"], one["8x1"], f"TP=2 + SP, rank {rank}")
        _assert_same_step(two[rank]["tp2-sp-packed"], two[rank]["tp2-sp"],
                          f"packed vs unpacked at TP=2 + SP, rank {rank}")


def test_packed_sample_layout():
    import sft_checks

    packed = sft_checks.dataset(pack=True)
    for index in range(len(packed)):
        sample = packed[index]
        segments = sample["segment_ids"]
        for segment in segments.unique().tolist():
            if segment:
                where = (segments == segment).nonzero().flatten()
                assert sample["position_ids"][where].tolist() == list(range(len(where)))
    from megatron_lora.data.instructions import packed_attention_mask

    mask = packed_attention_mask(torch.tensor([[1, 1, 2, 2, 0]]))
    assert (~mask[0, 0]).int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0],
                                            [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]



def test_restarted_positions_reindex_the_rotary_table(runs):
    one, _ = runs
    table, restarted, position_ids = one["rotary"]
    assert restarted.shape == (table.shape[0], 2, 1, table.shape[-1])
    for b in range(2):
        for s in range(table.shape[0]):
            assert torch.equal(restarted[s, b, 0], table[position_ids[b, s], 0, 0])
    assert one["rotary_outside"]  # outside restarted(): the table unchanged
