"""The command line of ``python -m megatron_lora.data``: preprocess and make-demo."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..errors import DataError
from ..tokenizers import HF_TOKENIZER, TOKENIZER_NAME, build_tokenizer
from .demo_corpus import make_demo_data
from .pretraining import _preprocess


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

