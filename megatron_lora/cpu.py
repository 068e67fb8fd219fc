"""Run megatron-core 0.16 on CPU with gloo.

megatron-core assumes CUDA in a handful of places that have nothing to do with the
mathematics: where it allocates buffers (``torch.cuda.current_device()``), where it keeps
per-rank dropout streams (the CUDA RNG tracker), and where it synchronises a device queue.
:func:`make_cpu_ready` adjusts exactly those places for the current process so that
tensor-parallel and sequence-parallel layers run on CPU over gloo, bit for bit the same
arithmetic as on one device. It changes no numerics: every patched function still does what
the original promised, only on the CPU.

Users call it once per process, before building models, to debug a TP/SP LoRA setup on a
laptop; the test suite uses it for every multi-process check.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

# The private names patched below were read from megatron-core 0.16.x; a different version
# may move them, so say so instead of failing somewhere deep inside a forward pass.
SUPPORTED_MEGATRON_CORE = ("0.16.",)

_READY = False


class CudaAvailableError(RuntimeError):
    """Raised when the CPU adjustments are asked for on a machine that has a GPU."""


def _make_cpu_rng_tracker_class(base_cls):
    """A drop-in for megatron's ``CudaRNGStatesTracker`` that keeps CPU generator states.

    megatron forks named RNG streams (one per TP rank for dropout inside the TP region) by
    swapping the CUDA generator state. On CPU the generator dropout draws from is the CPU
    default generator, so the same swap is done on it. Seeding, forking and state capture for
    activation recompute keep megatron's semantics: every TP rank gets its own stream.
    """

    class CpuRNGStatesTracker(base_cls):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed)
            self.states_[name] = generator.get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    CpuRNGStatesTracker.__name__ = "CpuRNGStatesTracker"
    CpuRNGStatesTracker.__qualname__ = "CpuRNGStatesTracker"
    return CpuRNGStatesTracker


def make_cpu_ready(allow_with_cuda: bool = False) -> None:
    """Make this process able to run megatron-core's parallel layers on CPU with gloo.

    Idempotent. Call it before building any megatron-core module. Refuses to run when CUDA is
    available (the patches would silently move work off the GPU) unless ``allow_with_cuda``.
    """
    global _READY
    if _READY:
        return
    if torch.cuda.is_available() and not allow_with_cuda:
        raise CudaAvailableError(
            "megatron_lora.cpu.make_cpu_ready() was called on a machine where CUDA is "
            "available; it would redirect megatron-core's CUDA allocations to the CPU. "
            "Run on the GPU instead, or pass allow_with_cuda=True to force CPU execution."
        )

    import megatron.core
    from megatron.core.tensor_parallel import random as mcore_random

    version = getattr(megatron.core, "__version__", "unknown")
    if not version.startswith(SUPPORTED_MEGATRON_CORE):
        raise RuntimeError(
            f"megatron_lora.cpu supports megatron-core {SUPPORTED_MEGATRON_CORE[0]}x, found "
            f"{version}; the private names it adjusts may have moved."
        )

    # 1. Buffers: megatron allocates with device=torch.cuda.current_device().
    torch.cuda.current_device = lambda: "cpu"
    # 1b. dist_checkpointing synchronises a device queue that does not exist on CPU.
    torch.cuda.synchronize = lambda device=None: None

    # 2. RNG: megatron looks the tracker class up by name when the tracker is (re)created, and
    # activation recompute saves/restores "the CUDA state" through these two helpers.
    mcore_random.CudaRNGStatesTracker = _make_cpu_rng_tracker_class(
        mcore_random.CudaRNGStatesTracker
    )
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mcore_random.initialize_rng_tracker(force_reset=True)

    # 3. Attention masks: when no mask is passed, the softmax builds its causal mask with a
    # hard-coded device="cuda"; build the same boolean masks on the CPU.
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    for module in (transformer_utils, fused_softmax):
        module.get_default_causal_mask = _cpu_causal_mask
        module.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask

    # 4. MoE: without TransformerEngine, moe_utils never binds its fused_* / te_general_gemm
    # names, so the router's "is the fused kernel available?" checks raise NameError instead
    # of taking the torch path; bind them to None as the checks expect.
    from megatron.core.transformer.moe import moe_utils

    for name in ("fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute",
                 "fused_permute_with_probs", "fused_sort_chunks_by_index",
                 "fused_sort_chunks_by_index_with_probs", "fused_topk_with_score_function",
                 "fused_unpermute", "te_general_gemm"):
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)

    _READY = True


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_sliding_window_causal_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    visible = torch.ones(sq, skv, dtype=torch.bool)
    visible = torch.tril(torch.triu(visible, diagonal=skv - sq - window_size[0]),
                         diagonal=skv - sq + window_size[1])
    return ~visible


def _is_cuda(device) -> bool:
    return isinstance(device, (str, torch.device)) and str(device).startswith("cuda")


class _CudaArgumentsToCpu(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_arguments_to_cpu():
    """Scoped: map hard-coded ``device='cuda'`` / ``.cuda()`` in megatron-core code to CPU.

    megatron's optimizer, grad-norm and schedule code name CUDA explicitly. Use this around
    those calls only; process-wide it would slow every torch call.
    """
    if torch.cuda.is_available():
        yield
        return
    with _CudaArgumentsToCpu():
        yield


def init_gloo_process_group(
    rank: int, world_size: int, master_addr: str = "127.0.0.1", master_port: Optional[int] = None
) -> None:
    """Initialise torch.distributed over gloo for one CPU process (env:// when no port)."""
    if master_port is not None:
        os.environ["MASTER_ADDR"] = master_addr
        os.environ["MASTER_PORT"] = str(master_port)
    torch.distributed.init_process_group(backend="gloo", rank=rank, world_size=world_size)


# --- spawning a CPU process group ------------------------------------------------------------


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawned_entry(rank, world_size, port, fn, args, results, threads):
    import pickle
    import traceback

    try:
        torch.set_num_threads(threads)
        make_cpu_ready()
        init_gloo_process_group(rank, world_size, master_port=port)
        value = fn(rank, world_size, *args)
        # by value: multiprocessing would otherwise hand tensors over as shared-memory file
        # descriptors, which vanish if this process exits before the parent reads them
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # report everything, including assertion errors, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def spawn_gloo(fn, world_size: int, args=(), timeout: float = 300.0, threads: int = 1):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh CPU processes joined by gloo.

    Each process is made CPU-ready and given its own gloo process group on a free loopback
    port. Returns the list of return values by rank. Raises RuntimeError with the failing
    rank's traceback, or TimeoutError after ``timeout`` seconds; either way only the processes
    started here are ended.
    """
    import multiprocessing as mp
    import pickle
    import queue
    import time

    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_spawned_entry,
            args=(rank, world_size, port, fn, args, results, threads),
            # not daemonic: ranks may start processes of their own (megatron's
            # dist-checkpointing writer does); the finally below ends them either way
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    values, deadline = {}, time.monotonic() + timeout
    try:
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{getattr(fn, '__name__', fn)} did not finish on {world_size} ranks within "
                    f"{timeout:.0f} s (finished ranks: {sorted(values)})"
                )
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"a spawned rank exited with code {dead[0].exitcode} before reporting"
                    )
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            values[rank] = pickle.loads(value)  # our own child's results
        return [values[rank] for rank in range(world_size)]
    finally:
        for process in processes:
            process.join(timeout=5)
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
