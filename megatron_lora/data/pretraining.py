"""Pretraining data: JSONL tokenized into megatron indexed datasets (``.bin``/``.idx``, what
Megatron-LM's ``tools/preprocess_data.py`` writes), and megatron-core ``GPTDataset`` s over them."""

from __future__ import annotations

import os
import struct
from typing import List, Optional, Tuple

import torch
from megatron.core.tokenizers import MegatronTokenizerBase

from ..atomic import staged_files
from ..errors import DataError
from ..tokenizers import ByteTokenizer
from .jsonl import read_jsonl_texts


# --- JSONL -> indexed dataset -----------------------------------------------------------------


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
    documents = tokens = 0
    with staged_files(bin_path, idx_path) as (tmp_bin, tmp_idx):
        builder = IndexedDatasetBuilder(str(tmp_bin),
                                        dtype=DType.optimal_dtype(tokenizer.vocab_size))
        try:
            for line_number, text in read_jsonl_texts(os.fspath(input_path), json_key):
                try:
                    ids = list(tokenizer.tokenize(text))
                except UnicodeEncodeError as error:  # e.g. a lone surrogate escaped in the JSON
                    raise DataError(f"{input_path}:{line_number}: cannot encode the text "
                                    f"({error.reason})") from None
                if append_eod:
                    ids.append(tokenizer.eod)
                if not ids:
                    continue  # an empty document would be a zero-length sequence; megatron skips
                builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
                documents += 1
                tokens += len(ids)
            if documents == 0:
                raise DataError(f"{input_path}: no documents")
            builder.finalize(str(tmp_idx))
        finally:
            if not builder.data_file.closed:
                builder.data_file.close()
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


def parse_split(split: str) -> List[float]:
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


_IDX_FIXED_BYTES = 34  # magic (9), version (8), dtype code (1), sequence and document counts
_TOKEN_DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 8: "uint16"}


def _checked_index(prefix: str, idx_path: str, bin_size: int):
    """The token dtype of a .idx that describes exactly a .bin of ``bin_size`` bytes, else a
    DataError naming the file and the fault."""
    import numpy

    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER

    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as stream:
        header = stream.read(_IDX_FIXED_BYTES)
    if len(header) < _IDX_FIXED_BYTES or not header.startswith(_INDEX_HEADER):
        raise DataError(f"{idx_path} is not a megatron indexed-dataset index")
    version, code, sequences, documents = struct.unpack("<QBQQ", header[len(_INDEX_HEADER):])
    if version != 1 or code not in _TOKEN_DTYPES:
        raise DataError(f"{idx_path}: version {version}, dtype code {code} is not an index of "
                        f"token ids these scripts read (version 1, an integer dtype)")
    expected = _IDX_FIXED_BYTES + 12 * sequences + 8 * documents
    if idx_size != expected:
        raise DataError(f"{idx_path} is {idx_size} bytes, but its header ({sequences} sequences, "
                        f"{documents} documents) needs {expected}: the index is truncated or "
                        f"damaged; preprocess {prefix} again")
    index = numpy.memmap(idx_path, mode="r", dtype=numpy.uint8)
    lengths = numpy.frombuffer(index, numpy.int32, sequences, _IDX_FIXED_BYTES)
    pointers = numpy.frombuffer(index, numpy.int64, sequences, _IDX_FIXED_BYTES + 4 * sequences)
    bounds = numpy.frombuffer(index, numpy.int64, documents, _IDX_FIXED_BYTES + 12 * sequences)
    dtype = numpy.dtype(_TOKEN_DTYPES[code])
    # the builder writes the sequences back to back from byte 0; the index must say so and
    # end where the .bin ends, or the two files are not a pair (in slices: bounded memory)
    end, contiguous, step = 0, True, 1 << 24
    for first in range(0, sequences, step):
        sizes = lengths[first:first + step].astype(numpy.int64) * dtype.itemsize
        ends = end + numpy.cumsum(sizes)
        contiguous = contiguous and bool((sizes >= 0).all()) \
            and numpy.array_equal(pointers[first:first + step], ends - sizes)
        end = int(ends[-1])
    if not contiguous or end != bin_size:
        cover = f"cover {end}" if contiguous else "overlap or leave gaps"
        raise DataError(f"{idx_path} does not describe {prefix}.bin ({bin_size} bytes; the "
                        f"index's sequences {cover}): the .idx belongs to another .bin or one "
                        f"of them is truncated; preprocess {prefix} again")
    if documents == 0 or bounds[0] != 0 or bounds[-1] != sequences \
            or (numpy.diff(bounds) < 0).any():
        raise DataError(f"{idx_path}: its document boundaries do not cover its {sequences} "
                        f"sequences; preprocess {prefix} again")
    return dtype


def check_indexed_dataset(data_prefix, vocab_size: int, what: str) -> None:
    """Refuse, with one line naming the file, an indexed dataset whose .idx does not describe
    its .bin, or whose token ids are outside [0, vocab_size): either would train on garbage
    or crash mid-run. Reads the .idx and one streaming pass over the .bin (numpy memmap)."""
    import numpy

    prefix = os.fspath(data_prefix)
    bin_path = f"{prefix}.bin"
    bin_size = os.path.getsize(bin_path)
    dtype = _checked_index(prefix, f"{prefix}.idx", bin_size)
    if bin_size == 0:
        return
    tokens = numpy.memmap(bin_path, mode="r", dtype=dtype)
    low, high = None, None
    step = 1 << 26  # bounded work per slice; the pages are the file's, not the heap's
    for start in range(0, len(tokens), step):
        part = tokens[start:start + step]
        part_low, part_high = int(part.min()), int(part.max())
        low = part_low if low is None else min(low, part_low)
        high = part_high if high is None else max(high, part_high)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise DataError(f"{what} {prefix}: {bin_path} holds token id {bad}, outside the model's "
                        f"vocabulary 0..{vocab_size - 1} (tokenized for another model? "
                        f"preprocess it with this run's tokenizer, or raise --vocab-size)")


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
    weights = parse_split(split)
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


def build_train_valid_datasets(settings, *, seq_length: int, seed: int,
                               num_samples: Tuple[int, int], tokenizer: MegatronTokenizerBase,
                               log=print):
    """The Trainer's (train, valid) ``GPTDataset`` s (a FORMATS builder): both split from
    ``settings.data_path`` by ``settings.split``, or valid wholly from
    ``settings.valid_data_path`` when one is given."""
    train_samples, eval_samples = num_samples
    train, valid, _ = build_gpt_datasets(
        settings.data_path, split=settings.split, seq_length=seq_length, seed=seed,
        num_samples=(train_samples, eval_samples, 0), tokenizer=tokenizer)
    if settings.valid_data_path:
        _, valid, _ = build_gpt_datasets(
            settings.valid_data_path, split="0,100,0", seq_length=seq_length, seed=seed,
            num_samples=(0, eval_samples, 0), tokenizer=tokenizer)
    return train, valid
