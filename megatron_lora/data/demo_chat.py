"""The demo as a Hugging Face user lives it: a tokenizer with a chat template, the task as chat
rows, and scoring with transformers + peft (never this package's own model code).

* :func:`make_demo_tokenizer` -- a word-level tokenizer (the ``tokenizers`` library) for the
  demo's small grammar, with ChatML turns (``<|im_start|>role ... <|im_end|>``), saved for
  ``AutoTokenizer.from_pretrained(dir, local_files_only=True)``;
* :func:`write_chat_corpus` -- the fine-tuning task ("The red fox sees a dog." → "saw") as
  JSONL rows ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``;
* :func:`chat_examples` -- (conversation up to the user turn, expected answer) of such a file;
* :func:`score` -- exact-match accuracy of greedy answers of the base alone, the base + the
  adapter through peft, and the merged checkpoint, all loaded with transformers.

Why word-level: every word of the grammar is one token wherever it stands, so the answer "saw"
after the assistant header is the very token the base saw in its past-tense stories (a byte-
level BPE would make it "saw", a token the stories never show, where they have " saw").
Whitespace is not part of any token; decoding puts one space between words and none before
punctuation, which gives the demo's texts back exactly. A word outside the grammar is
``<unk>``: this is the demo's tokenizer, not a general one.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .demo_corpus import write_if_changed

# --- the tokenizer -----------------------------------------------------------------------------

UNK, PAD, IM_START, IM_END = "<unk>", "<pad>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (UNK, PAD, IM_START, IM_END)  # ids 0..3, in this order
ROLES = ("system", "user", "assistant")
# ChatML. Every turn ends with <|im_end|>, the EOS (generation stops there, and megatron's
# preprocessing ends each pretraining document with it). The {% generation %} block marks the
# assistant's tokens for transformers' return_assistant_tokens_mask. The newlines are for
# readers: whitespace is no token, so the prompt rendered with add_generation_prompt is a token
# prefix of the whole conversation.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# what save_pretrained must have written for AutoTokenizer to load the demo tokenizer
REQUIRED_FILES = ("tokenizer.json", "tokenizer_config.json")


def _words(texts: Iterable[str]) -> List[str]:
    """The distinct pre-tokens (words, punctuation runs) of ``texts``, sorted."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    words = set()
    for text in texts:
        words.update(piece for piece, _ in split.pre_tokenize_str(text))
    return sorted(words)


def build_demo_tokenizer(corpus_texts: Iterable[str]):
    """The demo's tokenizer as a transformers ``PreTrainedTokenizerFast`` (nothing written):
    the special tokens (ids 0-3), then every word and punctuation run of ``corpus_texts`` and
    the role names, sorted -- so the same texts give the same ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for w in _words([*corpus_texts, " ".join(ROLES)]) if w not in SPECIAL_TOKENS]
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # words joined by spaces, then " ." -> "." (WordPiece's clean-up); no token has "##"
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token=UNK, pad_token=PAD, eos_token=IM_END,
        additional_special_tokens=[IM_START], model_max_length=4096,
        clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _same_files(left: Path, right: Path) -> bool:
    if not right.is_dir():
        return False
    names = sorted(p.name for p in left.iterdir())
    return (names == sorted(p.name for p in right.iterdir())
            and all(filecmp.cmp(left / n, right / n, shallow=False) for n in names))


def make_demo_tokenizer(corpus_texts: Iterable[str], out_dir) -> Path:
    """Save the demo's tokenizer (:func:`build_demo_tokenizer`) into ``out_dir`` for
    ``AutoTokenizer.from_pretrained(out_dir, local_files_only=True)``.

    The files are written in a sibling directory and swapped in whole; when ``out_dir``
    already holds the same bytes nothing is touched (its timestamps say since when the
    tokenizer is what it is, which is what the demo's caches compare with). Returns out_dir."""
    from ..atomic import build_directory_atomically

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        written = Path(scratch)
        build_demo_tokenizer(corpus_texts).save_pretrained(str(written))
        missing = [n for n in REQUIRED_FILES if not (written / n).is_file()]
        if missing:
            raise RuntimeError(f"transformers' save_pretrained did not write {missing}")
        if _same_files(written, out_dir):
            return out_dir

        def fill(staging: Path) -> None:
            for path in written.iterdir():
                shutil.copyfile(path, staging / path.name)
                (staging / path.name).chmod(0o644)
            staging.chmod(0o755)

        # the demo owns this directory: an older tokenizer there is always replaced
        build_directory_atomically(out_dir, fill, not_replaceable=lambda existing: None)
    return out_dir


# --- the task as chat rows ---------------------------------------------------------------------


def task_conversations(task_jsonl, system_prompt: Optional[str] = None) -> List[List[dict]]:
    """Every line ``<sentence> -> <past tense>`` of a task corpus (make_demo_corpora's
    ``finetune.jsonl`` / ``finetune_heldout.jsonl``), in order, as a conversation: an optional
    system turn, the sentence as the user turn, the verb in the past tense as the assistant's."""
    from .demo_corpus import TASK_SEPARATOR, split_task_line

    conversations = []
    with open(task_jsonl, encoding="utf-8") as stream:
        for record in stream:
            if not record.strip():
                continue
            for line in json.loads(record)["text"].split("\n"):
                prompt, answer = split_task_line(line)
                sentence = prompt[:-len(TASK_SEPARATOR)].strip()
                turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
                conversations.append(turns + [{"role": "user", "content": sentence},
                                              {"role": "assistant", "content": answer.strip()}])
    return conversations


def write_chat_corpus(task_jsonl, out_path, system_prompt: Optional[str] = None) -> int:
    """Write :func:`task_conversations` of ``task_jsonl`` to ``out_path`` as JSONL rows
    ``{"messages": [...]}``: atomically, and not at all when the file already holds those
    bytes (so its timestamp stays). Returns the number of rows."""
    rows = task_conversations(task_jsonl, system_prompt)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_if_changed(str(out_path),
                     "".join(json.dumps({"messages": messages}) + "\n" for messages in rows))
    return len(rows)


def chat_examples(chat_jsonl, count: Optional[int] = None) -> List[Tuple[List[dict], str]]:
    """(the conversation before its last assistant turn, that turn's content) of the first
    ``count`` rows of a chat JSONL file (all rows when None)."""
    examples = []
    with open(chat_jsonl, encoding="utf-8") as stream:
        for record in stream:
            if not record.strip():
                continue
            if count is not None and len(examples) >= count:
                break
            messages = json.loads(record)["messages"]
            if messages[-1]["role"] != "assistant":
                raise ValueError(f"{chat_jsonl}: a row does not end with an assistant turn")
            examples.append((messages[:-1], messages[-1]["content"]))
    return examples


# --- scoring with transformers + peft ----------------------------------------------------------


def greedy_answers(model, tokenizer, conversations: Sequence[List[dict]], *,
                   max_new_tokens: int = 8, batch_size: int = 64) -> List[str]:
    """transformers' greedy ``generate`` for each conversation, rendered with the chat template
    and ``add_generation_prompt``; batched with left padding, stopping at the EOS (the end of
    the assistant's turn). The answers are the new tokens decoded without special tokens,
    stripped."""
    import torch

    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(conversations), batch_size):
        batch = tokenizer.apply_chat_template(
            list(conversations[start:start + batch_size]), add_generation_prompt=True,
            tokenize=True, padding=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            output = model.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = output[:, batch["input_ids"].shape[1]:]
        answers += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def score(hf_base_dir, peft_adapter_dir, merged_dir,
          examples: Sequence[Tuple[List[dict], str]], *, batch_size: int = 64,
          max_new_tokens: int = 8) -> Dict[str, Tuple[List[bool], List[str]]]:
    """Greedy answers to ``examples`` ((conversation, expected answer), as chat_examples gives)
    of three models, all loaded by transformers from local files only:

    * ``base alone``: ``AutoModelForCausalLM`` from ``hf_base_dir``;
    * ``base + adapter (peft)``: that base with ``PeftModel.from_pretrained`` of
      ``peft_adapter_dir`` (an export-peft directory);
    * ``merged``: ``AutoModelForCausalLM`` from ``merged_dir`` (export-hf of the adapter).

    The tokenizer is ``hf_base_dir``'s. Returns {name: (exact-match verdicts, answers)}; a
    directory given as None is skipped."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_base_dir), local_files_only=True)
    conversations = [conversation for conversation, _ in examples]
    expected = [answer.strip() for _, answer in examples]

    def base_model():
        return AutoModelForCausalLM.from_pretrained(
            str(hf_base_dir), local_files_only=True, dtype=torch.float32)

    loaders = {"base alone": base_model}
    if peft_adapter_dir is not None:
        loaders["base + adapter (peft)"] = lambda: PeftModel.from_pretrained(
            base_model(), str(peft_adapter_dir), local_files_only=True)
    if merged_dir is not None:
        loaders["merged"] = lambda: AutoModelForCausalLM.from_pretrained(
            str(merged_dir), local_files_only=True, dtype=torch.float32)
    results = {}
    for name, load in loaders.items():
        model = load().eval()
        answers = greedy_answers(model, tokenizer, conversations, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens)
        results[name] = ([a == e for a, e in zip(answers, expected)], answers)
        del model
    return results
