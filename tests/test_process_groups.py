"""megatron_lora.gpt.initialize_model_parallel re-initialised layout after layout in one set of
processes (as the test spawns, generation and export do) destroys the process groups it made for
the previous layout: each gloo group holds worker threads, and before this the spawned ranks of
the test suite grew past 1,400 threads each and slowed every test on the machine."""

from __future__ import annotations

import os

from megatron_lora.cpu import spawn_gloo


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _reinitialise_layouts(rank, world):
    import torch
    import torch.distributed as dist

    import gpt_checks
    from megatron_lora.gpt import initialize_model_parallel

    callers_group = dist.new_group(list(range(world)))  # made by the caller: must survive
    layouts = [gpt_checks.experiment(tp, pp, sp) for tp, pp, sp in
               [(2, 1, True), (1, 2, False), (2, 1, False)]]
    threads = []
    for _ in range(2):
        for exp in layouts:
            initialize_model_parallel(exp)
            threads.append(_threads())
    total = torch.ones(1)
    dist.all_reduce(total, group=callers_group)
    return threads, float(total)


def test_reinitialised_layouts_do_not_pile_up_threads_and_keep_callers_groups():
    results = spawn_gloo(_reinitialise_layouts, 2, timeout=300)
    for threads, total in results:
        # the first round may still start lazily made threads; every later initialisation
        # holds the same number (without the clean-up each one adds dozens)
        first_round = max(threads[:3])
        assert max(threads[3:]) <= first_round, threads
        assert total == 2.0
