#!/usr/bin/env python
"""Write the demo corpora and tokenize them into Megatron indexed datasets.

    python scripts/make_demo_data.py data/demo

writes OUT_DIR/{pretrain,finetune,finetune_heldout}.jsonl and, next to them,
OUT_DIR/<name>_text_document.bin/.idx (Megatron-LM's naming). Deterministic and idempotent:
outputs newer than their JSONL are left alone. Same as ``python -m megatron_lora.data
make-demo OUT_DIR``; errors are one line on stderr with exit code 2.
"""

import sys

import script_setup  # noqa: F401  (repository on sys.path, known warnings filtered)
from megatron_lora.data import main

if __name__ == "__main__":
    sys.exit(main(["make-demo", *sys.argv[1:]]))
