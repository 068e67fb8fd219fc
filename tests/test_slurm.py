"""The SLURM batch scripts (scripts/slurm/) run as real jobs on a real one-node SLURM cluster
started for this module (tests/slurm_cluster.py), so what is tested is what users submit.

- finetune.sbatch trains with the real scripts/finetune_gpt.py (tiny settings) and saves the
  adapter; submitting it again on the same RUN_DIR resumes from the saved iteration.
- USR1 (what --signal=B:USR1@120 sends before the time limit) requeues the job, and the
  requeued job resumes from the last checkpoint.
- finetune_srun_ranks.sbatch maps SLURM's task variables to RANK / LOCAL_RANK / WORLD_SIZE.
- finetune_multinode.sbatch runs (on the one node there is), a failing training script fails
  the job with its exit code, and a bad CONFIG is reported before anything starts.

The machinery tests use a stand-in training script with the same command-line contract (a
gloo all-reduce per step, checkpoints and an adapter folder), which is fast and deterministic.
Skips with the reason when SLURM/munge are not installed or this is not root, except where
MEGATRON_LORA_REQUIRE_SLURM=1 (CI, which installs them): there a missing cluster fails.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import slurm_cluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAKE_DATA = ROOT / "scripts" / "make_demo_data.py"
JOB_TIMEOUT_S = 300

_ok, _reason = slurm_cluster.available()
if not _ok and os.environ.get("MEGATRON_LORA_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"MEGATRON_LORA_REQUIRE_SLURM=1 but no SLURM cluster is possible here: "
                       f"{_reason}")
pytestmark = pytest.mark.skipif(not _ok, reason=f"no SLURM cluster possible here: {_reason}")

# A stand-in for scripts/finetune_gpt.py with its contract: --config/--save/--load DIR (an
# error unless DIR holds latest_checkpointed_iteration.txt), checkpoints, the adapter at the end.
PAYLOAD = r'''
import argparse, os, sys, time
from pathlib import Path
import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--save", required=True)
parser.add_argument("--load")
parser.add_argument("--train-iters", type=int, default=4)
parser.add_argument("--save-interval", type=int, default=1)
parser.add_argument("--iter-seconds", type=float, default=0.0)
parser.add_argument("--fail-with", type=int, default=0)
args = parser.parse_args()
assert Path(args.config).is_file(), args.config

names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
print("payload env " + " ".join(f"{n}={os.environ.get(n)}" for n in names), flush=True)
if args.fail_with:
    sys.exit(args.fail_with)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
save, start = Path(args.save), 0
if args.load:
    tracker = Path(args.load) / "latest_checkpointed_iteration.txt"
    if not tracker.is_file():
        sys.exit(f"ERROR: --load {args.load} holds no checkpoint")
    start = int(tracker.read_text())
    if rank == 0:
        print(f"payload resumed at iteration {start}", flush=True)
for iteration in range(start + 1, args.train_iters + 1):
    total = torch.ones(1)
    dist.all_reduce(total)
    assert total.item() == world
    time.sleep(args.iter_seconds)
    if rank == 0:
        print(f"payload iteration {iteration}/{args.train_iters} world {world}", flush=True)
        if iteration % args.save_interval == 0 or iteration == args.train_iters:
            (save / f"iter_{iteration:07d}").mkdir(parents=True, exist_ok=True)
            (save / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    dist.barrier()
if rank == 0:
    (save / "adapter").mkdir(parents=True, exist_ok=True)
    (save / "adapter" / "adapter_config.json").write_text("{}")
    (save / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    print("payload done", flush=True)
dist.destroy_process_group()
'''


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster.SlurmCluster() as running:
        yield running


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    path = tmp_path_factory.mktemp("payload") / "payload.py"
    path.write_text(PAYLOAD)
    return path


def sbatch(cluster, script, tmp_path, env, *options, on_poll=None):
    """Submits scripts/slurm/<script> from the repository root and waits (bounded)."""
    job_env = {"PYTHON": sys.executable, "CONFIG": "configs/cpu_demo.yaml", **env}
    job = cluster.run_job(
        ["--chdir", str(ROOT), f"--output={tmp_path}/%x-%j.out", "--time=10", *options,
         str(ROOT / "scripts" / "slurm" / script)],
        env=job_env, cwd=ROOT, timeout=JOB_TIMEOUT_S, on_poll=on_poll)
    print(f"job {job.job_id}: {job.state} exit {job.exit_code} in {job.seconds:.1f} s, "
          f"{job.restarts} restarts\n{job.log}")
    return job


def assert_adapter(save: Path):
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (save / "adapter" / name).is_file(), f"no {save / 'adapter' / name}"


# --- the real training script ---------------------------------------------------------------

def real_args(data: Path, iters: int) -> str:
    return (f"--data-path {data}/finetune_text_document "
            f"--valid-data-path {data}/finetune_heldout_text_document "
            f"--train-iters {iters} --lr-warmup-iters 1 --save-interval 2 --eval-interval 2 "
            f"--eval-iters 1 --micro-batch-size 2 --global-batch-size 2 --seq-length 64 "
            f"--log-interval 1 --no-progress-bar")


@pytest.fixture(scope="module")
def first_run(cluster, tmp_path_factory):
    """(run dir, job): 4 iterations of the CPU demo through finetune.sbatch."""
    data = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, str(MAKE_DATA), str(data)],
                   check=True, capture_output=True, timeout=120, cwd=ROOT)
    run_dir = tmp_path_factory.mktemp("run")
    logs = tmp_path_factory.mktemp("logs")
    job = sbatch(cluster, "finetune.sbatch", logs,
                 {"RUN_DIR": str(run_dir), "NPROC_PER_NODE": "2",
                  "EXTRA_ARGS": real_args(data, 4)})
    return run_dir, data, job


def test_finetune_job_trains_and_saves_the_adapter(first_run):
    run_dir, _, job = first_run
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job.log
    assert f"megatron_lora job {job.job_id}" in job.log
    assert "mode       fresh start" in job.log
    assert "iteration 4/4" in job.log
    assert "saved adapter to" in job.log
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() \
        == "4"
    assert_adapter(run_dir / "checkpoints")


def test_resubmitted_job_resumes_from_the_saved_iteration(cluster, first_run, tmp_path):
    run_dir, data, first = first_run
    assert first.exit_code == 0, "the first run failed"
    job = sbatch(cluster, "finetune.sbatch", tmp_path,
                 {"RUN_DIR": str(run_dir), "NPROC_PER_NODE": "2",
                  "EXTRA_ARGS": real_args(data, 6)})
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job.log
    assert f"mode       resume from iteration 4 (--load {run_dir}/checkpoints)" in job.log
    assert "at iteration 4" in job.log  # the training script's own word
    assert "iteration 5/6" in job.log and "iteration 6/6" in job.log
    assert "iteration 1/6" not in job.log
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() \
        == "6"
    assert_adapter(run_dir / "checkpoints")


# --- the machinery, with the stand-in script --------------------------------------------------


def test_usr1_requeues_the_job_and_it_resumes(cluster, payload, tmp_path):
    run_dir = tmp_path / "run"
    tracker = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    actions = []

    def on_poll(info):
        job_id, state = info["JobId"], info.get("JobState")
        if not actions and state == "RUNNING" and tracker.is_file():
            # what --signal=B:USR1@120 does 120 s before the time limit
            cluster.client("scancel", "--batch", "--signal=USR1", job_id)
            actions.append("signalled")
        elif actions == ["signalled"] and state == "PENDING" and info.get("Restarts") == "1":
            # SLURM holds a requeued job back ~2 minutes; start it now
            cluster.client("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            actions.append("released")

    job = sbatch(cluster, "finetune.sbatch", tmp_path,
                 {"RUN_DIR": str(run_dir), "NPROC_PER_NODE": "2", "SCRIPT": str(payload),
                  "EXTRA_ARGS": "--train-iters 6 --save-interval 1 --iter-seconds 1"},
                 on_poll=on_poll)
    assert actions == ["signalled", "released"], job.log
    assert (job.state, job.exit_code, job.restarts) == ("COMPLETED", 0, 1), job.log
    # one log (--open-mode=append) holds both runs: fresh, requeued, resumed
    assert job.log.count(f"megatron_lora job {job.job_id}") == 2
    assert "mode       fresh start" in job.log
    assert f"USR1: time limit near, requeueing job {job.job_id}" in job.log
    resumed = re.search(r"mode       resume from iteration (\d+)", job.log)
    assert resumed, job.log
    assert f"payload resumed at iteration {resumed.group(1)}" in job.log
    assert "payload iteration 6/6 world 2" in job.log
    assert_adapter(run_dir / "checkpoints")


def test_srun_ranks_variant_maps_slurm_tasks_to_torch_ranks(cluster, payload, tmp_path):
    job = sbatch(cluster, "finetune_srun_ranks.sbatch", tmp_path,
                 {"RUN_DIR": str(tmp_path / "run"), "SCRIPT": str(payload),
                  "EXTRA_ARGS": "--train-iters 2"},
                 "--ntasks-per-node=2")
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job.log
    assert "srun, one task per rank" in job.log
    host = slurm_cluster.short_hostname()
    for rank in (0, 1):
        assert (f"payload env RANK={rank} LOCAL_RANK={rank} WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 "
                f"MASTER_ADDR={host}") in job.log
    assert "payload iteration 2/2 world 2" in job.log
    assert_adapter(tmp_path / "run" / "checkpoints")


def test_multinode_script_runs_on_one_node(cluster, payload, tmp_path):
    job = sbatch(cluster, "finetune_multinode.sbatch", tmp_path,
                 {"RUN_DIR": str(tmp_path / "run"), "NPROC_PER_NODE": "2",
                  "SCRIPT": str(payload), "EXTRA_ARGS": "--train-iters 2"},
                 "--nodes=1")
    assert (job.state, job.exit_code) == ("COMPLETED", 0), job.log
    assert "srun, one torchrun per node" in job.log
    assert "payload iteration 2/2 world 2" in job.log
    assert_adapter(tmp_path / "run" / "checkpoints")


def test_failing_training_fails_the_job(cluster, payload, tmp_path):
    job = sbatch(cluster, "finetune.sbatch", tmp_path,
                 {"RUN_DIR": str(tmp_path / "run"), "NPROC_PER_NODE": "2",
                  "SCRIPT": str(payload), "EXTRA_ARGS": "--fail-with 3"})
    assert job.state == "FAILED" and job.exit_code != 0, job.log
    assert "step finished with exit code" in job.log


def test_bad_config_is_reported_before_launch(cluster, tmp_path):
    job = sbatch(cluster, "finetune.sbatch", tmp_path,
                 {"RUN_DIR": str(tmp_path / "run"), "CONFIG": "configs/nope.yaml"})
    assert (job.state, job.exit_code) == ("FAILED", 2), job.log
    assert "error: CONFIG=configs/nope.yaml not found" in job.log
    assert "srun" not in job.log
