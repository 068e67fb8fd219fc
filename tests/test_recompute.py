"""Activation recompute with a frozen base (docs/recompute.md), on the tiny GPT.

Every recompute mode megatron-core offers (full uniform / block with 1 and with all layers,
selective, selective with the MLP, distribute_saved_activations) against the same layout and
adapter without recompute, at TP=1, TP=2 + SP, TP=2 and PP=2: logits, loss and the gradient of
every LoRA factor, with LoRA dropout too; an alltoall MoE at EP=2 under full and "moe"
recompute; 20 training steps under full recompute. The checks run in the spawns of
tests/gpt_checks.py (GptChecks.recompute), so they add no process start.
"""

import pytest

from gpt_checks import RECOMPUTE_CASES, RECOMPUTE_LAYOUTS, RECOMPUTE_TRAINING_CASE, TRAIN_STEPS
from numerics import relative_error
from test_gpt_model import merged_over_ranks, values_over_ranks

EXACT = 1e-6  # relative; on CPU every comparison here is in fact bit-identical
CASES = [pytest.param(layout, case, id=f"{layout}-{case}")
         for layout, (_, _, _, cases) in RECOMPUTE_LAYOUTS.items() for case in cases]


def recompute_results(gpt_spawned, layout):
    """Per-rank results of check_recompute at this layout id."""
    world = RECOMPUTE_LAYOUTS[layout][0]
    return [rank_result.recompute[layout] for rank_result in gpt_spawned(world)]


@pytest.mark.parametrize("layout, case", CASES)
def test_no_trainable_lora_parameter_ends_backward_without_a_gradient(gpt_spawned, layout, case):
    """Before the fix, full recompute left every layer's factors (block: layer 0's) at
    grad None on the first pipeline stage, and selective MLP recompute every MLP's."""
    results = recompute_results(gpt_spawned, layout)
    for rank, out in enumerate(values_over_ranks(results, "cases", case)):
        assert out["trainable"] > 0, f"rank {rank} trains nothing"
        assert out["no_grad"] == [], f"rank {rank}: grad is None for {out['no_grad']}"


@pytest.mark.parametrize("layout, case", CASES)
def test_recompute_gives_the_gradients_of_no_recompute(gpt_spawned, layout, case):
    results = recompute_results(gpt_spawned, layout)
    variant = RECOMPUTE_CASES[case][1]
    got = values_over_ranks(results, "cases", case)
    want = values_over_ranks(results, "reference", variant)
    losses = [(g["loss"], w["loss"]) for g, w in zip(got, want) if w["loss"] is not None]
    assert losses, "no rank reported a loss"
    for loss, expected in losses:
        assert loss == pytest.approx(expected, rel=EXACT)
    for g, w in zip(got, want):
        if "logits" in w:
            assert relative_error(g["logits"], w["logits"]) <= EXACT
    grads = merged_over_ranks(results, "cases", case, "grads")
    expected = merged_over_ranks(results, "reference", variant, "grads")
    assert sorted(grads) == sorted(expected) and expected
    for name, (grad_a, grad_b) in expected.items():
        assert grad_a.abs().max() > 0 and grad_b.abs().max() > 0, name
        assert relative_error(grads[name][0], grad_a) <= EXACT, f"{name} lora_A"
        assert relative_error(grads[name][1], grad_b) <= EXACT, f"{name} lora_B"


@pytest.mark.parametrize("layout", [layout for layout, entry in RECOMPUTE_LAYOUTS.items()
                                    if any(RECOMPUTE_CASES[c][1] == "dropout" for c in entry[3])])
def test_lora_dropout_masks_matter(gpt_spawned, layout):
    """The dropout cases prove the recomputed forward redraws the original masks only if
    the masks change the result: the dropout reference differs from the plain one."""
    results = recompute_results(gpt_spawned, layout)
    assert "plain" in results[0]["reference"]
    dropped = merged_over_ranks(results, "reference", "dropout", "grads")
    plain = merged_over_ranks(results, "reference", "plain", "grads")
    assert max(relative_error(dropped[n][0], plain[n][0]) for n in plain) > 1e-3


@pytest.mark.parametrize("layout", ["tp1", "tp2-sp"])
def test_training_under_full_recompute_gives_the_no_recompute_curve(gpt_spawned, layout):
    """20 Adam steps under full recompute against run_all's own training run of the layout."""
    world, parallel, _, _ = RECOMPUTE_LAYOUTS[layout]
    results = recompute_results(gpt_spawned, layout)
    baseline = [r.layouts[parallel].training for r in gpt_spawned(world)]
    for got, want in zip(values_over_ranks(results, "training"), baseline):
        assert len(got["losses"]) == TRAIN_STEPS
        assert got["losses"] == pytest.approx(want["losses"], rel=EXACT), RECOMPUTE_TRAINING_CASE
        assert got["norms"] == pytest.approx(want["norms"], rel=EXACT)
        for name, (weight_a, weight_b) in want["factors"].items():
            assert relative_error(got["factors"][name][0], weight_a) <= EXACT, name
            assert relative_error(got["factors"][name][1], weight_b) <= EXACT, name
    assert baseline[0]["losses"][-1] < 0.7 * baseline[0]["losses"][0]  # it learns
