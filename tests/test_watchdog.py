"""megatron_lora.watchdog: a helper thread or process that dies ends the process promptly with
its cause; helpers that finish normally change nothing. Each case runs in a fresh interpreter,
since the watchdog ends the process it runs in."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = """
import multiprocessing, os, signal, sys, threading, time
from megatron_lora.watchdog import end_process_if_helper_dies
"""


def run(body: str, timeout: float = 60):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                            capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return result, time.monotonic() - started


def test_a_helper_thread_that_raises_ends_the_process():
    result, elapsed = run("""
        def write():
            raise OSError("disk full while writing bucket 0")
        with end_process_if_helper_dies("saving ckpt/iter_2"):
            threading.Thread(target=write, name="writer-0").start()
            threading.Event().wait()  # what megatron's queue join does: wait forever
        print("not reached")
    """)
    assert result.returncode == 1, result
    assert "not reached" not in result.stdout
    assert "helper thread 'writer-0' died while saving ckpt/iter_2" in result.stderr
    assert "OSError: disk full while writing bucket 0" in result.stderr
    assert elapsed < 30


def test_a_helper_process_that_fails_or_is_killed_ends_the_process():
    for target, code in (("sys.exit", 3), ("os.kill", -9)):
        args = "(3,)" if code == 3 else "(0, 0)"
        result, elapsed = run(f"""
            def helper(a, b=None):
                if {code} == -9:
                    os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
                sys.exit(a)
            with end_process_if_helper_dies("saving ckpt/iter_2"):
                multiprocessing.get_context("fork").Process(target=helper, args={args}).start()
                threading.Event().wait()
            print("not reached")
        """)
        assert result.returncode == 1, result
        assert "not reached" not in result.stdout
        assert "died while saving ckpt/iter_2" in result.stderr
        assert f"exited with code {code}" in result.stderr, result.stderr
        assert elapsed < 30


def test_helpers_that_finish_normally_change_nothing():
    result, _ = run("""
        hooks = (threading.excepthook, multiprocessing.process.BaseProcess.start)
        with end_process_if_helper_dies("saving"):
            thread = threading.Thread(target=lambda: None)
            thread.start(); thread.join()
            process = multiprocessing.get_context("fork").Process(target=lambda: None)
            process.start(); process.join()
            time.sleep(0.5)  # the watcher sees the exit code 0
        assert (threading.excepthook, multiprocessing.process.BaseProcess.start) == hooks
        # after the block, a dying helper is no longer this watchdog's business
        threading.Thread(target=lambda: 1 / 0).start()
        time.sleep(0.5)
        print("finished")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "finished"
    assert "ZeroDivisionError" in result.stderr  # Python's own report, not an exit
