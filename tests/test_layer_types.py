"""LoRA on VocabParallelEmbedding and the MoE router at TP 1/2/4, SP on/off, against one-process
references (tests/layer_type_checks.py, run inside the TP spawns of tests/mp_checks.py)."""

import pytest

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
TP_SIZES = (1, 2, 4)


def _assert_every_case_close(spawned, tp, check, cases_at_tp1, required):
    """Every case of ``check`` on every rank: the required metrics present, all within tolerance;
    SP on and off above TP=1 doubles the cases."""
    for rank, result in enumerate(spawned(tp)):
        cases = result.layer_types[check]
        assert len(cases) == cases_at_tp1 * (2 if tp > 1 else 1)
        for label, metrics in cases.items():
            assert set(required) <= set(metrics)
            _assert_close(rank, label, metrics)


def _assert_close(rank, label, metrics):
    dtype = label.split("-")[0]
    for name, value in metrics.items():
        if isinstance(value, bool):
            assert value, f"rank {rank} {label}: {name} is False"
        else:
            assert value <= TOLERANCE[dtype], f"rank {rank} {label}: {name} error {value:.3g}"


@pytest.mark.parametrize("tp", TP_SIZES)
def test_embedding_output_and_lora_grads_match_tp1(spawned, tp):
    # 2 dtypes x 2 paths
    _assert_every_case_close(spawned, tp, "embedding", 4, {"out", "dA", "dB"})


@pytest.mark.parametrize("tp", TP_SIZES)
def test_embedding_merges_exactly_and_adds_no_collective(spawned, tp):
    for rank, result in enumerate(spawned(tp)):
        checks = result.layer_types["embedding_merge"]
        for key in ("nosp", "sp") if tp > 1 else ("nosp",):
            assert checks[f"merge-{key}"] <= 1e-12, (rank, key)
            assert checks[f"unmerge-{key}"] <= 1e-12, (rank, key)
            calls = checks[f"collectives-{key}"]
            # the delta joins the base's all-reduce / reduce-scatter: nothing more per step
            assert calls["lora"] == calls["base"], (rank, key, calls)
            # B's partial gradients: one all-reduce for the layer (none without TP)
            assert calls["grad_sync"] == (1 if tp > 1 else 0), (rank, key, calls)


@pytest.mark.parametrize("tp", TP_SIZES)
def test_router_probs_and_lora_grads_match_tp1(spawned, tp):
    # 2 dtypes
    _assert_every_case_close(spawned, tp, "router", 2, {"probs", "same_experts", "dx", "dA", "dB"})


@pytest.mark.parametrize("tp", TP_SIZES)
def test_router_gradients_are_summed_over_tp_only_under_sp(spawned, tp):
    for rank, result in enumerate(spawned(tp)):
        counts = result.layer_types["router_collectives"]
        assert counts["nosp"] == {"base": 0, "lora": 0, "grad_sync": 0, "grad_sync_returned": 0}
        if tp > 1:
            assert counts["sp"]["lora"] == counts["sp"]["base"] == 0
            assert counts["sp"]["grad_sync"] == counts["sp"]["grad_sync_returned"] == 1


def test_router_refuses_dropout_with_the_reason(spawned):
    message = spawned(2)[0].layer_types["router_dropout"]
    assert message is not None and "lora_dropout=0.1" in message and "router" in message
