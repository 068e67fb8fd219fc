#!/usr/bin/env python
"""Write the demo corpora and tokenize them into Megatron indexed datasets.

    python scripts/make_demo_data.py data/demo

writes OUT_DIR/{pretrain,finetune,finetune_heldout}.jsonl and, next to them,
OUT_DIR/<name>_text_document.bin/.idx (Megatron-LM's naming). Deterministic and idempotent:
outputs newer than their JSONL are left alone. Same as ``python -m megatron_lora.data
make-demo OUT_DIR``; errors are one line on stderr with exit code 2.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lora.data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["make-demo", *sys.argv[1:]]))
