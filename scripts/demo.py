#!/usr/bin/env python
"""The main job: a real LoRA fine-tuning run, end to end, on a 2-core CPU.

1. makes the demo corpora and their megatron indexed datasets (cached in runs/demo/data):
   short stories for pretraining, and "The red fox sees a dog. -> saw" lines (a sentence, then
   its verb in the past tense) for fine-tuning (megatron_lora/data/demo_corpus.py says why
   that task);
2. obtains a small pretrained base: pretrain_gpt.py on the stories, full training at TP=2 + SP,
   cached in runs/demo/base (later runs reuse it);
3. fine-tunes LoRA adapters with finetune_gpt.py at TP=2 + SP on the task, which the base has
   never seen, printing the held-out loss before and after;
4. reloads base + adapter at TP=1 in this process and scores held-out prompts (sentences that
   are not in the fine-tuning data): the exact-match accuracy of greedy answers for the base
   alone and for base + adapter, and a few examples.

Exits with status 1 when base + adapter scores under --min-accuracy (so that the demo cannot
regress silently), 0 otherwise.

    python scripts/demo.py                     # everything, ~3.5 minutes on 2 cores
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


def torchrun(script: str, *flags: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(ROOT / "scripts" / script), *flags]
    print("$", " ".join(command[2:]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    subprocess.run(command, check=True, env=env, cwd=ROOT)


def heldout_examples(data: Path, count: int):
    """(prompt, expected answer) of the first ``count`` held-out task lines."""
    import json

    from megatron_lora.data import split_task_line

    lines = [line for record in (data / "finetune_heldout.jsonl").read_text().splitlines()
             for line in json.loads(record)["text"].split("\n")]
    return [split_task_line(line) for line in lines[:count]]


def evaluate_at_tp1(base_dir: Path, adapter_dir: Path, examples, shown: int):
    """Base alone and base + adapter at TP=1 (no SP) in this process, on the held-out
    (prompt, answer) examples: {name: (exact-match verdicts, greedy answers to the first
    ``shown`` prompts)}."""
    import torch

    from megatron_lora import disable_adapters
    from megatron_lora.checkpoint import load_adapter
    from megatron_lora.experiment import load_experiment
    from megatron_lora.generation import answer_line_ends, exact_matches, greedy_complete
    from megatron_lora.gpt import build_gpt_model, initialize_model_parallel
    from megatron_lora.tokenizers import get_tokenizer
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
    prompts = [tokenizer.tokenize(prompt) for prompt, _ in examples[:shown]]
    # room for the longest answer and more: a wrong answer may be longer
    new_tokens = max(len(tokenizer.tokenize(answer)) for _, answer in examples) + 10

    def evaluate():
        answers = greedy_complete(model, prompts, new_tokens,
                                  stop_tokens=answer_line_ends(tokenizer))
        return (exact_matches(model, tokenizer, examples),
                [tokenizer.detokenize(answer) for answer in answers])

    with disable_adapters(model):
        base = evaluate()
    adapted = evaluate()
    torch.distributed.destroy_process_group()
    return {"base alone": base, "base + adapter": adapted}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--seed", type=int, default=0,
                        help="another draw of the corpora and of the initialisation")
    parser.add_argument("--fresh", action="store_true", help="also rebuild the cached base")
    parser.add_argument("--pretrain-iters", type=int, default=400)
    parser.add_argument("--finetune-iters", type=int, default=400)
    parser.add_argument("--eval-prompts", type=int, default=200,
                        help="how many held-out prompts to score")
    parser.add_argument("--min-accuracy", type=float, default=0.9,
                        help="exit with status 1 when base + adapter scores under this")
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    # the config's own seed, unless another draw is asked for
    seed_flags = ["--seed", str(args.seed)] if args.seed else []
    started = time.perf_counter()

    data = run / "data"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), str(data),
                    "--seed", str(args.seed)], check=True, cwd=ROOT)

    base = run / "base"
    if args.fresh and base.exists():
        shutil.rmtree(base)
    # make_demo_data rewrites the corpus only when its text changes: a base older than its
    # corpus was pretrained on other text (an earlier version of the demo) and is rebuilt
    base_done = base / "model" / "metadata.json"
    if not (base_done.is_file() and
            base_done.stat().st_mtime >= (data / "pretrain.jsonl").stat().st_mtime):
        print(f"\n== pretraining the base model ({args.pretrain_iters} iterations, TP=2 + SP)")
        shutil.rmtree(base, ignore_errors=True)
        torchrun("pretrain_gpt.py", "--config", str(CONFIG),
                 "--data-path", str(data / "pretrain_text_document"),
                 "--train-iters", str(args.pretrain_iters), "--lr", "3e-3", "--min-lr", "3e-4",
                 "--lr-warmup-iters", "20", "--save", str(base), "--eval-iters", "2",
                 "--micro-batch-size", "16", "--global-batch-size", "16",
                 "--no-progress-bar", "--log-interval", "50", *seed_flags)
    else:
        print(f"\n== using the cached base model in {base}")

    finetune = run / "finetune"
    shutil.rmtree(finetune, ignore_errors=True)
    print(f"\n== LoRA fine-tuning ({args.finetune_iters} iterations, TP=2 + SP) on a task the "
          f"base has never seen: 'The red fox sees a dog. -> saw'")
    torchrun("finetune_gpt.py", "--config", str(CONFIG),
             "--pretrained-checkpoint", str(base),
             "--data-path", str(data / "finetune_text_document"),
             "--valid-data-path", str(data / "finetune_heldout_text_document"),
             "--train-iters", str(args.finetune_iters), "--lora-rank", "16", "--lora-alpha", "32",
             "--lr", "1e-2", "--min-lr", "1e-3", "--lr-warmup-iters", "10",
             "--micro-batch-size", "16", "--global-batch-size", "16", "--log-interval", "25",
             "--save", str(finetune), "--save-interval", str(args.finetune_iters),
             "--eval-iters", "4", *seed_flags)

    examples = heldout_examples(data, args.eval_prompts)
    print(f"\n== reloading base + adapter at TP=1: greedy answers to {len(examples)} held-out "
          f"prompts (sentences not in the fine-tuning data)")
    results = evaluate_at_tp1(base, finetune / "adapter", examples, shown=4)
    for index, (prompt, expected) in enumerate(examples[:4]):
        print(f"  {prompt!r}\n    expected:       {expected!r}")
        for name, (_, answers) in results.items():
            print(f"    {name + ':':<16}{answers[index]!r}")
    accuracy = {}
    for name, (verdicts, _) in results.items():
        accuracy[name] = sum(verdicts) / len(verdicts)
        print(f"exact match, {name}: {accuracy[name]:.1%} ({sum(verdicts)} of {len(verdicts)})")
    print(f"\nadapter: {finetune / 'adapter'}   metrics: {finetune / 'metrics.jsonl'}   "
          f"curve: {finetune / 'loss_curve.png'}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    if accuracy["base + adapter"] < args.min_accuracy:
        print(f"FAILED: base + adapter scored {accuracy['base + adapter']:.1%}, under the "
              f"{args.min_accuracy:.0%} this demo must reach", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
