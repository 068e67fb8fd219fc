#!/usr/bin/env python
"""Instruction fine-tuning throughput, packed vs padded, on conversations of skewed lengths.

The same conversations (most short, a few long, as chat data is) go through the trainer's own
step (run_micro_batches: megatron-core's schedule, forward and backward, LoRA on every linear)
once padded (one conversation per --seq-length sequence) and once packed
(--sft-sequence-packing). Each round runs both, alternately; the table gives the median time
of an epoch, the conversation tokens per second and the share of each sequence that is
padding, and the ratio packed / padded from the same run.

    python scripts/benchmark_sft_packing.py                 # 1 process
    python scripts/benchmark_sft_packing.py --tp 2          # TP=2 + SP, 2 gloo processes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from types import SimpleNamespace

import script_setup  # noqa: F401  (repository on sys.path, known warnings filtered)
import torch


def conversations(count: int, seq_length: int, seed: int):
    """(ids, answer flags): 80% of 24-96 tokens, 20% of seq_length/2 .. seq_length + 1."""
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(count):
        if torch.rand((), generator=generator) < 0.8:
            length = int(torch.randint(24, 97, (), generator=generator))
        else:
            length = int(torch.randint(seq_length // 2, seq_length + 2, (), generator=generator))
        ids = torch.randint(0, 1000, (length,), generator=generator)
        counted = torch.zeros(length, dtype=torch.bool)
        counted[length // 2:] = True
        result.append((ids, counted))
    return result


def worker(rank, world, args):
    from megatron_lora import LoraConfig, apply_lora
    from megatron_lora.data import micro_batches
    from megatron_lora.data.instructions import InstructionDataset
    from megatron_lora.experiment import load_experiment
    from megatron_lora.gpt import build_gpt_model, initialize_model_parallel
    from megatron_lora.positions import RestartedPositions
    from megatron_lora.training.loop import run_micro_batches

    experiment = load_experiment(data={"megatron_config": dict(
        tensor_model_parallel_size=world, sequence_parallel=world > 1, num_layers=args.layers,
        hidden_size=args.hidden, num_attention_heads=8, num_query_groups=4,
        ffn_hidden_size=args.hidden * 3, vocab_size=1024, seq_length=args.seq_length,
        normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
        position_embedding_type="rope", hidden_dropout=0.0, attention_dropout=0.0, seed=1)})
    initialize_model_parallel(experiment)
    model = build_gpt_model(experiment)
    apply_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]), verbose=False)
    positions = RestartedPositions.install(model)
    data = conversations(args.conversations, args.seq_length, args.seed)
    real_tokens = sum(len(ids) - 1 for ids, _ in data)
    modes = {}
    for name, pack in (("padded", False), ("packed", True)):
        dataset = InstructionDataset(data, seq_length=args.seq_length, seed=0, num_samples=None,
                                     pack=pack, loss_on_all_tokens=False, pad_id=0)
        stream = micro_batches(dataset, micro_batch_size=args.micro_batch_size)
        steps = -(-len(dataset) // args.micro_batch_size)
        modes[name] = (dataset, [next(stream) for _ in range(steps)])
    settings = SimpleNamespace(micro_batch_size=args.micro_batch_size)
    times = {name: [] for name in modes}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for name, (_, batches) in modes.items():
            torch.distributed.barrier()
            started = time.perf_counter()
            for batch in batches:
                for param in model.parameters():
                    param.grad = None
                run_micro_batches(model, [batch], settings, experiment, forward_only=False,
                                  positions=positions)
            torch.distributed.barrier()
            if round_index:
                times[name].append(time.perf_counter() - started)
    return {name: {"sequences": len(dataset), "padding": dataset.padding_share(),
                   "seconds": statistics.median(times[name]),
                   "tokens_per_s": real_tokens / statistics.median(times[name])}
            for name, (dataset, _) in modes.items()}, real_tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (SP when > 1)")
    parser.add_argument("--conversations", type=int, default=96)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from megatron_lora.cpu import spawn_gloo

    results, real_tokens = spawn_gloo(worker, args.tp, args=(args,), timeout=1800)[0]
    print(f"{args.conversations} conversations, {real_tokens} tokens, --seq-length "
          f"{args.seq_length}, micro-batch {args.micro_batch_size}, TP={args.tp}"
          f"{' + SP' if args.tp > 1 else ''}; median of {args.rounds} rounds")
    print(f"{'':8} {'sequences':>9} {'padding':>8} {'epoch s':>8} {'tokens/s':>9}")
    for name, row in results.items():
        print(f"{name:8} {row['sequences']:>9} {row['padding']:>8.1%} {row['seconds']:>8.2f} "
              f"{row['tokens_per_s']:>9.0f}")
    speedup = results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    print(f"packed / padded tokens per second: {speedup:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
