"""Data for the training scripts, through megatron-core's own data path: a corpus prepared here
is a corpus Megatron-LM can read and the other way round.

    jsonl        JSONL input, each error one line naming the file and the line
    pretraining  JSONL -> megatron indexed datasets (.bin/.idx); GPTDataset s over them
    instructions chat-formatted JSONL (--sft): answer masks, a tokenization cache, padded or
                 packed samples
    sampling     micro_batches: one data-parallel rank's micro-batches in the global order,
                 so that a run resumed from ``consumed_samples`` continues exactly
    demo_corpus  the demo's deterministic pretraining and fine-tuning corpora
    cli          the command line

``FORMATS`` names the builders of the Trainer's (train, valid) datasets, one per data format;
a new format is one module and one line there. The tokenizers are in ``megatron_lora.tokenizers``.

Command line::

    python -m megatron_lora.data preprocess --input X.jsonl --output-prefix data/demo
    python -m megatron_lora.data make-demo OUT_DIR
"""

from ..errors import DataError
# the tokenizers lived here before tokenizers.py held both; their old import path keeps working
from ..tokenizers import TOKENIZER_NAME, ByteTokenizer, get_tokenizer
from . import instructions, pretraining
from .cli import main
from .demo_corpus import (
    DEMO_CORPORA,
    PAST_TENSE,
    TASK_SEPARATOR,
    demo_data_prefix,
    make_demo_corpora,
    make_demo_data,
    split_task_line,
    task_line,
)
from .jsonl import read_jsonl, read_jsonl_texts
from .pretraining import build_gpt_datasets, preprocess_jsonl
from .sampling import micro_batches

# data format -> builder of the Trainer's (train, valid) datasets, called as
# build(settings, seq_length=, seed=, num_samples=(train, valid), tokenizer=, log=) -> (train,
# valid), each a dataset of dicts of [seq_length] tensors (tokens, labels, loss_mask,
# position_ids, and segment_ids where conversations are packed)
FORMATS = {
    "pretraining": pretraining.build_train_valid_datasets,
    "sft": instructions.build_instruction_datasets,
}

__all__ = [
    "ByteTokenizer", "DEMO_CORPORA", "DataError", "FORMATS", "PAST_TENSE", "TASK_SEPARATOR",
    "TOKENIZER_NAME", "build_gpt_datasets", "demo_data_prefix", "get_tokenizer", "main",
    "make_demo_corpora", "make_demo_data", "micro_batches", "preprocess_jsonl", "read_jsonl",
    "read_jsonl_texts", "split_task_line", "task_line",
]
