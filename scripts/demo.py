#!/usr/bin/env python
"""The main job: the journey of a user with a Hugging Face model, end to end, on a 2-core CPU.

1. makes the demo corpora (cached in RUN/data): short stories for pretraining, and the task
   "The red fox sees a dog." -> "saw" (a sentence, then its verb in the past tense; see
   megatron_lora/data/demo_corpus.py) as chat rows {"messages": [user, assistant]}, train and held-out;
2. makes the model's tokenizer with the ``tokenizers`` library (RUN/tokenizer: word-level, a
   ChatML chat template whose turns end with the EOS <|im_end|>; megatron_lora/data/demo_chat.py);
3. pretrains a small base on the stories (tokenized with that tokenizer): pretrain_gpt.py,
   full training at TP=2 + SP, cached in RUN/base (rebuilt when the corpus, the tokenizer,
   --pretrain-iters or --seed change), and exports it as a Hugging Face Llama checkpoint with
   its tokenizer (RUN/hf_base) -- from here on it is "a real Hugging Face model";
4. fine-tunes LoRA on the chat rows from RUN/hf_base with finetune_gpt.py --sft at TP=2 + SP
   (loss on the assistant turns only), a task the base has never seen;
5. exports the adapter for peft (export-peft) and merged into the base (export-hf), and scores
   held-out prompts (sentences that are not in the fine-tuning data) with transformers + peft:
   exact-match accuracy of greedy answers for the base alone, base + adapter through peft,
   and the merged checkpoint, with a few examples.

Exits with status 1 when base + adapter (peft) scores under --min-accuracy (so that the demo
cannot regress silently), 0 otherwise.

    python scripts/demo.py                     # everything, ~4 minutes on 2 cores
    python scripts/demo.py --fresh             # rebuild the cached base too
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import script_setup  # noqa: F401  (repository on sys.path, known warnings filtered)
from megatron_lora.atomic import write_file_atomically

ROOT = Path(__file__).resolve().parents[1]
# dist-checkpointing's deprecation notices too, in this process only
warnings.filterwarnings("ignore", category=FutureWarning)

CONFIG = ROOT / "configs" / "cpu_demo.yaml"
SHOWN = 4  # examples printed
BASE_STAMP = "demo_inputs.json"  # in RUN/base: what the cached base was pretrained from


def run_command(*command: str) -> None:
    print("$", " ".join(command), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    subprocess.run(command, check=True, env=env, cwd=ROOT)


def torchrun(script: str, *flags: str) -> None:
    run_command(sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", str(ROOT / "scripts" / script), *flags)


def megatron_lora_cli(*arguments: str) -> None:
    """``megatron-lora ...`` (the console script), run as ``python -m megatron_lora``."""
    run_command(sys.executable, "-m", "megatron_lora", *arguments)


def _digest(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _newer(outputs, inputs) -> bool:
    """Every output exists and is at least as new as every input."""
    outputs, inputs = list(outputs), list(inputs)
    if not all(p.is_file() for p in outputs):
        return False
    return min(p.stat().st_mtime for p in outputs) >= max(p.stat().st_mtime for p in inputs)


def make_data(data: Path, tokenizer: Path, seed: int):
    """Corpora, tokenizer, chat rows and the pretraining stories' indexed dataset, each
    rewritten only when its content changes. Returns (pretrain prefix, train.jsonl,
    heldout.jsonl)."""
    from megatron_lora.data import make_demo_corpora
    from megatron_lora.data.demo_chat import make_demo_tokenizer, write_chat_corpus

    corpora = {name: Path(path) for name, path in make_demo_corpora(data, seed=seed).items()}
    texts = [json.loads(line)["text"] for path in corpora.values()
             for line in path.read_text().splitlines() if line.strip()]
    make_demo_tokenizer(texts, tokenizer)
    train, heldout = data / "train.jsonl", data / "heldout.jsonl"
    rows = write_chat_corpus(corpora["finetune"], train)
    held = write_chat_corpus(corpora["finetune_heldout"], heldout)
    print(f"chat rows: {train} ({rows}), {heldout} ({held}); tokenizer: {tokenizer}")
    # named apart from the byte-tokenized datasets an earlier demo left in the same folder
    prefix = data / "pretrain_chat_tokenizer_text_document"
    outputs = [Path(f"{prefix}.bin"), Path(f"{prefix}.idx")]
    if _newer(outputs, [corpora["pretrain"], tokenizer / "tokenizer.json"]):
        print(f"up to date: {prefix}.{{bin,idx}}")
    else:
        run_command(sys.executable, "-m", "megatron_lora.data", "preprocess",
                    "--input", str(corpora["pretrain"]), "--output-prefix", str(prefix),
                    "--tokenizer-model", str(tokenizer))
    return prefix, train, heldout


def pretrain_base(base: Path, prefix: Path, tokenizer: Path, iters: int, seed_flags) -> None:
    """pretrain_gpt.py on the stories at TP=2 + SP into ``base``, unless the base there was
    pretrained from the same data, tokenizer, iterations and seed (its stamp says so)."""
    stamp = {"data": _digest(Path(f"{prefix}.bin"), Path(f"{prefix}.idx")),
             "tokenizer": _digest(*(tokenizer / n for n in sorted(os.listdir(tokenizer)))),
             "pretrain_iters": iters, "seed_flags": list(seed_flags)}
    try:
        cached = json.loads((base / BASE_STAMP).read_text()) == stamp
    except (OSError, ValueError):
        cached = False
    if cached and (base / "model" / "metadata.json").is_file():
        print(f"using the cached base model in {base}")
        return
    shutil.rmtree(base, ignore_errors=True)
    torchrun("pretrain_gpt.py", "--config", str(CONFIG),
             "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer),
             "--data-path", str(prefix),
             "--train-iters", str(iters), "--lr", "3e-3", "--min-lr", "3e-4",
             "--lr-warmup-iters", str(min(20, iters)), "--save", str(base), "--eval-iters", "2",
             "--micro-batch-size", "16", "--global-batch-size", "16",
             "--no-progress-bar", "--log-interval", "50", *seed_flags)
    write_file_atomically(base / BASE_STAMP, json.dumps(stamp, indent=2, sort_keys=True) + "\n")


def export_base(base: Path, hf_base: Path, tokenizer: Path) -> None:
    """The base as a Hugging Face Llama checkpoint with its tokenizer, unless up to date."""
    if _newer([hf_base / "config.json"], [base / BASE_STAMP, tokenizer / "tokenizer.json"]):
        print(f"up to date: {hf_base}")
        return
    megatron_lora_cli("export-hf", str(base), str(hf_base), "--tokenizer-model", str(tokenizer),
                      "--overwrite")


LORA_LR = "3e-3"


def finetune_sft(hf_base: Path, train_jsonl: Path, heldout_jsonl: Path, save: Path, iters: int,
                 seed_flags) -> None:
    """LoRA fine-tuning of the Hugging Face base on the chat rows at TP=2 + SP; the adapter
    lands in ``save/adapter``. The model's shape comes from hf_base/config.json; the YAML
    --config gives the layout and the loop's defaults (and agrees with that shape)."""
    shutil.rmtree(save, ignore_errors=True)
    torchrun("finetune_gpt.py", "--config", str(CONFIG), "--sft",
             "--pretrained-checkpoint", str(hf_base),
             "--data-path", str(train_jsonl), "--valid-data-path", str(heldout_jsonl),
             "--train-iters", str(iters), "--lora-rank", "16", "--lora-alpha", "32",
             "--lr", LORA_LR, "--min-lr", "2e-4", "--lr-warmup-iters", str(min(10, iters)),
             # several short conversations per 128-token sequence: ~8x the rows per step
             "--sft-sequence-packing",
             "--micro-batch-size", "16", "--global-batch-size", "16", "--log-interval", "25",
             "--save", str(save), "--save-interval", str(iters), "--eval-iters", "4",
             "--no-progress-bar", *seed_flags)


def export_adapter(adapter: Path, hf_base: Path, peft_dir: Path, merged: Path) -> None:
    """The adapter for peft, and merged into the base as a plain Hugging Face checkpoint."""
    megatron_lora_cli("export-peft", str(adapter), str(peft_dir), "--base", str(hf_base),
                      "--overwrite")
    megatron_lora_cli("export-hf", str(adapter), str(merged), "--base", str(hf_base),
                      "--overwrite")


def report(results, examples, shown: int = SHOWN):
    """Print a few examples and the scores; returns {name: accuracy}."""
    for index, (conversation, expected) in enumerate(examples[:shown]):
        print(f"  {conversation[-1]['content']!r}\n    {'expected:':<24}{expected!r}")
        for name, (_, answers) in results.items():
            print(f"    {name + ':':<24}{answers[index]!r}")
    accuracy = {}
    for name, (verdicts, _) in results.items():
        accuracy[name] = sum(verdicts) / len(verdicts)
        print(f"exact match, {name + ':':<24}{accuracy[name]:6.1%} "
              f"({sum(verdicts)} of {len(verdicts)})")
    return accuracy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--seed", type=int, default=0,
                        help="another draw of the corpora and of the initialisation")
    parser.add_argument("--fresh", action="store_true", help="also rebuild the cached base")
    parser.add_argument("--pretrain-iters", type=int, default=150,
                        help="the stories are learnt by ~100 (the loss then stays at ~2.3)")
    parser.add_argument("--finetune-iters", type=int, default=400)
    parser.add_argument("--eval-prompts", type=int, default=200,
                        help="how many held-out prompts to score")
    parser.add_argument("--min-accuracy", type=float, default=0.9,
                        help="exit with status 1 when base + adapter (peft) scores under this")
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    # the config's own seed, unless another draw is asked for
    seed_flags = ["--seed", str(args.seed)] if args.seed else []
    started = time.perf_counter()
    steps = {}

    def step(name: str):
        steps[name] = time.perf_counter()
        print(f"\n== {name}", flush=True)

    step("corpora, tokenizer, chat rows, pretraining data")
    tokenizer = run / "tokenizer"
    prefix, train, heldout = make_data(run / "data", tokenizer, args.seed)

    base, hf_base = run / "base", run / "hf_base"
    if args.fresh:
        shutil.rmtree(base, ignore_errors=True)
    step(f"the base model: pretraining on the stories ({args.pretrain_iters} iterations, "
         f"TP=2 + SP)")
    pretrain_base(base, prefix, tokenizer, args.pretrain_iters, seed_flags)
    step("the base as a Hugging Face checkpoint")
    export_base(base, hf_base, tokenizer)

    finetune = run / "finetune"
    step(f"LoRA fine-tuning of {hf_base} on chat rows ({args.finetune_iters} iterations, TP=2 "
         f"+ SP) on a task the base has never seen: 'The red fox sees a dog.' -> 'saw'")
    finetune_sft(hf_base, train, heldout, finetune, args.finetune_iters, seed_flags)

    peft_dir, merged = run / "peft", run / "merged"
    step("the adapter for peft, and merged into the base")
    export_adapter(finetune / "adapter", hf_base, peft_dir, merged)

    from megatron_lora.data.demo_chat import chat_examples, score

    examples = chat_examples(heldout, args.eval_prompts)
    step(f"transformers + peft: greedy answers to {len(examples)} held-out prompts (sentences "
         f"not in the fine-tuning data)")
    accuracy = report(score(hf_base, peft_dir, merged, examples), examples)
    steps["end"] = time.perf_counter()
    names = list(steps)
    print("\ntimes: " + ", ".join(f"{name.split(':')[0].split(' (')[0]} "
                                  f"{steps[after] - steps[name]:.0f} s"
                                  for name, after in zip(names, names[1:])))
    print(f"adapter: {finetune / 'adapter'}   peft: {peft_dir}   merged: {merged}   "
          f"metrics: {finetune / 'metrics.jsonl'}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    key = "base + adapter (peft)"
    if accuracy[key] < args.min_accuracy:
        print(f"FAILED: {key} scored {accuracy[key]:.1%}, under the {args.min_accuracy:.0%} "
              f"this demo must reach", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
