#!/usr/bin/env python
"""The main job: a real LoRA fine-tuning run, end to end, on a 2-core CPU.

1. makes the demo corpora and their megatron indexed datasets (cached in runs/demo/data);
2. obtains a small pretrained base: pretrain_gpt.py on the pretraining corpus, full training
   at TP=2 + SP, cached in runs/demo/base (later runs reuse it);
3. fine-tunes LoRA adapters with finetune_gpt.py at TP=2 + SP on a pattern the base has never
   seen, printing the held-out loss on that pattern before and after;
4. reloads base + adapter at TP=1 in this process and prints a generated sample.

    python scripts/demo.py                     # everything, ~5 minutes on 2 cores
    python scripts/demo.py --fresh             # rebuild the cached base too
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import script_setup  # noqa: F401  (repository on sys.path, known warnings filtered)

ROOT = Path(__file__).resolve().parents[1]
# dist-checkpointing's deprecation notices too, in this process only
warnings.filterwarnings("ignore", category=FutureWarning)

CONFIG = ROOT / "configs" / "cpu_demo.yaml"
PROMPTS = ("add 12 and 5 ->", "add 7 and 9 ->")


def torchrun(script: str, *flags: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(ROOT / "scripts" / script), *flags]
    print("$", " ".join(command[2:]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    subprocess.run(command, check=True, env=env, cwd=ROOT)


def generate_at_tp1(base_dir: Path, adapter_dir: Path, prompts, new_tokens: int):
    """Base + adapter at TP=1 (no SP) in this process; greedy continuation of each prompt."""
    import torch

    from megatron_lora import disable_adapters
    from megatron_lora.checkpoint import load_adapter
    from megatron_lora.config import load_experiment
    from megatron_lora.data import get_tokenizer
    from megatron_lora.gpt import build_gpt_model, initialize_model_parallel
    from megatron_lora.generation import greedy_generate
    from megatron_lora.training import initialize_distributed, load_base_weights

    experiment = load_experiment(CONFIG, overrides={
        "megatron_config.tensor_model_parallel_size": 1,
        "megatron_config.sequence_parallel": False})
    initialize_distributed()
    initialize_model_parallel(experiment)
    model = build_gpt_model(experiment)
    load_base_weights(model, base_dir)
    load_adapter(model, adapter_dir)
    tokenizer = get_tokenizer("byte")

    def continuation(prompt):
        tokens = torch.tensor([tokenizer.tokenize(prompt)])
        generated = greedy_generate(model, tokens, new_tokens, stop_token=tokenizer.eod)
        return tokenizer.detokenize(generated[0, tokens.shape[1]:].tolist())

    outputs = []
    for prompt in prompts:
        with disable_adapters(model):
            base_text = continuation(prompt)
        outputs.append((base_text, continuation(prompt)))
    torch.distributed.destroy_process_group()
    return outputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--fresh", action="store_true", help="also rebuild the cached base")
    parser.add_argument("--pretrain-iters", type=int, default=300)
    parser.add_argument("--finetune-iters", type=int, default=150)
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    started = time.perf_counter()

    data = run / "data"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), str(data)],
                   check=True, cwd=ROOT)

    base = run / "base"
    if args.fresh and base.exists():
        shutil.rmtree(base)
    if not (base / "model" / "metadata.json").is_file():
        print(f"\n== pretraining the base model ({args.pretrain_iters} iterations, TP=2 + SP)")
        shutil.rmtree(base, ignore_errors=True)
        torchrun("pretrain_gpt.py", "--config", str(CONFIG),
                 "--data-path", str(data / "pretrain_text_document"),
                 "--train-iters", str(args.pretrain_iters), "--lr", "3e-3", "--min-lr", "3e-4",
                 "--lr-warmup-iters", "20", "--save", str(base), "--eval-iters", "2",
                 "--no-progress-bar", "--log-interval", "50")
    else:
        print(f"\n== using the cached base model in {base}")

    finetune = run / "finetune"
    shutil.rmtree(finetune, ignore_errors=True)
    print(f"\n== LoRA fine-tuning ({args.finetune_iters} iterations, TP=2 + SP) on a pattern the "
          f"base has not seen")
    torchrun("finetune_gpt.py", "--config", str(CONFIG),
             "--pretrained-checkpoint", str(base),
             "--data-path", str(data / "finetune_text_document"),
             "--valid-data-path", str(data / "finetune_heldout_text_document"),
             "--train-iters", str(args.finetune_iters), "--lora-rank", "8", "--lora-alpha", "16",
             "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "10",
             "--save", str(finetune), "--save-interval", str(args.finetune_iters),
             "--eval-iters", "4")

    print("\n== reloading base + adapter at TP=1 and generating")
    samples = generate_at_tp1(base, finetune / "adapter", PROMPTS, 16)
    for prompt, (base_text, adapted_text) in zip(PROMPTS, samples):
        print(f"  prompt {prompt!r}\n    base alone:     {base_text!r}\n    base + adapter: "
              f"{adapted_text!r}")
    print(f"\nadapter: {finetune / 'adapter'}   metrics: {finetune / 'metrics.jsonl'}   "
          f"curve: {finetune / 'loss_curve.png'}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
