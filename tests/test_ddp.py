"""megatron-core DDP (main_grad) with finalize_model_grads_with_lora, and the grad norm."""

import pytest


@pytest.mark.parametrize("tp", (1, 2, 4))
def test_main_grads_and_grad_norm_match_tp1(spawned, tp):
    for rank, result in enumerate(spawned(tp)):
        for layout, metrics in result.ddp.items():
            for name, value in metrics.items():
                assert value <= 1e-5, (rank, layout, name, value)
        assert ("sp" in result.ddp) == (tp > 1)
