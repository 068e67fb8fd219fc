"""Run megatron-core (0.16 through 0.19) on CPU with gloo.

megatron-core assumes CUDA in a handful of places that have nothing to do with the
mathematics: where it allocates buffers (``torch.cuda.current_device()``), where it keeps
per-rank dropout streams (the CUDA RNG tracker), where it orders work on device streams,
where it synchronises a device queue, where a device-to-host copy turns MoE split sizes into
host arrays, where it all-gathers uneven parts (which NCCL takes and gloo does not) and where
it moves the tied embeddings' last-stage copy with ``.cuda()``. :func:`make_cpu_ready` adjusts
exactly those places for the current process so that tensor-, sequence-, pipeline- and
expert-parallel models run on CPU over gloo, bit for bit the same arithmetic as on one device. It changes no numerics: every patched function
still does what the original promised, only on the CPU.

Each adjustment is a named function below, registered in ``_ADJUSTMENTS`` with the
megatron-core release lines that need it. Those private names move between releases, so the
version check is strict: a release line that the test suite has not been run on is refused
(``SUPPORTED_MEGATRON_CORE_LINES``), rather than failing somewhere deep inside a forward pass.
``docs/cpu.md`` says what each adjustment is for.

Users call it once per process, before building models, to debug a TP/SP LoRA setup on a
laptop; the test suite uses it for every multi-process check.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

# Release lines the whole test suite has been run on (CI runs the two ends, 0.16 and 0.19).
SUPPORTED_MEGATRON_CORE_LINES = ("0.16", "0.17", "0.18", "0.19")

_APPLIED: List[str] = []


class CudaAvailableError(RuntimeError):
    """Raised when the CPU adjustments are asked for on a machine that has a GPU."""


class UnsupportedMegatronVersionError(RuntimeError):
    """Raised for a megatron-core release line the CPU adjustments were not tested on."""


def megatron_core_release_line(version: str) -> str:
    """``"0.19.2"`` -> ``"0.19"``; ``"0.16.0rc1"`` -> ``"0.16"``."""
    parts = version.split(".")
    if len(parts) < 2 or not parts[0].isdigit():
        return version
    minor = "".join(ch for ch in parts[1] if ch.isdigit()) or parts[1]
    return f"{parts[0]}.{minor}"


def check_megatron_core_version(version: Optional[str] = None) -> str:
    """The installed release line, or UnsupportedMegatronVersionError naming what is supported."""
    if version is None:
        import megatron.core

        version = getattr(megatron.core, "__version__", "unknown")
    line = megatron_core_release_line(version)
    if line not in SUPPORTED_MEGATRON_CORE_LINES:
        raise UnsupportedMegatronVersionError(
            f"megatron_lora.cpu supports megatron-core "
            f"{', '.join(l + '.x' for l in SUPPORTED_MEGATRON_CORE_LINES)}; found {version}. "
            f"The private names it adjusts move between releases; install a supported "
            f"release (pip install 'megatron-core>=0.16,<0.20')."
        )
    return line


# --- the adjustments ---------------------------------------------------------------------------


def _allocate_on_cpu() -> None:
    # ~80 places allocate with device=torch.cuda.current_device() (SP buffers, the global
    # memory buffer, rotary embeddings, the MoE router, DDP buffers).
    torch.cuda.current_device = lambda: "cpu"


def _no_device_synchronize() -> None:
    # dist_checkpointing and DDP synchronise a device queue that does not exist on CPU.
    torch.cuda.synchronize = lambda device=None: None


class _HostEvent:
    """A CUDA event stand-in: on the host every operation has finished when it returns."""

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _HostStream:
    """A CUDA stream stand-in: CPU work runs in issue order, so waiting on it is a no-op."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _HostEvent:
        return event if event is not None else _HostEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_HOST_STREAM = _HostStream()


def _host_synchronous_streams() -> None:
    # megatron orders work on CUDA streams: DDP's start_grad_sync waits on the current stream
    # (0.19), the MoE alltoall dispatcher copies split sizes on a side stream (every line).
    # On CPU there is one queue, the host, so streams and events become no-op stand-ins.
    torch.cuda.Stream = _HostStream
    torch.cuda.Event = _HostEvent
    torch.cuda.current_stream = lambda device=None: _DEFAULT_HOST_STREAM
    torch.cuda.default_stream = lambda device=None: _DEFAULT_HOST_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()


def _cpu_rng_tracker() -> None:
    # megatron looks the tracker class up by name when the tracker is (re)created, and
    # activation recompute saves/restores "the CUDA state" through these two helpers.
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.CudaRNGStatesTracker = _make_cpu_rng_tracker_class(
        mcore_random.CudaRNGStatesTracker
    )
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mcore_random.initialize_rng_tracker(force_reset=True)


def _cpu_causal_masks() -> None:
    # When no mask is passed, the softmax builds its causal mask with a hard-coded
    # device="cuda"; build the same boolean masks on the CPU.
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    for module in (transformer_utils, fused_softmax):
        module.get_default_causal_mask = _cpu_causal_mask
        module.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask


# moe_utils' TransformerEngine names in 0.16, bound only when TE imports
_MOE_FUSED_NAMES = ("fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute",
                    "fused_permute_with_probs", "fused_sort_chunks_by_index",
                    "fused_sort_chunks_by_index_with_probs", "fused_topk_with_score_function",
                    "fused_unpermute", "te_general_gemm")


def _bind_moe_fused_names() -> None:
    # Without TransformerEngine, 0.16's moe_utils never binds its fused_* / te_general_gemm
    # names, so the router's "is the fused kernel available?" checks raise NameError instead
    # of taking the torch path (on GPU too). 0.17+ bind them to None themselves.
    from megatron.core.transformer.moe import moe_utils

    for name in _MOE_FUSED_NAMES:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


def _split_sizes_as_host_arrays() -> None:
    # The alltoall dispatcher moves its split sizes device -> host with
    # maybe_move_tensor_to_cpu(..., as_numpy=True): on GPU they arrive as numpy arrays, which
    # all_to_all_single takes as sizes. On CPU the tensors are not is_cuda, so they stay
    # tensors and the call is refused; convert them exactly as the GPU path does.
    from megatron.core.transformer.moe import token_dispatcher

    original = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _uneven_all_gather_by_padding() -> None:
    # With expert-TP > 1 the alltoall dispatcher gathers a different number of tokens from
    # each expert-TP rank (output_split_sizes). gloo's all_gather needs equal sizes, so pad
    # every rank's part to the largest, gather, and keep each part's own rows: the same
    # concatenation, bit for bit. (gloo's reduce_scatter takes uneven parts as it is.)
    from megatron.core.tensor_parallel import mappings

    original = mappings._gather_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        largest = max(output_split_sizes)
        padded = input_.new_zeros((largest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(parts, padded, group=group)
        return torch.cat([part[:size] for part, size in zip(parts, output_split_sizes)])

    mappings._gather_along_first_dim = gather_along_first_dim


def _tied_embedding_setup_on_cpu() -> None:
    # With tied embeddings at PP > 1, the last stage holds a copy of the word embeddings that
    # setup_embeddings_and_output_layer zeroes, moves with a hard-coded .cuda() and all-reduces
    # with the first stage's. Run that method with CUDA arguments mapped to the CPU.
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(original)
    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        with cuda_arguments_to_cpu():
            return original(self, *args, **kwargs)

    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def _mla_without_transformer_engine() -> None:
    # Without TransformerEngine, 0.16's multi_latent_attention still sets HAVE_TE (its import
    # of megatron's TE extension succeeds, with stand-ins for the TE classes), then calls
    # isinstance(linear_proj, TELinear) on a stand-in, which raises. Tell it what is true:
    # no TE. 0.17+ set HAVE_TE from TE itself.
    from megatron.core.transformer import multi_latent_attention

    if not isinstance(multi_latent_attention.TELinear, type):
        multi_latent_attention.HAVE_TE = False


@dataclass(frozen=True)
class _Adjustment:
    name: str
    release_lines: Tuple[str, ...]  # the megatron-core lines that need it
    apply: Callable[[], None]


_ALL_LINES = SUPPORTED_MEGATRON_CORE_LINES
_ADJUSTMENTS: Tuple[_Adjustment, ...] = (
    _Adjustment("allocate_on_cpu", _ALL_LINES, _allocate_on_cpu),
    _Adjustment("no_device_synchronize", _ALL_LINES, _no_device_synchronize),
    _Adjustment("host_synchronous_streams", _ALL_LINES, _host_synchronous_streams),
    _Adjustment("cpu_rng_tracker", _ALL_LINES, _cpu_rng_tracker),
    _Adjustment("cpu_causal_masks", _ALL_LINES, _cpu_causal_masks),
    _Adjustment("bind_moe_fused_names", ("0.16",), _bind_moe_fused_names),
    _Adjustment("split_sizes_as_host_arrays", _ALL_LINES, _split_sizes_as_host_arrays),
    _Adjustment("uneven_all_gather_by_padding", _ALL_LINES, _uneven_all_gather_by_padding),
    _Adjustment("tied_embedding_setup_on_cpu", _ALL_LINES, _tied_embedding_setup_on_cpu),
    _Adjustment("mla_without_transformer_engine", ("0.16",), _mla_without_transformer_engine),
)


def applied_adjustments() -> List[str]:
    """Names of the adjustments make_cpu_ready applied in this process, in order."""
    return list(_APPLIED)


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
    available (the patches would silently move work off the GPU) unless ``allow_with_cuda``,
    and refuses a megatron-core release line it was not tested on.
    """
    if _APPLIED:
        return
    if torch.cuda.is_available() and not allow_with_cuda:
        raise CudaAvailableError(
            "megatron_lora.cpu.make_cpu_ready() was called on a machine where CUDA is "
            "available; it would redirect megatron-core's CUDA allocations to the CPU. "
            "Run on the GPU instead, or pass allow_with_cuda=True to force CPU execution."
        )
    line = check_megatron_core_version()
    for adjustment in _ADJUSTMENTS:
        if line in adjustment.release_lines:
            adjustment.apply()
            _APPLIED.append(adjustment.name)


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


def _end_with_parent() -> None:
    """Linux: have the kernel kill this rank when the process that spawned it dies, even by a
    signal that runs no cleanup (SIGKILL, a timeout's kill), so no rank outlives its test."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # from <linux/prctl.h>
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before the line above took effect
        os._exit(1)


def _own_process_group() -> None:
    """Lead a process group of this rank and everything it starts (megatron's checkpoint writer
    starts a multiprocessing Manager that outlives a killed rank), so the parent can end them
    all with one killpg. The price: a killpg of the parent's own group no longer reaches them;
    the ranks still die with the parent (PR_SET_PDEATHSIG), their helpers only through
    spawn_gloo's own clean-up."""
    if hasattr(os, "setpgid"):
        os.setpgid(0, 0)


_STACK_FILE = None  # kept open: faulthandler writes into it when the parent asks


def _dump_stacks_on_request(path: str) -> None:
    """On SIGUSR1, write every thread's Python stack to ``path``: a rank that hangs tells the
    parent where (spawn_gloo puts it in its TimeoutError)."""
    global _STACK_FILE
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        _STACK_FILE = open(path, "w")
        faulthandler.register(signal.SIGUSR1, file=_STACK_FILE, all_threads=True)


def _spawned_entry(rank, world_size, port, fn, args, results, threads, stack_path):
    import pickle
    import traceback

    _end_with_parent()
    _own_process_group()
    _dump_stacks_on_request(stack_path)
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


def _stacks_of_running(processes, stack_paths, wait_s: float = 3.0) -> str:
    """The Python stacks of the ranks still running (asked for with SIGUSR1), for a timeout's
    message; the last 3000 characters of each."""
    import signal
    import time

    if not hasattr(signal, "SIGUSR1"):
        return ""
    from multiprocessing.connection import wait

    exited = set(wait([process.sentinel for process in processes], timeout=0))
    running = [rank for rank, process in enumerate(processes) if process.sentinel not in exited]
    for rank in running:
        try:
            os.kill(processes[rank].pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not all(
            os.path.getsize(stack_paths[rank]) for rank in running if os.path.exists(stack_paths[rank])):
        time.sleep(0.1)
    parts = []
    for rank in running:
        try:
            with open(stack_paths[rank]) as file:
                stack = file.read()
        except OSError:
            stack = ""
        parts.append(f"\n--- rank {rank}, still running:\n{stack[-3000:] or '(no stack: not started yet)'}")
    return "".join(parts)


def _end_ranks(processes, grace_s: float) -> None:
    """End the ranks and whatever they started, after ``grace_s`` for them to exit on their
    own. The wait is on sentinels, which does not reap: a rank's PID (its process-group id)
    stays taken until its group has been killed, so killpg reaches only our own processes."""
    import signal
    import time
    from multiprocessing.connection import wait

    started = [process for process in processes if process.pid is not None]
    pending, deadline = {process.sentinel: process for process in started}, time.monotonic() + grace_s
    while pending and deadline > time.monotonic():
        for sentinel in wait(list(pending), timeout=deadline - time.monotonic()):
            del pending[sentinel]
    for process in started:
        if hasattr(os, "killpg"):
            try:  # the rank if still running, and the helpers it started (megatron's Manager)
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # empty group, or not led yet
                pass
        process.kill()  # a rank that never got to lead its group
        process.join(timeout=5)


def spawn_gloo(fn, world_size: int, args=(), timeout: float = 300.0, threads: int = 1):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh CPU processes joined by gloo.

    Each process is made CPU-ready and given its own gloo process group on a free loopback
    port. Returns the list of return values by rank. Raises RuntimeError with the failing
    rank's traceback, or TimeoutError after ``timeout`` seconds with the Python stacks of the
    ranks still running; either way only the processes started here (the ranks and whatever
    they started) are ended.
    """
    import multiprocessing as mp
    import pickle
    import queue
    import tempfile
    import time

    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    stack_dir = tempfile.TemporaryDirectory(prefix="spawn_gloo-")
    stack_paths = [os.path.join(stack_dir.name, f"rank{rank}.stack") for rank in range(world_size)]
    processes = [
        context.Process(
            target=_spawned_entry,
            args=(rank, world_size, port, fn, args, results, threads, stack_paths[rank]),
            # not daemonic: ranks may start processes of their own (megatron's
            # dist-checkpointing writer does); the finally below ends them either way
            daemon=False,
        )
        for rank in range(world_size)
    ]
    values, deadline = {}, time.monotonic() + timeout
    try:
        for process in processes:
            process.start()
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{getattr(fn, '__name__', fn)} did not finish on {world_size} ranks within "
                    f"{timeout:.0f} s (finished ranks: {sorted(values)})"
                    + _stacks_of_running(processes, stack_paths)
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
        # ranks that reported get 5 s to exit on their own; after a failure or a timeout the
        # others may wait in a collective forever, so they are ended at once
        _end_ranks(processes, grace_s=5 if len(values) == world_size else 0)
        stack_dir.cleanup()
