#!/usr/bin/env python
"""LoRA fine-tuning of a megatron-core GPT (--lora-rank required).

Megatron-LM's flag names, a YAML experiment through --config (flags override it), torchrun:

    torchrun --standalone --nproc-per-node 2 scripts/finetune_gpt.py --config configs/cpu_demo.yaml \\
        --data-path DATA_PREFIX --train-iters 100 --save runs/finetune --lora-rank 8

See megatron_lora/training.py for the loop, the checkpoint layout and exact resume.
"""

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# megatron-core announces its fallbacks (no TransformerEngine/Apex) and gloo its deprecations on
# every import and call; they are expected here and would bury the progress output
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS")

from megatron_lora.training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(mode="finetune"))
