#!/usr/bin/env python
"""Completions of prompts from a megatron dist-checkpoint or a Hugging Face directory, with an
optional LoRA adapter (KV-cached; greedy, or --temperature / --top-p sampling):

    python scripts/generate.py --pretrained-checkpoint runs/pretrain --lora-load runs/finetune/adapter \\
        --prompt "2 + 2 =" --no-chat-template --max-new-tokens 16
    python scripts/generate.py --pretrained-checkpoint HF_DIR --prompts-file prompts.jsonl \\
        --tensor-model-parallel-size 2 --nproc-per-node 2 --output completions.jsonl

See megatron_lora/generate_cli.py for the flags and megatron_lora/generation.py for the method.
"""

import sys

import script_setup  # noqa: F401  (repository on sys.path, known warnings filtered)
from megatron_lora.generate_cli import main

if __name__ == "__main__":
    sys.exit(main())
