"""megatron_lora.cpu: the version gate and which adjustments each megatron-core line gets.
(That the adjusted megatron computes the right numbers is what every spawning test checks.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lora.cpu import (
    SUPPORTED_MEGATRON_CORE_LINES,
    UnsupportedMegatronVersionError,
    check_megatron_core_version,
    megatron_core_release_line,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version, line", [("0.16.1", "0.16"), ("0.19.2", "0.19"),
                                           ("0.17.0rc1", "0.17"), ("0.18.2.dev0", "0.18"),
                                           ("1.0.0", "1.0")])
def test_release_line(version, line):
    assert megatron_core_release_line(version) == line


def test_supported_lines_pass_the_gate():
    for line in SUPPORTED_MEGATRON_CORE_LINES:
        assert check_megatron_core_version(f"{line}.0") == line


@pytest.mark.parametrize("version", ["0.15.3", "0.20.0", "1.0.0", "unknown"])
def test_untested_lines_are_refused_with_what_is_supported(version):
    with pytest.raises(UnsupportedMegatronVersionError) as error:
        check_megatron_core_version(version)
    message = str(error.value)
    assert f"found {version}" in message
    assert "0.16.x, 0.17.x, 0.18.x, 0.19.x" in message


def test_the_installed_line_gets_its_adjustments_and_cuda_streams_become_host_no_ops():
    script = """
import json, torch, megatron.core
from megatron_lora.cpu import applied_adjustments, make_cpu_ready
make_cpu_ready()
make_cpu_ready()  # idempotent
stream = torch.cuda.current_stream()
side = torch.cuda.Stream()
side.wait_stream(stream)
with torch.cuda.stream(side):
    event = side.record_event()
event.synchronize()
print(json.dumps({"version": megatron.core.__version__, "applied": applied_adjustments(),
                  "device": torch.cuda.current_device()}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT, timeout=120, env={"PYTHONPATH": str(ROOT),
                                                         "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    expected = ["allocate_on_cpu", "no_device_synchronize", "host_synchronous_streams",
                "cpu_rng_tracker", "cpu_causal_masks"]
    if report["version"].startswith("0.16."):
        expected.append("bind_moe_fused_names")
    assert report["applied"][:len(expected)] == expected
    assert report["device"] == "cpu"


SPAWNING_PARENT = r'''
import sys, time
from megatron_lora.cpu import spawn_gloo

def wait_forever(rank, world_size):
    print(f"rank {rank} up", flush=True)
    time.sleep(600)

if __name__ == "__main__":
    spawn_gloo(wait_forever, 2, timeout=600)
'''


def test_spawned_ranks_end_when_their_parent_is_killed(tmp_path):
    """spawn_gloo's ranks die with the process that started them, even when it is killed by a
    signal that runs no cleanup (a CI timeout's SIGKILL), so none is left behind."""
    import os
    import signal
    import time

    import psutil

    script = tmp_path / "parent.py"
    script.write_text(SPAWNING_PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        # other output may share a line with a rank's (imports print without a newline);
        # read on a thread so that ranks that never come up fail the test in 2 minutes
        import queue
        import threading

        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in parent.stdout],
                         daemon=True).start()
        started, deadline = 0, time.monotonic() + 120
        while started < 2:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("the spawned ranks did not come up within 120 s")
            started += line.count(" up")
        ranks = [child for child in psutil.Process(parent.pid).children(recursive=True)
                 if "spawn_main" in " ".join(child.cmdline())]
        assert len(ranks) >= 2, ranks
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        gone, alive = psutil.wait_procs(ranks, timeout=30)
        assert not alive, f"ranks outlived their killed parent: {alive}"
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)  # only this test's own session
        except ProcessLookupError:
            pass


def start_a_helper_and_return(rank, world_size):
    """A rank that starts a long-lived helper of its own (as megatron's checkpoint writer
    starts a multiprocessing Manager) and returns without ending it."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid


def test_helpers_a_rank_started_end_with_the_spawn():
    import psutil

    from megatron_lora.cpu import spawn_gloo

    helpers = []
    for pid in spawn_gloo(start_a_helper_and_return, 2, timeout=120):
        try:
            helpers.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(helpers, timeout=10)
    # killed but not yet reaped by whoever inherited it: ended all the same
    alive = [p for p in alive if _status(p) not in (psutil.STATUS_ZOMBIE, None)]
    for process in alive:  # only this test's own helpers; the assertion below reports them
        process.kill()
    assert not alive, f"helpers outlived spawn_gloo: {alive}"


def _status(process):
    import psutil

    try:
        return process.status()
    except psutil.NoSuchProcess:
        return None


def hang_in_a_named_function(rank, world_size):
    import time

    time.sleep(600)


def test_a_timeout_names_where_each_rank_hangs():
    from megatron_lora.cpu import spawn_gloo

    with pytest.raises(TimeoutError) as error:
        # both ranks import torch and megatron-core in 4-8 s here: ample margin, little CI time
        spawn_gloo(hang_in_a_named_function, 2, timeout=30)
    message = str(error.value)
    assert "did not finish on 2 ranks within 30 s" in message
    for rank in (0, 1):
        assert f"rank {rank}, still running" in message
    assert message.count("in hang_in_a_named_function") == 2, message
