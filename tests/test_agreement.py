"""megatron_lora.agreement on two gloo ranks: after a failure on one rank every rank raises,
with the error kinds kept apart; counts and bytes gathered without pickle."""

from megatron_lora.cpu import spawn_gloo


def _outcome(call):
    try:
        call()
    except Exception as error:  # the kind and the message are what the test compares
        return [type(error).__name__, str(error)]
    return None


def agreement_checks(rank, world_size):
    from megatron_lora.agreement import all_gather_bytes, raise_if_any_rank_failed, sum_over_world
    from megatron_lora.adapter_file import AdapterCheckpointError
    from megatron_lora.training.errors import TrainingError

    def failing_on_rank_1(error):
        return lambda: raise_if_any_rank_failed(error if rank == 1 else None, TrainingError)

    return {
        "none": _outcome(lambda: raise_if_any_rank_failed(None, TrainingError)),
        "user": _outcome(failing_on_rank_1(AdapterCheckpointError("adapter file is damaged"))),
        "bug": _outcome(failing_on_rank_1(OSError("disk on fire"))),
        "bug_while": _outcome(lambda: raise_if_any_rank_failed(
            OSError("disk on fire") if rank == 1 else None, TrainingError, doing="saving x")),
        "sum": sum_over_world([rank + 1, 10]),
        "bytes": all_gather_bytes(["".encode(), "ünïcode ✓".encode()][rank]),
    }


def test_a_failure_on_one_rank_raises_on_every_rank():
    rank0, rank1 = spawn_gloo(agreement_checks, 2, timeout=120)
    assert rank0["none"] is None and rank1["none"] is None
    # the failing rank keeps its own error; the other raises the caller's user-error kind
    assert rank1["user"] == ["AdapterCheckpointError", "adapter file is damaged"]
    assert rank0["user"] == ["TrainingError", "adapter file is damaged"]
    # a bug stays a bug elsewhere too, naming the rank it happened on
    assert rank1["bug"] == ["OSError", "disk on fire"]
    assert rank0["bug"] == ["RuntimeError", "rank 1 failed: disk on fire"]
    assert rank0["bug_while"] == ["RuntimeError", "rank 1 failed saving x: disk on fire"]
    assert rank0["sum"] == rank1["sum"] == [3, 20]
    assert rank0["bytes"] == rank1["bytes"] == [b"", "ünïcode ✓".encode()]
