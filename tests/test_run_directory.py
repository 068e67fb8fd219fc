"""One run per --save directory, --overwrite, and a file-system fault mid-run: real script runs
(tiny model, one process or --nproc-per-node 2), no mocks."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from bad_inputs_scripts import TRAIN
from test_training import in_own_session

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(demo_data):
    return demo_data / "finetune_text_document"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "train.yaml"
    # global batch 4: one micro-batch of 2 on each of 2 data-parallel workers
    path.write_text(yaml.safe_dump(dict(TRAIN, training=dict(TRAIN["training"],
                                                             global_batch_size=4))))
    return path


def _flags(config, data, save, iters, *extra):
    return ["--config", config, "--data-path", data, "--train-iters", iters, "--save", save,
            *extra]


def _start(*flags, prefix=()):
    return in_own_session([*prefix, sys.executable, str(ROOT / "scripts" / "finetune_gpt.py"),
                           *map(str, flags)], wait=False)


def _finish(process, timeout=300):
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def _lines(text):
    return [line for line in text.splitlines() if line.strip()]


def _metrics(save):
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def test_two_runs_started_at_once_on_one_save_one_runs_the_other_is_refused(config, data,
                                                                           tmp_path):
    save = tmp_path / "save"
    runs = [_start(*_flags(config, data, save, 3, "--nproc-per-node", 2)) for _ in range(2)]
    results = [_finish(run) for run in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [(code, err[-2000:]) for code, _, err in results]
    _, _, refused = next(result for result in results if result[0] == 2)
    lines = _lines(refused)
    assert len(lines) == 1, refused
    # refused while the other ran, or (had it finished first) because it holds that run now
    assert f"--save {save} is in use by another run" in lines[0] or \
        f"--save {save} holds another run" in lines[0], lines[0]
    records = _metrics(save)
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3]  # one run's, in order
    assert [r["iteration"] for r in records if "valid_loss" in r] == [0, 3]
    assert not (save / "run.lock").exists()  # released with the run


def test_a_lock_left_by_a_killed_run_does_not_block_its_resume(config, data, tmp_path):
    """The lock dies with its process: a run killed while holding it resumes at once."""
    save = tmp_path / "save"
    first = _start(*_flags(config, data, save, 200, "--save-interval", 1))
    try:
        _wait_for(save / "latest_checkpointed_iteration.txt", first)
        assert (save / "run.lock").exists()
        with pytest.raises(BlockingIOError):  # held by the running run
            _try_lock(save / "run.lock")
    finally:
        os.killpg(first.pid, 9)
        first.communicate()
    assert (save / "run.lock").exists()  # left behind by the killed run, unlocked
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    code, _, err = _finish(_start(*_flags(config, data, save, latest + 1, "--load", save)))
    assert code == 0, err[-2000:]


def _try_lock(path):
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def _wait_for(path, process, timeout=240):
    started = time.monotonic()
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() - started < timeout, f"{path} did not appear"
        time.sleep(0.2)


def test_overwrite_with_load_of_another_run_clears_the_old_run(config, data, tmp_path):
    """--load A --save B --overwrite: B then holds only the run resumed from A (none of B's
    old iterations or metrics)."""
    a, b = tmp_path / "a", tmp_path / "b"
    for save, iters in ((a, 2), (b, 4)):
        code, _, err = _finish(_start(*_flags(config, data, save, iters, "--save-interval", 1)))
        assert code == 0, err[-2000:]
    assert sorted(p.name for p in b.glob("iter_*")) == [f"iter_000000{i}" for i in (1, 2, 3, 4)]
    code, _, err = _finish(_start(*_flags(config, data, b, 3, "--load", a, "--overwrite",
                                          "--save-interval", 1)))
    assert code == 0, err[-2000:]
    assert sorted(p.name for p in b.glob("iter_*")) == ["iter_0000003"]
    assert (b / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert [r["iteration"] for r in _metrics(b) if "loss" in r] == [3]
    assert (a / "latest_checkpointed_iteration.txt").read_text().strip() == "2"  # A untouched


def _without_root_override():
    """A command prefix under which chmod binds: as root, drop the capabilities that ignore
    file permissions (setpriv, util-linux); skip where that cannot be done."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only directory would not bite")
    return ("setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--")


def test_a_read_only_save_mid_run_ends_the_job_with_one_line_naming_it(config, data, tmp_path):
    """--nproc-per-node 2: --save turns read-only after the first checkpoint. The job ends
    promptly; after torchrun's summary the last line names the directory and the cause; no
    traceback from this package; the first checkpoint stays the latest."""
    prefix = _without_root_override()
    save = tmp_path / "save"
    run = _start(*_flags(config, data, save, 200, "--save-interval", 1, "--nproc-per-node", 2),
                 prefix=prefix)
    try:
        _wait_for(save / "latest_checkpointed_iteration.txt", run)
        save.chmod(0o555)
        ended = time.monotonic()
        code, _, err = _finish(run, timeout=120)
        elapsed = time.monotonic() - ended
    finally:
        save.chmod(0o755)
        if run.poll() is None:
            os.killpg(run.pid, 9)
            run.communicate()
    lines = _lines(err)
    assert code == 1, err[-3000:]
    expected = (r"finetune_gpt\.py: error: rank \d: the run stopped on a file-system error: "
                rf"{re.escape(str(save))}/\S+: Permission denied \(EACCES\)")
    assert re.match(expected, lines[-1]), lines[-1]
    ours = [line for line in lines if re.search(r'File ".*(megatron_lora|scripts)/', line)]
    assert not ours, err[-3000:]
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert (save / f"iter_{latest:07d}" / "trainer_state.json").is_file()


def test_a_write_refused_by_the_kernel_mid_run_ends_with_one_line(config, data, tmp_path):
    """A full disk's stand-in that needs no privilege: after the first checkpoint the run's
    file-size limit drops below a checkpoint's size (prlimit), so the next save's write fails
    with EFBIG. One process: exactly one line on stderr, exit code 1, the checkpoint before
    it still the latest."""
    resource = pytest.importorskip("resource")
    save = tmp_path / "save"
    run = _start(*_flags(config, data, save, 200, "--save-interval", 1))
    try:
        _wait_for(save / "latest_checkpointed_iteration.txt", run)
        resource.prlimit(run.pid, resource.RLIMIT_FSIZE, (4096, 4096))
        code, _, err = _finish(run, timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, 9)
            run.communicate()
    lines = _lines(err)
    assert code == 1, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("finetune_gpt.py: error: the run stopped on a file-system error")
    assert "File too large (EFBIG)" in lines[0], lines[0]
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert (save / f"iter_{latest:07d}" / "trainer_state.json").is_file()


def test_the_lock_leaves_a_new_save_as_it_was_unless_the_run_wrote_there(tmp_path):
    """Taking the lock makes --save (a refused run then leaves no directory behind); a second
    taker is refused naming the holder; releasing never removes anything the run wrote."""
    from megatron_lora.training.errors import TrainingError
    from megatron_lora.training.rundir import RunLock

    save = tmp_path / "new" / "save"
    lock = RunLock.acquire(save)
    with pytest.raises(TrainingError, match=rf"in use by another run \(pid {os.getpid()} on "):
        RunLock.acquire(save)
    lock.release()
    assert not (tmp_path / "new").exists()
    lock = RunLock.acquire(save)
    (save / "metrics.jsonl").write_text("")
    (save / "tensorboard").mkdir()
    lock.release()
    assert sorted(os.listdir(save)) == ["metrics.jsonl", "tensorboard"]
