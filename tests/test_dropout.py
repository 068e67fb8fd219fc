"""LoRA dropout: one mask for a replicated input, per-shard masks for a sharded one."""

import pytest


@pytest.mark.parametrize("tp", (1, 2, 4))
def test_replicated_input_mask_equals_tp1_mask_on_every_rank(spawned, tp):
    for rank, result in enumerate(spawned(tp)):
        for path in ("fast", "fallback"):
            metrics = result.dropout[f"column-replicated-{path}"]
            assert max(metrics.values()) <= 1e-12, (rank, path, metrics)


@pytest.mark.parametrize("tp", (2, 4))
def test_sharded_inputs_draw_per_rank_masks_and_stay_exact(spawned, tp):
    for rank, result in enumerate(spawned(tp)):
        for kind in ("row-sharded", "column-sharded"):
            metrics = result.dropout[kind]
            assert metrics["masks_differ_across_ranks"], (rank, kind)
            assert 0.2 < metrics["drop_fraction"] < 0.4, (rank, kind, metrics)
            for name in ("out", "dA", "dB"):
                assert metrics[name] <= 1e-12, (rank, kind, name, metrics[name])
