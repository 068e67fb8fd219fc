"""The scripts' entry point: check the inputs, start the workers or the process group, train."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist

from ..cpu import make_cpu_ready
from ..errors import MegatronLoraError
from .errors import TrainingError
from .loop import Trainer
from .metrics import print_on_rank0
from .rundir import clear_previous_run
from .settings import parse_arguments, prepare_instruction_data
from .state import load_checkpoint


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


def launch_workers(argv: List[str], nproc: int, script_name: str) -> int:
    """--nproc-per-node N: the inputs were checked here, in one process; now torchrun starts
    the N workers of ``script_name`` on this machine with the same arguments (less this
    flag). Its exit code."""
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
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), str(script), *rest]
    code = subprocess.run(command, env=env).returncode
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


def _check_inputs(argv: List[str], mode: str):
    """(experiment, settings, lora, args), checked in this one process for the world size the
    run will have (--nproc-per-node, or the launcher's)."""
    experiment, settings, lora, args = parse_arguments(argv, mode)
    experiment.check_world_size(world_size_to_run(args.nproc_per_node))
    if settings.sft:
        # tokenized here, once, into the cache the workers read: a bad row is one line before
        # any worker starts (under torchrun every rank comes here; one tokenizes, the others
        # wait for its cache)
        prepare_instruction_data(settings, experiment)
    return experiment, settings, lora, args


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


def _run(experiment, settings, lora, args) -> None:
    trainer = Trainer(experiment, settings, lora, args)
    if settings.overwrite and not settings.load and dist.get_rank() == 0:
        clear_previous_run(Path(settings.save))
    dist.barrier()
    if settings.load:
        load_checkpoint(trainer, settings.load)
        print_on_rank0(f"resumed from {settings.load} at iteration {trainer.iteration}")
    trainer.train()


def run_script(name: str, argv: List[str], check, work) -> int:
    """A script's life: ``check(argv)`` the inputs (one process, no side effects; returns the
    checked inputs, with ``.nproc_per_node`` on their ``args``), then either start that many
    workers on this machine, or join the process group and ``work(checked)``. Exit code 0, or
    2 with a one-line error from rank 0 and nothing written. Only a MegatronLoraError is
    reported as one line: anything else is a bug and keeps its traceback."""
    try:
        checked = check(argv)
        nproc = checked.args.nproc_per_node
        if nproc is not None:
            return launch_workers(argv, nproc, script_name=name)
    except MegatronLoraError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"{name}: error: {error}", file=sys.stderr, flush=True)
        return 2
    initialize_distributed()
    try:
        work(checked)
    except MegatronLoraError as error:
        if dist.get_rank() == 0:
            print(f"{name}: error: {error}", file=sys.stderr, flush=True)
        return 2
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
                      lambda checked: _run(*checked))
