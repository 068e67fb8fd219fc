#!/usr/bin/env python
"""What LoRA costs on a whole tensor-parallel megatron-core GPT: step time, memory, collectives.

A GPTModel (RMSNorm, SwiGLU, rotary, grouped-query attention, no bias) is run forward and
backward at TP=N (gloo processes on CPU, or one GPU with --device cuda --tp 1): the frozen base
alone (adapters disabled) vs. the same model with LoRA on linear_qkv, linear_proj, linear_fc1
and linear_fc2, interleaved step by step in the same run. The frozen base still back-propagates
activation gradients (down to the embedding output), as a frozen base inside a LoRA run does.
The LoRA step includes finalize_lora_grads.

With --recompute full (or both) the same runs are repeated under megatron's full activation
recompute (uniform, one layer per region). Besides the step's peak memory, each row then
reports the bytes *held between forward and backward*: tensors allocated during forward that
are still alive when backward starts (what activation recompute exists to shrink; counted
like the peak, by PeakTensorMemory, so parameters and inputs are not in it).

    python scripts/benchmark_gpt.py                    # TP=2, SP off and on, CPU
    python scripts/benchmark_gpt.py --rank 16 --iters 30
    python scripts/benchmark_gpt.py --recompute both --sp off --iters 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from benchmark_common import (add_common_arguments, check_device, measure, nbytes,  # noqa: E402
                              print_header, print_row, run_layouts)


RECOMPUTE = {"off": {}, "full": dict(recompute_granularity="full", recompute_method="uniform",
                                      recompute_num_layers=1)}


def experiment(args, sp):
    from megatron_lora.experiment import load_experiment

    return load_experiment(data={
        "megatron_config": {
            "tensor_model_parallel_size": args.tp, "sequence_parallel": sp,
            "num_layers": args.layers, "hidden_size": args.hidden, "ffn_hidden_size": args.ffn,
            "num_attention_heads": args.heads, "num_query_groups": args.query_groups,
            "vocab_size": args.vocab, "seq_length": args.seq, "params_dtype": args.dtype,
            "hidden_dropout": 0.0, "attention_dropout": 0.0, **RECOMPUTE[args.recompute_now],
        },
        "lora": {"r": args.rank, "lora_alpha": 2 * args.rank, "init_lora_weights": False,
                 "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]},
    })


def worker(rank, world, args, sp, device_name):
    from megatron_lora import apply_lora, disable_adapters, finalize_lora_grads
    from megatron_lora.diagnostics import PeakTensorMemory
    from megatron_lora.gpt import build_gpt_model, gpt_forward_inputs, initialize_model_parallel

    device = torch.device(device_name)
    exp = experiment(args, sp)
    initialize_model_parallel(exp)
    model = build_gpt_model(exp).to(device)
    base_bytes = nbytes(list(model.parameters()))
    apply_lora(model, exp.lora, verbose=rank == 0)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    # the frozen base back-propagates to the embedding output in both steps
    model.embedding.register_forward_hook(lambda module, inputs, out: out.requires_grad_())
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=generator).to(device)
    tokens, labels = batch[:, :-1], batch[:, 1:]
    position_ids, mask = gpt_forward_inputs(tokens)

    def step(use_lora, tracker=None):
        for param in lora_params:
            param.grad = None
        # adapters stay disabled through backward: full recompute re-runs forward there
        with torch.enable_grad() if use_lora else disable_adapters(model):
            loss = model(tokens, position_ids, mask, labels=labels).float().mean()
            if tracker is not None:
                tracker.held = tracker.current
            loss.backward()
        if use_lora:
            finalize_lora_grads(model)

    results = measure(step, iters=args.iters, warmup=args.warmup, device=device, world=world,
                      resident_bytes=base_bytes + nbytes([batch]), lora_bytes=nbytes(lora_params))
    for use_lora in (False, True):
        with PeakTensorMemory() as tracker:
            step(use_lora, tracker)
        results["lora_held" if use_lora else "base_held"] = tracker.held
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, iters=20)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--query-groups", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--recompute", choices=("off", "full", "both"), default="off",
                        help="megatron's full activation recompute (uniform, 1 layer per region)")
    args = parser.parse_args(argv)
    check_device(parser, args)

    print(f"GPT layers={args.layers} hidden={args.hidden} ffn={args.ffn} (SwiGLU) heads="
          f"{args.heads}/{args.query_groups} vocab={args.vocab} seq={args.seq} batch={args.batch} "
          f"r={args.rank} on 4 targets, TP={args.tp} {args.dtype} on {args.device}; "
          f"medians of {args.iters} steps")
    rows = []
    for recompute in {"off": ["off"], "full": ["full"], "both": ["off", "full"]}[args.recompute]:
        args.recompute_now = recompute
        suffix = " rc" if recompute == "full" else ""
        rows += [(label + suffix, results) for label, results in run_layouts(worker, args)]
    print_header()
    for label, results in rows:
        print_row(label, results, show_calls=False)
        base_held = max(r["base_held"] for r in results) / 2**20
        lora_held = max(r["lora_held"] for r in results) / 2**20
        print(f"{'':<8}held between forward and backward: base {base_held:.2f} MiB, "
              f"LoRA {lora_held:.2f} MiB (x{lora_held / base_held:.3f})")
    by_label = dict(rows)
    for label in [label for label in by_label if label + " rc" in by_label]:
        plain, recomputed = by_label[label], by_label[label + " rc"]

        def ratio(key):
            return max(r[key] for r in recomputed) / max(r[key] for r in plain)

        print(f"full recompute / none, {label}: peak base x{ratio('base_mem'):.3f}, LoRA "
              f"x{ratio('lora_mem'):.3f}; held base x{ratio('base_held'):.3f}, LoRA "
              f"x{ratio('lora_held'):.3f}")


if __name__ == "__main__":
    main()
