#!/usr/bin/env python
"""What LoRA costs on a tensor-parallel MLP: step time, peak memory and collectives.

A megatron-core ColumnParallelLinear -> GELU -> RowParallelLinear block (the MLP shape) is run
forward and backward at TP=N (gloo processes on CPU, or the GPU when --device cuda at TP=1),
frozen base alone vs. the same frozen base + LoRA, measured in the same run and interleaved
step by step. The frozen base still back-propagates activation gradients (its input requires
grad), as inside a real model. The LoRA step includes finalize_lora_grads.

    python scripts/benchmark_layer.py                 # TP=2, SP off and on, CPU
    python scripts/benchmark_layer.py --rank 16 --iters 40
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from benchmark_common import (add_common_arguments, check_device, measure, nbytes,  # noqa: E402
                              print_header, print_row, run_layouts)


def build_block(args, world, sp, device):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_lora import LoraConfig, dispatch_megatron

    dtype = getattr(torch, args.dtype)
    config = ModelParallelConfig(tensor_model_parallel_size=world, sequence_parallel=sp,
                                 use_cpu_initialization=True, params_dtype=dtype)
    init = lambda weight: torch.nn.init.normal_(weight, std=0.02)  # noqa: E731
    fc1 = ColumnParallelLinear(args.hidden, args.ffn, config=config, init_method=init, bias=False,
                               gather_output=False).to(device)
    fc2 = RowParallelLinear(args.ffn, args.hidden, config=config, init_method=init, bias=False,
                            input_is_parallel=True, skip_bias_add=False).to(device)
    for param in list(fc1.parameters()) + list(fc2.parameters()):
        param.requires_grad_(False)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, init_lora_weights=False,
                      lora_dtype="float32")
    lora_fc1 = dispatch_megatron(fc1, "default", lora, module_name="mlp.linear_fc1")
    lora_fc2 = dispatch_megatron(fc2, "default", lora, module_name="mlp.linear_fc2")
    base = lambda x: fc2(F.gelu(fc1(x)[0]))[0]  # noqa: E731
    with_lora = lambda x: lora_fc2(F.gelu(lora_fc1(x)[0]))[0]  # noqa: E731
    return base, with_lora, [lora_fc1, lora_fc2]


def worker(rank, world, args, sp, device_name):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_lora import finalize_lora_grads

    device = torch.device(device_name)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)
    base, with_lora, lora_layers = build_block(args, world, sp, device)
    lora_params = [p for layer in lora_layers for n, p in layer.named_parameters() if "lora_" in n]
    seq = args.seq // world if sp else args.seq
    dtype = getattr(torch, args.dtype)
    x = torch.randn(seq, args.batch, args.hidden, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(seq, args.batch, args.hidden, device=device, dtype=dtype)

    def step(use_lora):
        x.grad = None
        for param in lora_params:
            param.grad = None
        y = (with_lora if use_lora else base)(x)
        y.backward(dy)
        if use_lora:
            finalize_lora_grads(lora_layers)

    base_params = [p for layer in lora_layers for p in layer.base_layer.parameters()]
    return measure(step, iters=args.iters, warmup=args.warmup, device=device, world=world,
                   resident_bytes=nbytes([x, dy] + base_params), lora_bytes=nbytes(lora_params))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, iters=30)
    args = parser.parse_args(argv)
    check_device(parser, args)

    print(f"MLP hidden={args.hidden} ffn={args.ffn} seq={args.seq} batch={args.batch} "
          f"r={args.rank} TP={args.tp} {args.dtype} on {args.device}; medians of {args.iters} steps")
    print_header()
    for label, results in run_layouts(worker, args):
        print_row(label, results)


if __name__ == "__main__":
    main()
