"""The scripts' entry point: check the inputs, start the workers or the process group, train."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist

from ..agreement import raise_if_any_rank_failed
from ..cpu import make_cpu_ready
from ..errors import MegatronLoraError
from .errors import TrainingError
from .loop import Trainer
from .metrics import print_on_rank0
from .rundir import (
    LOCK_TOKEN_ENV,
    RunLock,
    check_inputs_survive,
    check_resume_layout,
    check_save_directory,
    clear_previous_run,
    clears_previous_run,
)
from .settings import global_batch_size, parse_arguments, prepare_instruction_data
from .state import load_checkpoint

# set by the launching process for its workers: where a worker that ends the job writes the
# one line that says why ("CODE<TAB>message"), for the launcher to print after torchrun's
# summary
CAUSE_FILE_ENV = "MEGATRON_LORA_CAUSE_FILE"
EXIT_FAULT = 1
# the file-system faults that end a run with one line naming the cause, not a traceback
_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
           errno.EFBIG}


def initialize_distributed() -> None:
    """torch.distributed from torchrun's environment (a single process without it)."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
    else:
        make_cpu_ready()
        backend = "gloo"
    one_process = "RANK" not in os.environ or (
        os.environ.get("WORLD_SIZE") == "1" and "MASTER_PORT" not in os.environ)
    if one_process:
        # no launcher: an in-process store, so there is no TCP port to pick and lose to
        # another process between picking and binding it
        os.environ.update(RANK="0", WORLD_SIZE="1")
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        return
    dist.init_process_group(backend=backend)


def _under_a_launcher() -> bool:
    return "LOCAL_RANK" in os.environ  # torchrun, or srun through scripts/slurm


def launch_workers(argv: List[str], nproc: int, script_name: str, pass_fds=(),
                   env=None) -> int:
    """--nproc-per-node N: the inputs were checked here, in one process; now torchrun starts
    the N workers of ``script_name`` on this machine with the same arguments (less this
    flag), with ``env`` added and ``pass_fds`` inherited by torchrun. Its exit code."""
    script, expected = Path(sys.argv[0]).resolve(), script_name
    if script.name != expected:
        raise TrainingError(f"--nproc-per-node launches scripts/{expected} itself; from "
                            f"{script.name} start the workers with torchrun")
    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc-per-node":
            skip = True
        elif not item.startswith("--nproc-per-node="):
            rest.append(item)
    # OMP_NUM_THREADS set here keeps torchrun from printing its advice about it
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **(env or {}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), str(script), *rest]
    code = subprocess.run(command, env=env, pass_fds=tuple(pass_fds)).returncode
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


def _check_inputs(argv: List[str], mode: str):
    """(experiment, settings, lora, args), checked in this one process for the world size the
    run will have (--nproc-per-node, or the launcher's)."""
    experiment, settings, lora, args = parse_arguments(argv, mode)
    world_size = world_size_to_run(args.nproc_per_node)
    global_batch_size(settings, experiment.check_world_size(world_size))
    check_inputs_survive(settings, [("--lora-load", getattr(args, "lora_load", None))])
    if settings.load:
        check_resume_layout(settings.load, experiment, world_size)
    if args.nproc_per_node is not None and lora is not None:
        check_adapter_on_a_meta_model(experiment, lora)
    if settings.sft:
        # tokenized here, once, into the cache the workers read: a bad row is one line before
        # any worker starts (under torchrun every rank comes here; one tokenizes, the others
        # wait for its cache)
        prepare_instruction_data(settings, experiment)
    return experiment, settings, lora, args


def check_adapter_on_a_meta_model(experiment, lora) -> None:
    """--nproc-per-node: apply_lora's own checks (targets that match nothing, a rank too large,
    layer types) here, before any worker starts, on the model built on the meta device (no
    weights) at one process: the layer names do not depend on the layout. A model that cannot
    be built that way is left to the workers' identical check."""
    import copy

    from megatron.core import parallel_state

    from ..gpt import build_gpt_model, initialize_model_parallel
    from ..model import apply_lora

    if dist.is_initialized():
        return  # not the launching process's own group to replace
    one = copy.deepcopy(experiment)
    one.megatron_config.update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                               expert_model_parallel_size=1, expert_tensor_parallel_size=1,
                               sequence_parallel=False)
    make_cpu_ready()
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        initialize_model_parallel(one)
        with torch.device("meta"):
            model = build_gpt_model(one, initialize=False)
            apply_lora(model, lora, verbose=False)
    except MegatronLoraError as error:
        raise TrainingError(str(error)) from None
    except Exception:  # noqa: BLE001 - a model megatron cannot build on meta: workers check
        pass
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def world_size_to_run(nproc_per_node: Optional[int]) -> int:
    """The world size the run will have: --nproc-per-node's (checked), or the launcher's."""
    if nproc_per_node is None:
        return int(os.environ.get("WORLD_SIZE", "1"))
    if _under_a_launcher():
        raise TrainingError(f"--nproc-per-node {nproc_per_node} starts the workers "
                            f"itself; under torchrun or srun leave it out")
    if nproc_per_node < 1:
        raise TrainingError(f"--nproc-per-node {nproc_per_node} is invalid: expected "
                            f"a positive number of processes")
    return nproc_per_node


def _hold_save(settings) -> Optional[RunLock]:
    """Collective: rank 0 takes the lock on --save (or finds its launcher's) and checks --save
    again under it (another run may have written there since the checks); every rank raises
    when that failed."""
    if not settings.save:
        return None
    lock, failure = None, None
    if dist.get_rank() == 0:
        try:
            lock = RunLock.acquire(settings.save, os.environ.get(LOCK_TOKEN_ENV))
            check_save_directory(settings)
        except MegatronLoraError as error:
            failure = error
            if lock is not None:
                lock.release()
    raise_if_any_rank_failed(failure, TrainingError)
    return lock


def _run(experiment, settings, lora, args) -> None:
    trainer = Trainer(experiment, settings, lora, args)
    # taken once the model is built: a refusal while building it leaves --save as it was
    with _hold_save(settings) or contextlib.nullcontext():
        if settings.load:  # reads and checks the run it resumes; writes nothing
            load_checkpoint(trainer, settings.load)
        # only then clear --save: a --load that is refused leaves --save as it was
        if clears_previous_run(settings) and dist.get_rank() == 0:
            clear_previous_run(Path(settings.save))
        dist.barrier()
        if settings.load:
            print_on_rank0(f"resumed from {settings.load} at iteration {trainer.iteration}")
        trainer.train()


def describe_fault(error: BaseException) -> Optional[str]:
    """The one line for a file-system fault that ends a run (disk full, a read-only or
    unwritable directory, an I/O error), or None for anything else (a bug: its traceback)."""
    if not isinstance(error, OSError) or error.errno not in _FAULTS:
        return None
    where = f": {error.filename}" if error.filename else ""
    return (f"the run stopped on a file-system error{where}: {error.strerror or error} "
            f"({errno.errorcode.get(error.errno, error.errno)}); the latest complete "
            f"checkpoint stays the one to resume from")


# how gloo and NCCL say that the other end of a collective went away
_LOST_PEER = ("reset by peer", "closed by peer", "Broken pipe", "Connection refused",
              "remote process exited", "NCCL communicator was aborted")


def describe_lost_peer(error: BaseException) -> Optional[str]:
    """The one line for a collective that failed because another rank ended (a fault there,
    or a killed rank), or None for anything else."""
    is_collective = isinstance(error, getattr(dist, "DistError", ())) or (
        isinstance(error, RuntimeError) and ("gloo" in str(error) or "NCCL" in str(error)))
    if not is_collective or not any(sign in str(error) for sign in _LOST_PEER):
        return None
    return ("a collective failed because another rank ended (its own line, or torchrun's "
            "summary, names it); the latest complete checkpoint stays the one to resume from")


def _report(name: str, message: str, code: int) -> None:
    """A worker's one line. Under the launching process (--nproc-per-node) it goes to the
    cause file, printed by the launcher after torchrun's summary; otherwise to stderr."""
    cause_file = os.environ.get(CAUSE_FILE_ENV)
    if cause_file:
        with contextlib.suppress(OSError):
            with open(cause_file, "a") as handle:  # the first rank's line is the one shown
                handle.write(f"{code}\t{message}\n")
        return
    print(f"{name}: error: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _launch(name: str, guard):
    """Around torchrun: ``guard`` (the lock on --save) entered, and a cause file for the
    workers; yields (pass_fds, env), and afterwards the cause line, if any, is printed."""
    with (guard or contextlib.nullcontext()) as held, \
            tempfile.TemporaryDirectory(prefix="megatron_lora_launch_") as scratch:
        cause_file = Path(scratch) / "cause"
        env = {CAUSE_FILE_ENV: str(cause_file)}
        pass_fds = ()
        if isinstance(held, RunLock) and held.fd is not None:
            env[LOCK_TOKEN_ENV], pass_fds = held.token, (held.fd,)
        outcome = {}
        yield pass_fds, env, outcome
        lines = cause_file.read_text(errors="replace").splitlines() if cause_file.exists() \
            else []
        if lines:
            code, _, message = lines[0].partition("\t")
            print(f"{name}: error: {message}", file=sys.stderr, flush=True)
            outcome["code"] = int(code) if code.isdigit() else EXIT_FAULT
        elif outcome.get("code"):
            print(f"{name}: error: a worker failed (torchrun's exit code "
                  f"{outcome['code']}); torchrun's summary above names the rank and how it "
                  f"ended", file=sys.stderr, flush=True)


def run_script(name: str, argv: List[str], check, work, launch_guard=None) -> int:
    """A script's life: ``check(argv)`` the inputs (one process, no side effects; returns the
    checked inputs, with ``.nproc_per_node`` on their ``args``), then either start that many
    workers on this machine (inside ``launch_guard(checked)``, a context manager, when given),
    or join the process group and ``work(checked)``. Exit code 0; 2 with a one-line error
    from rank 0 and nothing written; 1 with one line naming a file-system fault that ended the
    run. Under --nproc-per-node a worker's line is printed by this process, last. Anything
    else is a bug and keeps its traceback."""
    try:
        checked = check(argv)
        nproc = checked.args.nproc_per_node
        if nproc is not None:
            guard = launch_guard(checked) if launch_guard is not None else None
            with _launch(name, guard) as (pass_fds, env, outcome):
                outcome["code"] = launch_workers(argv, nproc, script_name=name,
                                                 pass_fds=pass_fds, env=env)
            return outcome["code"]
    except MegatronLoraError as error:
        if os.environ.get("RANK", "0") == "0":
            _report(name, str(error), 2)
        return 2
    initialize_distributed()
    try:
        work(checked)
    except MegatronLoraError as error:
        if dist.get_rank() == 0:
            _report(name, str(error), 2)
        return 2
    except (OSError, RuntimeError) as error:
        fault = describe_fault(error) or describe_lost_peer(error)
        if fault is None:
            raise
        _report(name, f"rank {dist.get_rank()}: {fault}" if dist.get_world_size() > 1 else fault,
                EXIT_FAULT)
        return EXIT_FAULT
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


class _Checked(NamedTuple):
    experiment: object
    settings: object
    lora: object
    args: object


def main(argv=None, mode: str = "finetune") -> int:
    """The training scripts' entry point (run_script). Under torchrun every rank checks the
    inputs and rank 0 prints the error; with --nproc-per-node N (no launcher) they are checked
    once, before any worker starts."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_script(f"{mode}_gpt.py", argv,
                      lambda given: _Checked(*_check_inputs(given, mode)),
                      lambda checked: _run(*checked), launch_guard=_lock_for_workers)


def _lock_for_workers(checked):
    """--nproc-per-node: the lock on --save, taken here before torchrun starts and held until
    it ends (then --save is checked again under it: another run may have written there)."""
    settings = checked.settings
    if not settings.save:
        return None
    lock = RunLock.acquire(settings.save)
    try:
        check_save_directory(settings)
    except MegatronLoraError:
        lock.release()
        raise
    return lock
