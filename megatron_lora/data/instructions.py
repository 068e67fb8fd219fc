"""Instruction data for ``--sft``: chat rows in JSONL, tokenized with the answer tokens marked,
cached, and served as padded or packed samples (docs/sft.md).

A row is one conversation, in one of three forms::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "..."}
    {"input": "...", "output": "..."}

The last two are one user turn and one assistant turn. With a chat template, the conversation
is rendered by it; without one (the byte tokenizer, a base tokenizer), a prompt/response row is
``prompt + response`` (no separator added) followed by the EOS token, and a ``messages`` row
is refused.

Which tokens count for the loss is decided on the rendered text, exactly for any template:
for the i-th message, an assistant turn, ``render(messages[:i], add_generation_prompt=True)``
ends where its answer starts and ``render(messages[:i+1])`` (trailing whitespace dropped) where
it ends, with the template's end-of-turn token. Every rendering must be a prefix of the whole
conversation's; a template that renders earlier turns differently later (one that drops past
reasoning, say) is refused. A token counts when it holds a character of an answer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..atomic import staged_files
from ..errors import DataError
from .jsonl import read_jsonl
from .pretraining import parse_split

ROLES = ("system", "user", "assistant")
# row forms other than "messages": (prompt key, answer key)
PAIR_KEYS = (("prompt", "response"), ("input", "output"))
# bump when what the cache holds changes meaning
CACHE_FORMAT = 1


# --- rows ---------------------------------------------------------------------------------------


def read_conversations(path) -> Iterator[Tuple[int, "Conversation"]]:
    """(line number, conversation) of every non-blank line of a JSONL file; a DataError naming
    the file and the line for anything that is not a conversation with an answer."""
    for line_number, row in read_jsonl(os.fspath(path)):
        yield line_number, conversation_of(row, f"{path}:{line_number}")


@dataclass(frozen=True)
class Conversation:
    messages: List[Dict[str, str]]
    pair: bool  # a prompt/response or input/output row (which needs no chat template)


def conversation_of(row, where: str) -> Conversation:
    """One row (any of the three forms), checked."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of "
                            f"{{\"role\", \"content\"}} objects")
        checked = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise DataError(f"{where}: message {index} must be an object with a 'role' "
                                f"and a 'content'")
            role, content = message["role"], message.get("content")
            if role not in ROLES:
                raise DataError(f"{where}: message {index} has role {role[:40]!r}; valid "
                                f"roles: {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise DataError(f"{where}: message {index} ({role}) has content of type "
                                f"{type(content).__name__}, expected a string")
            checked.append({"role": role, "content": content})
        pair = False
    else:
        for prompt_key, answer_key in PAIR_KEYS:
            if prompt_key in row or answer_key in row:
                break
        else:
            raise DataError(f"{where}: expected 'messages', 'prompt'/'response' or "
                            f"'input'/'output' (keys: {', '.join(sorted(row))[:200] or 'none'})")
        for key in (prompt_key, answer_key):
            if not isinstance(row.get(key), str):
                raise DataError(f"{where}: {key!r} must be a string (got "
                                f"{type(row.get(key)).__name__})")
        checked = [{"role": "user", "content": row[prompt_key]},
                   {"role": "assistant", "content": row[answer_key]}]
        pair = True
    if not any(m["role"] == "assistant" and m["content"].strip() for m in checked):
        raise DataError(f"{where}: no assistant content (nothing to train on)")
    return Conversation(checked, pair)


# --- rendering and the answer mask --------------------------------------------------------------


def chat_template_of(tokenizer) -> Optional[str]:
    return getattr(tokenizer, "chat_template", None) or None


def answer_spans(tokenizer, conversation: Conversation, where: str
                 ) -> Tuple[str, List[Tuple[int, int]]]:
    """The conversation's text and the [start, end) character ranges of its answers."""
    messages = conversation.messages
    if chat_template_of(tokenizer) is None:
        if not conversation.pair:
            raise DataError(f"{where}: a 'messages' conversation needs a tokenizer with a chat "
                            f"template ({tokenizer!r} has none); use prompt/response rows")
        prompt, answer = messages[0]["content"], messages[1]["content"]
        return prompt + answer, [(len(prompt), len(prompt) + len(answer))]

    def render(turns, generation_prompt=False) -> str:
        try:
            return tokenizer.apply_chat_template(turns, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except Exception as error:  # jinja raises its own kinds; the template's message
            raise DataError(f"{where}: the chat template fails on this conversation: "
                            f"{str(error).strip()[:200]}") from None

    text = render(messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = render(messages[:index], generation_prompt=True) if index else ""
        end = render(messages[:index + 1]).rstrip()
        if not (text.startswith(start) and text.startswith(end) and len(end) >= len(start)):
            raise DataError(f"{where}: the chat template renders earlier turns differently "
                            f"once later turns follow (message {index}), so the answer tokens "
                            f"cannot be found exactly; the rendering of a conversation must "
                            f"begin with the rendering of its first turns")
        spans.append((len(start), len(end)))
    return text, spans


def _counted_by_offsets(offsets, spans) -> List[bool]:
    # a token counts when its characters overlap an answer (a token that only starts inside
    # the prompt and runs into the answer carries answer text)
    counted = []
    for begin, end in offsets:
        end = max(end, begin + 1)
        counted.append(any(begin < s_end and end > s_begin for s_begin, s_end in spans))
    return counted


def tokenize_conversation(tokenizer, conversation: Conversation, where: str
                          ) -> Tuple[List[int], List[bool]]:
    """Token ids of a conversation and, per token, whether it belongs to an answer."""
    if isinstance(conversation, list):  # bare messages
        conversation = Conversation(conversation, pair=False)
    text, spans = answer_spans(tokenizer, conversation, where)
    hf = getattr(tokenizer, "hf", None)
    if hf is not None and getattr(hf, "is_fast", False):
        encoded = hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, counted = list(encoded["input_ids"]), _counted_by_offsets(
            encoded["offset_mapping"], spans)
    else:
        # no offsets (the byte tokenizer, a slow tokenizer): tokenize the pieces between
        # answer boundaries one by one
        ids, counted, cursor = [], [], 0
        for begin, end in spans:
            for piece, is_answer in ((text[cursor:begin], False), (text[begin:end], True)):
                if piece:
                    piece_ids = list(tokenizer.tokenize(piece))
                    ids += piece_ids
                    counted += [is_answer] * len(piece_ids)
            cursor = end
        if text[cursor:]:
            tail = list(tokenizer.tokenize(text[cursor:]))
            ids += tail
            counted += [False] * len(tail)
    if chat_template_of(tokenizer) is None:
        ids.append(tokenizer.eod)  # the plain form ends each answer with EOS, learnt too
        counted.append(True)
    if not any(counted):
        raise DataError(f"{where}: no token of the answer survives tokenization")
    return ids, counted


# --- tokenized files, cached --------------------------------------------------------------------


@dataclass
class TokenizedFile:
    """Every conversation of one JSONL file: ids and answer flags, flat, cut by ``offsets``."""

    path: str
    tokens: torch.Tensor  # int64 [total]
    counted: torch.Tensor  # bool [total]
    offsets: torch.Tensor  # int64 [conversations + 1]
    line_numbers: torch.Tensor  # int64 [conversations]

    def __len__(self) -> int:
        return len(self.line_numbers)

    def conversation(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        begin, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.tokens[begin:end], self.counted[begin:end]

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


def _tokenize_file(path: str, tokenizer) -> TokenizedFile:
    tokens, counted, offsets, lines = [], [], [0], []
    for line_number, conversation in read_conversations(path):
        ids, flags = tokenize_conversation(tokenizer, conversation, f"{path}:{line_number}")
        bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise DataError(f"{path}:{line_number}: token id {bad[0]} is outside the "
                            f"tokenizer's vocabulary of {tokenizer.vocab_size}")
        tokens += ids
        counted += flags
        offsets.append(len(tokens))
        lines.append(line_number)
    if not lines:
        raise DataError(f"{path}: no conversations")
    return TokenizedFile(path, torch.tensor(tokens, dtype=torch.int64),
                         torch.tensor(counted, dtype=torch.bool),
                         torch.tensor(offsets, dtype=torch.int64),
                         torch.tensor(lines, dtype=torch.int64))


def _save_atomically(path: Path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]):
    from safetensors.torch import save_file

    with staged_files(path) as (temporary,):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary),
                  metadata=metadata)


def cache_key(path: str, tokenizer) -> str:
    """What the tokenization depends on: the file's bytes, the tokenizer, its template."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    identity = dict(getattr(tokenizer, "unique_identifiers", {}) or {"repr": repr(tokenizer)})
    digest.update(json.dumps({"tokenizer": identity, "template": chat_template_of(tokenizer),
                              "format": CACHE_FORMAT}, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def load_tokenized(path, tokenizer, cache_dir=None, log: Callable[[str], None] = print,
                   check: Optional[Callable[[TokenizedFile], None]] = None) -> TokenizedFile:
    """The tokenized file, from the cache when it holds this file, tokenizer and template;
    otherwise tokenized and cached. Several processes may call it at once: one tokenizes
    under an exclusive lock, the others then read its result. ``check`` may refuse the file
    (a DataError) before anything is cached, and is applied to a cached one too."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"cannot read {path}: no such file")
    cache_dir = Path(cache_dir) if cache_dir else Path(path).resolve().parent / "sft-cache"
    made_directory = not cache_dir.exists()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot make the tokenization cache {cache_dir}: "
                        f"{error.strerror or error} (give --data-cache-path)") from None
    key = cache_key(path, tokenizer)
    cached = cache_dir / f"{Path(path).stem}-{key}.safetensors"
    lock_path = cache_dir / f"{cached.name}.lock"
    fields = ("tokens", "counted", "offsets", "line_numbers")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the process ends, however it ends
        try:
            if not cached.is_file():
                tokenized = _tokenize_file(path, tokenizer)
                if check is not None:
                    check(tokenized)
                _save_atomically(cached, {name: getattr(tokenized, name) for name in fields},
                                 {"source": path, "key": key})
                log(f"tokenized {path}: {len(tokenized)} conversations, "
                    f"{len(tokenized.tokens)} tokens (cached in {cached})")
                return tokenized
        except DataError:
            # a bad file leaves nothing behind: no cache entry, no lock, no new directory
            lock_path.unlink(missing_ok=True)
            if made_directory:
                with contextlib.suppress(OSError):
                    cache_dir.rmdir()
            raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    try:
        tensors = load_file(str(cached))
        tokenized = TokenizedFile(path, *(tensors[name] for name in fields))
    except Exception as error:  # safetensors raises its own kinds for a damaged file
        raise DataError(f"the tokenization cache {cached} cannot be read "
                        f"({str(error).strip()[:120]}); delete it to tokenize again") from None
    _check_cached(tokenized, tokenizer.vocab_size, cached)
    if check is not None:
        check(tokenized)
    return tokenized


def _check_cached(tokenized: TokenizedFile, vocab_size: int, cached: Path) -> None:
    """A cache entry is read only when it describes itself consistently (cheap checks)."""
    offsets, tokens = tokenized.offsets, tokenized.tokens
    sound = (tokens.dtype == torch.int64 and tokenized.counted.dtype == torch.bool
             and tokens.dim() == 1 and tokenized.counted.shape == tokens.shape
             and offsets.dim() == 1 and len(offsets) == len(tokenized.line_numbers) + 1
             and len(offsets) > 1 and int(offsets[0]) == 0 and int(offsets[-1]) == len(tokens)
             and bool((offsets[1:] > offsets[:-1]).all())
             and (not len(tokens) or 0 <= int(tokens.min()) and int(tokens.max()) < vocab_size))
    if not sound:
        raise DataError(f"the tokenization cache {cached} is inconsistent (damaged, or not "
                        f"written here); delete it to tokenize again")


# --- samples ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blend:
    """Files and their weights, megatron's ``--data-path W1 P1 W2 P2`` (or one file)."""

    paths: Tuple[str, ...]
    weights: Tuple[float, ...]

    @classmethod
    def parse(cls, values: Sequence[str], flag: str = "--data-path") -> "Blend":
        values = [str(v) for v in values]
        if len(values) == 1:
            return cls((values[0],), (1.0,))
        if len(values) % 2:
            raise DataError(f"{flag} takes one file, or weight-file pairs (W1 F1 W2 F2 ...); "
                            f"got {len(values)} values")
        weights = []
        for weight in values[0::2]:
            try:
                weights.append(float(weight))
            except ValueError:
                raise DataError(f"{flag} takes one file, or weight-file pairs (W1 F1 W2 F2 "
                                f"...); the weight {weight[:100]!r} is not a number") from None
        weights = tuple(weights)
        if any(not 0 < w < float("inf") for w in weights):
            raise DataError(f"{flag}: every weight must be a positive number, got "
                            f"{', '.join(map(str, weights))}")
        return cls(tuple(values[1::2]), weights)


def blend_order(weights: Sequence[float], count: int) -> List[int]:
    """Which source each of ``count`` samples comes from: at every step the source furthest
    below its share so far (megatron's blending rule; deterministic, no randomness)."""
    total = sum(weights)
    shares = [w / total for w in weights]
    taken = [0] * len(weights)
    order = []
    for step in range(count):
        source = max(range(len(shares)), key=lambda s: shares[s] * (step + 1) - taken[s])
        taken[source] += 1
        order.append(source)
    return order


class InstructionDataset:
    """Samples of ``seq_length`` tokens for the trainer: dicts of ``tokens``, ``labels``,
    ``loss_mask`` and ``position_ids`` [seq_length] (and ``segment_ids`` when packed).

    A conversation of T tokens gives T - 1 (input, label) pairs; one longer than
    ``seq_length + 1`` tokens is cut to that (``truncated`` counts them). Unpacked, a sample is
    one conversation padded at the end. Packed, conversations are placed whole, in a seeded
    shuffled order, into the first of the last few open samples with room; ``segment_ids``
    (1, 2, ... per conversation, 0 for padding) confine attention to each conversation and
    ``position_ids`` restart at 0 at each. Epochs are drawn as needed to give ``num_samples``
    (None: one epoch).
    """

    OPEN_BINS = 32  # how far back packing looks for room: dense enough, O(n) time

    def __init__(self, conversations: Sequence[Tuple[torch.Tensor, torch.Tensor]], *,
                 seq_length: int, seed: int, num_samples: Optional[int], pack: bool,
                 loss_on_all_tokens: bool, pad_id: int):
        self.seq_length, self.pack, self.pad_id = int(seq_length), pack, int(pad_id)
        self.loss_on_all_tokens = loss_on_all_tokens
        self.conversations = [(t[:self.seq_length + 1], c[:self.seq_length + 1])
                              for t, c in conversations]
        self.samples: List[List[int]] = []  # conversation indices of each sample
        epoch = 0
        while epoch == 0 or (num_samples is not None and len(self.samples) < num_samples):
            order = list(range(len(self.conversations)))
            random.Random(f"sft-{seed}-{epoch}").shuffle(order)
            self.samples += self._pack(order) if pack else [[i] for i in order]
            epoch += 1
        if num_samples is not None:
            del self.samples[max(1, int(num_samples)):]

    def _pack(self, order: List[int]) -> List[List[int]]:
        samples: List[List[int]] = []
        room: List[int] = []
        for index in order:
            length = len(self.conversations[index][0]) - 1
            for slot in range(max(0, len(samples) - self.OPEN_BINS), len(samples)):
                if room[slot] >= length:
                    samples[slot].append(index)
                    room[slot] -= length
                    break
            else:
                samples.append([index])
                room.append(self.seq_length - length)
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        size = self.seq_length
        tokens = torch.full((size,), self.pad_id, dtype=torch.int64)
        labels = torch.full((size,), self.pad_id, dtype=torch.int64)
        loss_mask = torch.zeros(size, dtype=torch.float32)
        positions = torch.arange(size, dtype=torch.int64)
        segments = torch.zeros(size, dtype=torch.int64)
        cursor = 0
        for segment, conversation in enumerate(self.samples[index], start=1):
            ids, counted = self.conversations[conversation]
            length = len(ids) - 1
            span = slice(cursor, cursor + length)
            tokens[span], labels[span] = ids[:-1], ids[1:]
            loss_mask[span] = 1.0 if self.loss_on_all_tokens else counted[1:].float()
            positions[span] = torch.arange(length)
            segments[span] = segment
            cursor += length
        sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                  "position_ids": positions}
        if self.pack:
            sample["segment_ids"] = segments
        return sample

    def padding_share(self) -> float:
        """The share of sample positions that hold no conversation."""
        used = sum(len(self.conversations[i][0]) - 1 for sample in self.samples for i in sample)
        return 1.0 - used / (len(self.samples) * self.seq_length)


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] boolean mask, True where attention is not allowed (megatron's convention):
    a token sees the earlier tokens of its own conversation only."""
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    size = segment_ids.shape[-1]
    causal = torch.ones(size, size, dtype=torch.bool, device=segment_ids.device).tril()
    return ~(same & causal).unsqueeze(1)


# --- the trainer's entry ------------------------------------------------------------------------


def split_ranges(count: int, split: str) -> Tuple[range, range]:
    """(train, valid) conversation index ranges of a file by --split weights (test unused)."""
    weights = parse_split(split)
    total = sum(weights)
    train_end = int(round(count * weights[0] / total))
    valid_end = int(round(count * (weights[0] + weights[1]) / total))
    return range(0, train_end), range(train_end, valid_end)


def build_instruction_datasets(settings, *, seq_length: int, seed: int,
                               num_samples: Tuple[int, int], tokenizer,
                               log: Callable[[str], None] = print):
    """(train, valid) InstructionDatasets for the trainer's settings (``--data-path`` blend,
    ``--valid-data-path`` or ``--split``), every file tokenized once through the cache."""
    cache_dir = getattr(settings, "data_cache_path", None)

    def load(path):
        return load_tokenized(path, tokenizer, cache_dir, log, check=lambda tokenized: (
            _refuse_long(tokenized, seq_length) if settings.sft_no_truncation else None))

    train_blend = Blend.parse(settings.data_path_values())
    files = [load(p) for p in train_blend.paths]
    if settings.valid_data_path:
        valid_blend = Blend.parse(settings.valid_data_path_values(), "--valid-data-path")
        valid_files = [load(p) for p in valid_blend.paths]
        train_parts = [[f.conversation(i) for i in range(len(f))] for f in files]
        valid_parts = [[f.conversation(i) for i in range(len(f))] for f in valid_files]
        train_lines = [list(f.line_numbers) for f in files]
        valid_lines = [list(f.line_numbers) for f in valid_files]
    else:
        valid_blend = train_blend
        train_parts, valid_parts, train_lines, valid_lines = [], [], [], []
        for f in files:
            train_range, valid_range = split_ranges(len(f), settings.split)
            train_parts.append([f.conversation(i) for i in train_range])
            valid_parts.append([f.conversation(i) for i in valid_range])
            train_lines.append([int(f.line_numbers[i]) for i in train_range])
            valid_lines.append([int(f.line_numbers[i]) for i in valid_range])

    _report_truncation(train_blend.paths, train_parts, train_lines, seq_length, log)
    _report_truncation(valid_blend.paths, valid_parts, valid_lines, seq_length, log)

    pad_id = tokenizer.pad if tokenizer.pad >= 0 else tokenizer.eod
    log(f"--sft data: {sum(map(len, train_parts))} training and "
        f"{sum(map(len, valid_parts))} held-out conversations"
        f"{', packed' if settings.sft_sequence_packing else ''}; loss on "
        f"{'every token' if settings.sft_loss_on_all_tokens else 'the answers'}")

    def dataset(blend, parts, count):
        if count == 0 or not any(parts):
            return None
        empty = [p for p, part in zip(blend.paths, parts) if not part]
        if empty:
            raise DataError(f"{empty[0]} gives no conversation to this split ({settings.split})")
        order = blend_order(blend.weights, count) if len(parts) > 1 else [0] * count
        per_source = [order.count(s) for s in range(len(parts))]
        sources = [InstructionDataset(part, seq_length=seq_length, seed=seed + s,
                                      num_samples=max(1, n), pack=settings.sft_sequence_packing,
                                      loss_on_all_tokens=settings.sft_loss_on_all_tokens,
                                      pad_id=pad_id)
                   for s, (part, n) in enumerate(zip(parts, per_source))]
        return sources[0] if len(sources) == 1 else BlendedDataset(sources, order)

    return (dataset(train_blend, train_parts, num_samples[0]),
            dataset(valid_blend, valid_parts, num_samples[1]))


def _refuse_long(tokenized: TokenizedFile, seq_length: int) -> None:
    """--sft-no-truncation: the first conversation longer than seq_length + 1 tokens."""
    too_long = (tokenized.lengths() > seq_length + 1).nonzero()
    if len(too_long):
        line = int(tokenized.line_numbers[int(too_long[0])])
        raise DataError(f"{tokenized.path}:{line}: the conversation is longer than --seq-length "
                        f"{seq_length} (+1 for the last label); raise --seq-length or drop "
                        f"--sft-no-truncation to truncate")


def _report_truncation(paths, parts, lines, seq_length, log) -> None:
    too_long = [(path, line, bool(counted[1:seq_length + 1].any()))
                for path, part, numbers in zip(paths, parts, lines)
                for (ids, counted), line in zip(part, numbers) if len(ids) > seq_length + 1]
    if not too_long:
        return
    path, line, _ = too_long[0]
    lost = sum(not kept for _, _, kept in too_long)
    log(f"truncated {len(too_long)} conversations longer than --seq-length {seq_length} "
        f"(the first: {path}:{line})"
        + (f"; {lost} of them lose every answer token and train nothing" if lost else ""))


class BlendedDataset:
    """Samples drawn from several datasets in a fixed order (:func:`blend_order`)."""

    def __init__(self, sources, order: List[int]):
        self.sources = sources
        self.index = []
        seen = [0] * len(sources)
        for source in order:
            self.index.append((source, seen[source]))
            seen[source] += 1

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int):
        source, position = self.index[index]
        return self.sources[source][position]
