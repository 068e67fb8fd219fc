"""End this process promptly, with the cause on stderr, when a helper it depends on dies.

megatron-core's dist-checkpointing writes through helpers and waits for them without a
timeout: writer processes forked per file bucket (0.16), writer threads and a spawned
results-queue manager process (0.17+). A helper that dies before it reports (an exception
outside its own try block, such as a missing ``psutil``, or a kill by the OOM killer) leaves
the rank waiting forever on a queue, and the other ranks waiting on it in the next collective.

:func:`end_process_if_helper_dies` watches every thread and child process started inside it.
If one dies with an exception or a non-zero exit code, it prints what died, why and where,
ends the other helpers started inside it, and exits this process with status 1. The caller's
main thread cannot be woken from megatron's queue wait, so exiting is the only prompt way out;
under torchrun the launcher then ends the other ranks within seconds.
"""

from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import sys
import threading
import traceback
from typing import Iterator, List

HELPER_FAILURE_EXIT_CODE = 1
_POLL_INTERVAL_S = 0.2

# One watch at a time: the start hook and the thread hook are process-wide.
_WATCH_LOCK = threading.Lock()


def _end_process(activity: str, what: str, detail: str, started: List) -> None:
    message = (f"megatron_lora: {what} died while {activity}; ending this process "
               f"(pid {os.getpid()}) instead of waiting for it forever.\n{detail}")
    try:
        sys.stderr.write(message.rstrip("\n") + "\n")
        sys.stderr.flush()
    finally:
        for process in started:
            if process.exitcode is None:
                process.kill()
        os._exit(HELPER_FAILURE_EXIT_CODE)


@contextlib.contextmanager
def end_process_if_helper_dies(activity: str) -> Iterator[None]:
    """Inside this block, a helper thread or child process that dies ends the process.

    ``activity`` names what the helpers work for (for example ``"saving checkpoint X"``); it
    goes into the message. A helper that finishes normally (exit code 0, no exception) is
    fine. Helpers outliving the block are no longer watched.
    """
    if not _WATCH_LOCK.acquire(blocking=False):
        yield  # an enclosing block already watches everything started in this one
        return
    started: List = []
    original_start = multiprocessing.process.BaseProcess.start
    original_excepthook = threading.excepthook

    def start_and_record(process, *args, **kwargs):
        result = original_start(process, *args, **kwargs)
        started.append(process)
        return result

    def thread_died(args) -> None:
        if issubclass(args.exc_type, SystemExit):
            return original_excepthook(args)
        detail = "".join(traceback.format_exception(args.exc_type, args.exc_value,
                                                    args.exc_traceback))
        _end_process(activity, f"helper thread {args.thread.name!r}", detail, started)

    stop = threading.Event()

    def watch_processes() -> None:
        while not stop.wait(_POLL_INTERVAL_S):
            for process in list(started):
                code = process.exitcode  # polls the child; stays readable once it is reaped
                if code not in (None, 0):
                    _end_process(activity, f"helper process {process.name} (pid {process.pid})",
                                 f"It exited with code {code}; its own error, if it printed "
                                 f"one, is above.", started)

    watcher = threading.Thread(target=watch_processes, name="megatron_lora-helper-watch",
                               daemon=True)
    multiprocessing.process.BaseProcess.start = start_and_record
    threading.excepthook = thread_died
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        multiprocessing.process.BaseProcess.start = original_start
        threading.excepthook = original_excepthook
        _WATCH_LOCK.release()
