"""What both benchmarks share: timing base vs. LoRA steps in the same run, peak memory,
collectives, and the table they print."""

from __future__ import annotations

import statistics
import time

import torch


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(step, *, iters, warmup, device, world, resident_bytes, lora_bytes):
    """Time ``step(use_lora)`` interleaved (base, LoRA, base, …), then its peak memory and
    collectives. Memory = tensors alive at the peak of a step (after a first step, so grads
    exist as in training) + the resident bytes (+ the LoRA factors for the LoRA step)."""
    from megatron_lora.diagnostics import CollectiveCounter, PeakTensorMemory

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        if world > 1:
            torch.distributed.barrier()

    for _ in range(warmup):
        step(False)
        step(True)
    times = {False: [], True: []}
    for _ in range(iters):
        for use_lora in (False, True):
            sync()
            start = time.perf_counter()
            step(use_lora)
            sync()
            times[use_lora].append(time.perf_counter() - start)

    memory, collectives = {}, {}
    for use_lora in (False, True):
        step(use_lora)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step(use_lora)
            transient = torch.cuda.max_memory_allocated() - before
        else:
            with PeakTensorMemory() as tracker:
                step(use_lora)
            transient = tracker.peak
        memory[use_lora] = transient + resident_bytes + (lora_bytes if use_lora else 0)
        with CollectiveCounter() as counter:
            step(use_lora)
        collectives[use_lora] = counter.calls
    return {
        "base_ms": 1e3 * statistics.median(times[False]),
        "lora_ms": 1e3 * statistics.median(times[True]),
        "base_mem": memory[False],
        "lora_mem": memory[True],
        "base_collectives": collectives[False],
        "lora_collectives": collectives[True],
    }


def print_header():
    print(f"{'layout':<8}{'base ms':>10}{'LoRA ms':>10}{'time x':>9}{'base MiB':>10}"
          f"{'LoRA MiB':>10}{'mem x':>8}{'colls base':>12}{'colls LoRA':>12}")


def print_row(label, results, show_calls=True):
    """One row from every rank's measure() result: a step is as slow as its slowest rank."""
    base_ms = max(r["base_ms"] for r in results)
    lora_ms = max(r["lora_ms"] for r in results)
    base_mem = max(r["base_mem"] for r in results) / 2**20
    lora_mem = max(r["lora_mem"] for r in results) / 2**20
    base_calls, lora_calls = results[0]["base_collectives"], results[0]["lora_collectives"]
    print(f"{label:<8}{base_ms:>10.2f}{lora_ms:>10.2f}{lora_ms / base_ms:>9.3f}"
          f"{base_mem:>10.2f}{lora_mem:>10.2f}{lora_mem / base_mem:>8.3f}"
          f"{len(base_calls):>12}{len(lora_calls):>12}")
    base_elems = sum(n for _, n in base_calls)
    lora_elems = sum(n for _, n in lora_calls)
    detail = (f"base {[c for c, _ in base_calls]}, LoRA {[c for c, _ in lora_calls]}; "
              if show_calls else "")
    print(f"{'':<8}collectives per step: {detail}elements sent x"
          f"{lora_elems / max(1, base_elems):.3f}")


def add_common_arguments(parser, iters):
    """The flags both benchmarks share (layout, sizes, dtype, device, repetitions)."""
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--sp", choices=("off", "on", "both"), default="both")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))


def check_device(parser, args):
    if args.device == "cuda" and args.tp != 1:
        parser.error("--device cuda runs one process: use --tp 1 (TP>1 parity is proven on CPU)")


def run_layouts(worker, args):
    """[(label, per-rank results)] for SP off and/or on: gloo processes on CPU, or this process
    on one GPU."""
    rows = []
    for sp in {"off": [False], "on": [True], "both": [False, True]}[args.sp]:
        if sp and args.tp == 1:
            continue
        if args.device == "cuda":
            from megatron_lora.cpu import free_port, init_gloo_process_group

            if not torch.distributed.is_initialized():
                init_gloo_process_group(0, 1, master_port=free_port())
            results = [worker(0, 1, args, sp, "cuda")]
        else:
            from megatron_lora.cpu import spawn_gloo

            results = spawn_gloo(worker, args.tp, args=(args, sp, "cpu"), timeout=900)
        rows.append(("SP" if sp else "no SP", results))
    return rows
