"""Data for the training scripts: Megatron indexed datasets, GPT batches, the demo corpora.

Everything here goes through megatron-core's own data path, so a corpus prepared here is a
corpus Megatron-LM can read and the other way round:

* :func:`preprocess_jsonl` -- JSONL → ``<prefix>.bin`` / ``<prefix>.idx`` written with
  megatron's ``IndexedDatasetBuilder`` (what Megatron-LM's ``tools/preprocess_data.py`` does).
* :func:`build_gpt_datasets` -- train/valid/test ``GPTDataset`` s through
  ``BlendedMegatronDatasetBuilder``, on every rank of a process group.
* :func:`micro_batches` -- the stream of micro-batches of one data-parallel rank, in the
  global sample order, so that a run resumed from ``consumed_samples`` continues exactly.
* :func:`make_demo_corpora` / :func:`make_demo_data` -- a small deterministic pretraining
  corpus and a fine-tuning corpus in a pattern the pretraining corpus never shows.

Command line::

    python -m megatron_lora.data preprocess --input X.jsonl --output-prefix data/demo
    python -m megatron_lora.data make-demo OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import tempfile
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from megatron.core.tokenizers import MegatronTokenizerBase

from .errors import DataError
# ByteTokenizer, get_tokenizer and DataError lived here before tokenizers.py held both tokenizers
from .tokenizers import (  # noqa: F401
    HF_TOKENIZER,
    TOKENIZER_NAME,
    ByteTokenizer,
    build_tokenizer,
    get_tokenizer,
)


# --- JSONL -> indexed dataset -----------------------------------------------------------------


def _read_jsonl(path: str, json_key: str) -> Iterator[Tuple[int, str]]:
    """(line number, ``json_key`` text) of every non-blank line; ValueError naming file and line."""
    try:
        stream = open(path, "rb")  # decoded line by line, so errors get the right line number
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    with stream:
        for line_number, raw in enumerate(stream, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{line_number}: not UTF-8 ({error.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object, "
                                 f"got {type(record).__name__}")
            if json_key not in record:
                raise DataError(f"{path}:{line_number}: no key {json_key!r} "
                                 f"(keys: {', '.join(sorted(record)) or 'none'})")
            text = record[json_key]
            if not isinstance(text, str):
                raise DataError(f"{path}:{line_number}: {json_key!r} is "
                                 f"{type(text).__name__}, expected a string")
            yield line_number, text


def _preprocess(input_path, output_prefix, json_key, append_eod, tokenizer):
    """preprocess_jsonl, also returning (documents, tokens) for reports."""
    from megatron.core.datasets.indexed_dataset import (
        DType,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

    if not os.path.isfile(input_path):  # before any output directory is made
        raise DataError(f"cannot read {input_path}: no such file")
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    output_prefix = os.fspath(output_prefix)
    bin_path, idx_path = get_bin_path(output_prefix), get_idx_path(output_prefix)
    directory = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(directory, exist_ok=True)
    # temporary names in the same directory, so the final renames are atomic
    fd, tmp_prefix = tempfile.mkstemp(prefix=f".{os.path.basename(output_prefix)}.", dir=directory)
    os.close(fd)
    tmp_bin, tmp_idx = get_bin_path(tmp_prefix), get_idx_path(tmp_prefix)
    documents = tokens = 0
    builder = None
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=DType.optimal_dtype(tokenizer.vocab_size))
        for line_number, text in _read_jsonl(os.fspath(input_path), json_key):
            try:
                ids = list(tokenizer.tokenize(text))
            except UnicodeEncodeError as error:  # e.g. a lone surrogate escaped in the JSON
                raise DataError(f"{input_path}:{line_number}: cannot encode the text "
                                 f"({error.reason})") from None
            if append_eod:
                ids.append(tokenizer.eod)
            if not ids:
                continue  # an empty document would be a zero-length sequence; megatron skips them
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            documents += 1
            tokens += len(ids)
        if documents == 0:
            raise DataError(f"{input_path}: no documents")
        builder.finalize(tmp_idx)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for path in (tmp_prefix, tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
    return bin_path, idx_path, documents, tokens


def preprocess_jsonl(
    input_path,
    output_prefix,
    *,
    json_key: str = "text",
    append_eod: bool = True,
    tokenizer: Optional[MegatronTokenizerBase] = None,
) -> Tuple[str, str]:
    """Tokenize a JSONL file into megatron's ``<output_prefix>.bin`` / ``.idx``.

    One document per non-blank line, its text under ``json_key``; with ``append_eod`` each
    document ends with the tokenizer's end-of-document id. Both files are written under
    temporary names and renamed at the end, so a failed run leaves no output behind. A bad
    line raises ValueError naming the file and the line. Returns ``(bin_path, idx_path)``.
    """
    bin_path, idx_path, _, _ = _preprocess(input_path, output_prefix, json_key, append_eod,
                                           tokenizer)
    return bin_path, idx_path


# --- GPT datasets ----------------------------------------------------------------------------


def _parse_split(split: str) -> List[float]:
    try:
        weights = [float(part) for part in str(split).split(",")]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(not 0 <= w < float("inf") for w in weights) or sum(weights) <= 0:
        raise DataError(f"split {split!r}: expected up to three non-negative comma-separated "
                         f"weights for train,valid,test with a positive sum, e.g. '98,2,0'")
    return weights + [0.0] * (3 - len(weights))


def _sequence_count(idx_path: str) -> int:
    """Number of sequences in a megatron .idx file, read from its header."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER

    with open(idx_path, "rb") as stream:
        header = stream.read(len(_INDEX_HEADER) + 8 + 1 + 8)
    if len(header) < len(_INDEX_HEADER) + 17 or not header.startswith(_INDEX_HEADER):
        raise DataError(f"{idx_path} is not a megatron indexed-dataset index")
    (count,) = struct.unpack("<Q", header[-8:])
    return count


def build_gpt_datasets(
    data_prefix,
    *,
    split: str = "98,2,0",
    seq_length: int,
    seed: int,
    num_samples: Tuple[Optional[int], Optional[int], Optional[int]],
    tokenizer: Optional[MegatronTokenizerBase] = None,
    cache_dir=None,
):
    """(train, valid, test) megatron-core ``GPTDataset`` s over one indexed dataset.

    ``split`` weights the documents between train, valid and test like Megatron-LM's
    ``--split``; a split of weight 0 is None. ``num_samples`` is the number of sequences of
    ``seq_length`` tokens each split must provide (None: one pass over its documents); the
    order of samples depends only on ``seed``. megatron builds whole epochs, so ``len`` may
    exceed ``num_samples``. A sample is a dict of [seq_length] tensors ``tokens``, ``labels``
    (tokens shifted by one), ``loss_mask`` and ``position_ids``. Index files are cached under
    ``cache_dir`` (default ``<prefix dir>/index-cache``).

    Call on every rank when torch.distributed is initialised: rank 0 builds the cache first,
    the other ranks then read it, and every rank gets its datasets.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path
    from megatron.core.datasets.utils import normalize

    prefix = os.path.abspath(os.fspath(data_prefix))
    missing = [p for p in (get_bin_path(prefix), get_idx_path(prefix)) if not os.path.isfile(p)]
    if missing:
        hint = " (pass the prefix, without .bin/.idx)" if prefix.endswith((".bin", ".idx")) else ""
        raise DataError(f"indexed dataset {data_prefix}{hint}: missing {', '.join(missing)}")
    weights = _parse_split(split)
    if int(seq_length) < 1:
        raise DataError(f"seq_length must be positive, got {seq_length}")
    num_samples = list(num_samples)
    if len(num_samples) != 3 or any(n is not None and int(n) < 0 for n in num_samples):
        raise DataError(f"num_samples must be (train, valid, test) of counts >= 0 or None, "
                         f"got {num_samples}")

    # megatron loops forever when a split has no tokens, so refuse one with no documents
    # (the same rounding as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits)
    count = _sequence_count(get_idx_path(prefix))
    for name, bookends in zip(("train", "valid", "test"),
                              convert_split_vector_to_split_matrix(normalize(weights))):
        if bookends is not None and (int(round(bookends[1] * count))
                                     == int(round(bookends[0] * count))):
            raise DataError(f"split {split!r} leaves the {name} split of {data_prefix} "
                             f"({count} documents) with no document; give it more data or "
                             f"weight 0")

    if cache_dir is None:
        cache_dir = os.path.join(os.path.dirname(prefix), "index-cache")
    config = GPTDatasetConfig(
        random_seed=int(seed),
        sequence_length=int(seq_length),
        blend=([prefix], None),
        split=",".join(repr(w) for w in weights),
        path_to_cache=os.fspath(cache_dir),
        tokenizer=tokenizer if tokenizer is not None else ByteTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        # the GPT forward builds its causal mask itself; an [s, s] mask per sample is waste
        create_attention_mask=False,
    )
    # every rank that holds a model replica or shard needs the data (TP ranks read the same
    # tokens); megatron builds on rank 0 first and barriers before the others read the cache
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, [None if n is None else int(n) for n in num_samples], lambda: True, config
    )
    train, valid, test = builder.build()
    return train, valid, test


_BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def micro_batches(
    dataset,
    *,
    micro_batch_size: int,
    start_sample: int = 0,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
) -> Iterator[Dict[str, torch.Tensor]]:
    """Endless micro-batches of one data-parallel rank: dicts of [micro_batch_size, seq] tensors.

    The k-th micro-batch of DP rank r holds global samples
    ``start_sample + k*dp*mbs + r*mbs + j`` (j < mbs), modulo ``len(dataset)`` -- Megatron's
    pretraining sampler order: each step of dp*mbs samples is cut into consecutive slices, one
    per DP rank. Restarting with ``start_sample = consumed_samples`` continues an interrupted
    stream exactly; TP/PP ranks of one DP rank get the same batches.
    """
    micro_batch_size, start_sample = int(micro_batch_size), int(start_sample)
    data_parallel_rank, data_parallel_size = int(data_parallel_rank), int(data_parallel_size)
    if micro_batch_size < 1:
        raise DataError(f"micro_batch_size must be positive, got {micro_batch_size}")
    if start_sample < 0:
        raise DataError(f"start_sample must be >= 0, got {start_sample}")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise DataError(f"data_parallel_rank {data_parallel_rank} is not in "
                         f"[0, {data_parallel_size})")
    if dataset is None or len(dataset) == 0:
        raise DataError("micro_batches needs a non-empty dataset")

    def generate():
        size = len(dataset)
        base = start_sample + data_parallel_rank * micro_batch_size
        stride = data_parallel_size * micro_batch_size
        while True:
            samples = [dataset[(base + j) % size] for j in range(micro_batch_size)]
            yield {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
                   for key in _BATCH_KEYS}
            base += stride

    # a generator function would check the arguments only at the first next()
    return generate()


# --- demo corpora ----------------------------------------------------------------------------

# The demo's fine-tuning task: the verb of a sentence in the past tense, one sentence per line,
#     "The red fox sees a dog. -> saw"
# which asks the model to find the verb among the sentence's words and to conjugate it
# (regular and irregular verbs). The pretraining corpus is short stories in a small
# English-like grammar, each told wholly in the present or wholly in the past tense: the base
# learns the words of both tenses and where a verb stands, but it never sees "->" nor a
# present-tense verb next to its past: pairing the tenses is what the adapter has to learn.
# (Rewriting the whole sentence would also need copying from the context, and a base this
# small did not learn to copy within the demo's pretraining budget, even from repetition.)
TASK_SEPARATOR = " ->"

_DETERMINERS = ("the", "a", "my", "your", "her", "his", "our", "that", "this")
_ADJECTIVES = ("small", "big", "red", "old", "young", "happy", "quiet", "green", "brave",
               "tired", "clever", "little", "blue", "kind", "lazy", "bright")
_NOUNS = ("cat", "dog", "bird", "girl", "boy", "farmer", "teacher", "fox", "horse", "king",
          "queen", "child", "sailor", "baker", "rabbit", "owl", "friend", "doctor")
_OBJECTS = ("ball", "book", "apple", "letter", "hat", "song", "cake", "box", "flower", "map",
            "key", "basket", "lamp", "boat", "picture", "coat")
# present -> past, regular and irregular
_TRANSITIVE = {"sees": "saw", "likes": "liked", "finds": "found", "carries": "carried",
               "watches": "watched", "follows": "followed", "paints": "painted", "holds": "held",
               "wants": "wanted", "loves": "loved", "helps": "helped", "visits": "visited",
               "brings": "brought", "takes": "took", "opens": "opened", "draws": "drew"}
_INTRANSITIVE = {"sleeps": "slept", "sings": "sang", "runs": "ran", "waits": "waited",
                 "smiles": "smiled", "dances": "danced", "sits": "sat", "laughs": "laughed",
                 "walks": "walked", "rests": "rested"}
_COPULA = {"is": "was"}
PAST_TENSE = {**_TRANSITIVE, **_INTRANSITIVE, **_COPULA}
_PLACES = ("in the garden", "near the river", "on the hill", "at the market", "under the tree",
           "by the sea", "in the kitchen", "behind the house", "at school", "in the forest")
_TIMES = ("every morning", "at night", "today", "in the evening", "on sunday", "again")


def _noun_phrase(rng: random.Random, nouns) -> str:
    words = [rng.choice(_DETERMINERS)]
    if rng.random() < 0.5:
        words.append(rng.choice(_ADJECTIVES))
    words.append(rng.choice(nouns))
    return " ".join(words)


def _verb_and_complement(rng: random.Random) -> Tuple[str, str]:
    kind = rng.random()
    if kind < 0.55:
        return rng.choice(sorted(_TRANSITIVE)), _noun_phrase(rng, _OBJECTS + _NOUNS)
    if kind < 0.8:
        return rng.choice(sorted(_INTRANSITIVE)), ""
    return "is", rng.choice(_ADJECTIVES)


def _clause(rng: random.Random, adverbials: bool) -> List[str]:
    """A sentence as its parts [subject, present-tense verb, complement, place, time] ('' for
    none), to be rendered in either tense."""
    verb, complement = _verb_and_complement(rng)
    place = rng.choice(_PLACES) if adverbials and rng.random() < 0.5 else ""
    time = rng.choice(_TIMES) if adverbials and rng.random() < 0.3 else ""
    return [_noun_phrase(rng, _NOUNS), verb, complement, place, time]


def _render(parts: Sequence[str], past: bool) -> str:
    subject, verb, *rest = parts
    text = " ".join(p for p in (subject, PAST_TENSE[verb] if past else verb, *rest) if p)
    return text[0].upper() + text[1:] + "."


def _pretrain_document(rng: random.Random) -> str:
    """A story: 2-5 sentences, all in the present or all in the past tense."""
    past = rng.random() < 0.5
    return " ".join(_render(_clause(rng, adverbials=True), past)
                    for _ in range(rng.randint(2, 5)))


def task_line(parts: Sequence[str]) -> str:
    """One fine-tuning line: the sentence, the separator, its verb in the past tense."""
    return f"{_render(parts, past=False)}{TASK_SEPARATOR} {PAST_TENSE[parts[1]]}"


def split_task_line(line: str) -> Tuple[str, str]:
    """(prompt, expected answer) of a fine-tuning line: ("S ->", " <verb in the past tense>")."""
    cut = line.index(TASK_SEPARATOR) + len(TASK_SEPARATOR)
    return line[:cut], line[cut:]


def _task_document(rng: random.Random, exclude=frozenset()) -> str:
    """1-4 task lines; sentences whose prompt is in ``exclude`` (the held-out ones) are skipped."""
    lines: List[str] = []
    for _ in range(rng.randint(1, 4)):
        line = task_line(_clause(rng, adverbials=False))
        while split_task_line(line)[0] in exclude:
            line = task_line(_clause(rng, adverbials=False))
        lines.append(line)
    return "\n".join(lines)


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_if_changed(path: str, content: str) -> None:
    """Write atomically, and not at all when the file already holds ``content``: an unchanged
    corpus keeps its timestamp, so make_demo_data can tell that its outputs are up to date."""
    data = content.encode("utf-8")
    try:
        with open(path, "rb") as stream:
            if stream.read() == data:
                return
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
        os.chmod(tmp, _default_file_mode())  # mkstemp makes it private; a corpus is not
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


DEMO_CORPORA = ("pretrain", "finetune", "finetune_heldout")


def make_demo_corpora(
    out_dir,
    *,
    seed: int = 0,
    pretrain_docs: int = 5000,
    finetune_docs: int = 5000,
    heldout_docs: int = 200,
) -> Dict[str, str]:
    """Write ``pretrain.jsonl``, ``finetune.jsonl`` and ``finetune_heldout.jsonl`` into
    ``out_dir``; the same arguments always give the same bytes. Returns name -> path.

    pretrain: a story of 2-5 sentences of a small English-like grammar per document, all in the
    present or all in the past tense. finetune and finetune_heldout: 1-4 lines
    ``<present-tense sentence> -> <its verb in the past tense>`` per document, from independent
    random streams; no fine-tuning line has the prompt of a held-out line.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    def documents(name, count, make_document):
        # string seeds are hashed deterministically (not by PYTHONHASHSEED)
        rng = random.Random(f"megatron_lora-demo-{name}-{seed}")
        return [make_document(rng) for _ in range(int(count))]

    texts = {"pretrain": documents("pretrain", pretrain_docs, _pretrain_document),
             "finetune_heldout": documents("finetune_heldout", heldout_docs, _task_document)}
    heldout_prompts = frozenset(split_task_line(line)[0] for text in texts["finetune_heldout"]
                                for line in text.split("\n"))
    texts["finetune"] = documents("finetune", finetune_docs,
                                  lambda rng: _task_document(rng, exclude=heldout_prompts))
    paths = {}
    for name in DEMO_CORPORA:
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        _write_if_changed(paths[name], "".join(json.dumps({"text": text}) + "\n"
                                               for text in texts[name]))
    return paths


def demo_data_prefix(out_dir, name: str) -> str:
    """Megatron-LM's naming: ``<out_dir>/<name>_text_document``."""
    return os.path.join(os.fspath(out_dir), f"{name}_text_document")


def make_demo_data(out_dir, *, seed: int = 0, log: Callable[[str], None] = print) -> Dict[str, str]:
    """The demo corpora (make_demo_corpora) tokenized into ``<out_dir>/<name>_text_document``
    ``.bin``/``.idx``. Outputs newer than their JSONL are kept. Returns name -> data prefix."""
    from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

    jsonl = make_demo_corpora(out_dir, seed=seed)
    prefixes = {}
    for name in DEMO_CORPORA:
        prefix = prefixes[name] = demo_data_prefix(out_dir, name)
        outputs = (get_bin_path(prefix), get_idx_path(prefix))
        source_time = os.path.getmtime(jsonl[name])
        if all(os.path.isfile(p) and os.path.getmtime(p) >= source_time for p in outputs):
            log(f"up to date: {prefix}.{{bin,idx}}")
            continue
        _, _, documents, tokens = _preprocess(jsonl[name], prefix, "text", True, None)
        log(f"wrote {prefix}.{{bin,idx}}: {documents} documents, {tokens} tokens "
            f"(from {jsonl[name]})")
    return prefixes


# --- command line ----------------------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line from main(), not usage + message
        raise DataError(f"{self.prog}: {message}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _ArgumentParser(prog="python -m megatron_lora.data",
                             description="Prepare Megatron indexed datasets.")
    commands = parser.add_subparsers(dest="command", required=True)
    pre = commands.add_parser("preprocess", help="JSONL -> <prefix>.bin/.idx")
    pre.add_argument("--input", required=True, help="JSONL file, one JSON object per line")
    pre.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    pre.add_argument("--json-key", default="text", help="key holding the text (default: text)")
    pre.add_argument("--tokenizer", default=TOKENIZER_NAME, help="tokenizer name (default: byte)")
    pre.add_argument("--tokenizer-type", default=None,
                     help="HuggingFaceTokenizer (with --tokenizer-model DIR) or byte")
    pre.add_argument("--tokenizer-model", default=None,
                     help="directory of a Hugging Face tokenizer (local files only)")
    pre.add_argument("--no-eod", action="store_true", help="do not end documents with EOD")
    demo = commands.add_parser("make-demo", help="write and tokenize the demo corpora")
    demo.add_argument("out_dir")
    demo.add_argument("--seed", type=int, default=0)
    try:
        args = parser.parse_args(argv)
        if args.command == "preprocess":
            kind = args.tokenizer_type or (HF_TOKENIZER if args.tokenizer_model else args.tokenizer)
            bin_path, idx_path, documents, tokens = _preprocess(
                args.input, args.output_prefix, args.json_key, not args.no_eod,
                build_tokenizer(kind, args.tokenizer_model))
            print(f"wrote {bin_path} and {idx_path}: {documents} documents, {tokens} tokens")
        else:
            make_demo_data(args.out_dir, seed=args.seed)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
