"""LoraParallelLinear at TP 1/2/4, SP on/off, every base setting, against a TP=1 reference."""

import pytest

import mp_checks

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
TP_SIZES = (1, 2, 4)


def _cases(tp):
    return [(tp, mp_checks.case_id(case), case["dtype"]) for case in mp_checks.parity_cases(tp)]


@pytest.mark.parametrize("tp", TP_SIZES)
def test_matrix_covers_every_setting(tp):
    ids = [case_id for _, case_id, _ in _cases(tp)]
    assert len(ids) == len(set(ids))
    kinds = {case_id.split("-")[0] for case_id in ids}
    assert kinds == {"column", "row", "chain"}
    assert any("-sp-" in case_id for case_id in ids) == (tp > 1)
    for needed in ("gather", "nogather", "iip", "scatter", "bias", "nobias", "skip", "noskip",
                   "fast", "fallback", "trainable", "float32", "float64"):
        assert any(f"-{needed}" in case_id for case_id in ids), needed


@pytest.mark.parametrize(
    "tp,case_id,dtype", [c for tp in TP_SIZES for c in _cases(tp)], ids=lambda v: str(v)
)
def test_output_input_grad_and_lora_grads_match_tp1(spawned, tp, case_id, dtype):
    for rank, result in enumerate(spawned(tp)):
        metrics = result.parity[case_id]
        for name, value in metrics.items():
            if isinstance(value, bool):
                assert value, f"rank {rank}: {name} is False"
            else:
                assert value <= TOLERANCE[dtype], f"rank {rank}: {name} error {value:.3g}"
        assert {"out", "dx", "dA"} <= set(metrics) or {"out", "dx", "dA1"} <= set(metrics)


@pytest.mark.parametrize("tp", TP_SIZES)
def test_several_active_adapters_are_summed_exactly(spawned, tp):
    for rank, result in enumerate(spawned(tp)):
        cases = result.multi_adapter
        assert len(cases) == (8 if tp > 1 else 4)
        for label, metrics in cases.items():
            assert {"dA-default", "dB-second"} <= set(metrics)
            for name, value in metrics.items():
                assert value <= 1e-10, (rank, label, name, value)
