#!/usr/bin/env python
"""Pretrain a megatron-core GPT (full training; --lora-rank > 0 trains LoRA instead).

Megatron-LM's flag names, a YAML experiment through --config (flags override it), torchrun:

    torchrun --standalone --nproc-per-node 2 scripts/pretrain_gpt.py --config configs/cpu_demo.yaml \\
        --data-path DATA_PREFIX --train-iters 100 --save runs/pretrain

See megatron_lora/training/ for the loop, the checkpoint layout and exact resume.
"""

import sys

import script_setup  # noqa: F401  (repository on sys.path, known warnings filtered)
from megatron_lora.training import main

if __name__ == "__main__":
    sys.exit(main(mode="pretrain"))
