"""A whole megatron-core GPT with LoRA on all four linear targets, at TP/SP/PP layouts.

Every layout builds the same logical model from the same seed (no weight copying) and is
compared with the TP=1 run: logits, loss, every LoRA gradient, the grad norm, 20 training
steps, and merge / disable / several adapters. Tied embeddings under PP and the MoE alltoall
dispatcher under EP / expert-TP are compared with their own single-process runs. See
tests/gpt_checks.py for what runs.
"""

import pytest
import torch

from gpt_checks import LAYOUTS, TRAIN_STEPS, TRAINED_LAYOUTS, VARIANT_TARGETS, VARIANTS
from numerics import relative_error

FP32 = 1e-5
REFERENCE = (1, 1, False)
LAYOUT_IDS = {(2, 1, True): "tp2-sp", (1, 2, False): "pp2", (4, 1, False): "tp4",
              (2, 2, True): "tp2-sp-pp2"}
PARALLEL_LAYOUTS = [pytest.param(world, layout, id=LAYOUT_IDS[layout])
                    for world in (2, 4) for layout in LAYOUTS[world]]



def values_over_ranks(per_rank, *keys):
    """[per_rank[r][keys...] for every rank]."""
    values = []
    for rank_result in per_rank:
        value = rank_result
        for key in keys:
            value = value[key]
        values.append(value)
    return values


def merged_over_ranks(per_rank, *keys):
    """One dict from every rank's dict at per_rank[r][keys...] (PP stages own different names)."""
    merged = {}
    for value in values_over_ranks(per_rank, *keys):
        merged.update(value)
    return merged


@pytest.fixture(scope="module")
def reference(gpt_spawned):
    return gpt_spawned(1)[0].layouts[REFERENCE]


def layout_results(gpt_spawned, world, layout):
    return [rank_result.layouts[layout] for rank_result in gpt_spawned(world)]


@pytest.mark.parametrize("world, layout", PARALLEL_LAYOUTS)
def test_same_logical_adapter_at_every_layout(gpt_spawned, reference, world, layout):
    factors = merged_over_ranks([checks.parity for checks in layout_results(gpt_spawned, world, layout)], "factors")
    assert sorted(factors) == sorted(reference.parity["factors"])
    assert len(factors) == 17  # 4 layers x 4 linears + output_layer, by global layer number
    for name, (weight_a, weight_b) in reference.parity["factors"].items():
        assert torch.equal(factors[name][0], weight_a), name
        assert torch.equal(factors[name][1], weight_b), name


@pytest.mark.parametrize("world, layout", PARALLEL_LAYOUTS)
def test_logits_loss_and_every_lora_gradient_match_tp1(gpt_spawned, reference, world, layout):
    results = layout_results(gpt_spawned, world, layout)
    if layout[1] == 1:
        for logits in values_over_ranks([checks.parity for checks in results], "logits"):
            assert relative_error(logits, reference.parity["logits"]) < FP32
    losses = [loss for loss in values_over_ranks([checks.parity for checks in results], "loss") if loss is not None]
    assert losses, "no rank reported a loss"
    for loss in losses:
        assert loss == pytest.approx(reference.parity["loss"], rel=FP32)
    grads = merged_over_ranks([checks.parity for checks in results], "grads")
    assert sorted(grads) == sorted(reference.parity["grads"])
    for name, (grad_a, grad_b) in reference.parity["grads"].items():
        assert grad_a.abs().max() > 0 and grad_b.abs().max() > 0, name
        assert relative_error(grads[name][0], grad_a) < FP32, f"{name} lora_A"
        assert relative_error(grads[name][1], grad_b) < FP32, f"{name} lora_B"
    for norm in values_over_ranks([checks.parity for checks in results], "grad_norm"):
        assert norm == pytest.approx(reference.parity["grad_norm"], rel=FP32)


@pytest.mark.parametrize("world, layout", PARALLEL_LAYOUTS)
def test_report_counts_the_logical_model(gpt_spawned, reference, world, layout):
    for report in values_over_ranks([checks.parity for checks in layout_results(gpt_spawned, world, layout)], "report"):
        assert report == reference.parity["report"]
    adapted, trainable, total = reference.parity["report"]
    assert adapted == 17 and 0 < trainable < total


@pytest.mark.parametrize("world, layout", [p for p in PARALLEL_LAYOUTS if p.values[1][1] == 1])
def test_lora_adds_one_collective_per_step(gpt_spawned, world, layout):
    for base, lora in values_over_ranks([checks.parity for checks in layout_results(gpt_spawned, world, layout)],
                                        "collectives"):
        assert lora == base + 1  # the grad sync; SP included


@pytest.mark.parametrize("world, layout", PARALLEL_LAYOUTS)
def test_training_curves_agree_step_by_step(gpt_spawned, reference, world, layout):
    results = layout_results(gpt_spawned, world, layout)
    expected = reference.training["losses"]
    assert len(expected) == TRAIN_STEPS
    assert expected[-1] < 0.7 * expected[0]  # it learns
    assert reference.training["clipped_steps"] > 0  # clipping was active
    curves = [c for c in values_over_ranks([checks.training for checks in results], "losses") if c[0] is not None]
    assert curves
    for curve in curves:
        for step, (loss, want) in enumerate(zip(curve, expected)):
            assert loss == pytest.approx(want, rel=FP32), f"step {step}"
    for norms in values_over_ranks([checks.training for checks in results], "norms"):
        assert norms == pytest.approx(reference.training["norms"], rel=1e-4)
    factors = merged_over_ranks([checks.training for checks in results], "factors")
    for name, (weight_a, weight_b) in reference.training["factors"].items():
        # 20 Adam steps amplify fp32 reduction-order noise of near-zero gradients a little
        assert relative_error(factors[name][0], weight_a) < 1e-4, name
        assert relative_error(factors[name][1], weight_b) < 1e-4, name
    assert all(values_over_ranks([checks.training for checks in results], "base_unchanged"))
    assert reference.training["base_unchanged"]


MERGE_LAYOUTS = [pytest.param(1, REFERENCE, id="tp1"), pytest.param(2, (2, 1, True), id="tp2-sp")]


@pytest.mark.parametrize("world, layout", MERGE_LAYOUTS)
def test_disable_merge_unmerge_unload(gpt_spawned, world, layout):
    for out in [checks.merge for checks in layout_results(gpt_spawned, world, layout)]:
        assert torch.equal(out["disabled"], out["base"])
        assert torch.equal(out["after_disable"], out["lora"])
        assert relative_error(out["lora"], out["base"]) > 1e-3  # the adapter does something
        assert out["merge_changed_weights"]
        assert relative_error(out["merged"], out["lora"]) < FP32
        assert relative_error(out["unmerged"], out["lora"]) < FP32
        assert relative_error(out["unloaded"], out["merged"]) < FP32
        assert out["wrappers_left"] == 0 and out["keys_restored"]


@pytest.mark.parametrize("world, layout", MERGE_LAYOUTS)
@pytest.mark.parametrize("dtype", ["merge", "merge_bf16"])
def test_unmerge_restores_the_base_within_one_rounding(gpt_spawned, world, layout, dtype):
    for out in [getattr(checks, dtype) for checks in layout_results(gpt_spawned, world, layout)]:
        fidelity = out["unmerge"]
        assert fidelity["max_ulps"] <= 0.5  # half an ulp of max(|w|, |w_merged|)
        # bit-exact wherever the merged value kept every bit (bf16: all but rare ties)
        assert fidelity["exact_where_kept"] >= (1.0 if dtype == "merge" else 0.99)
        if dtype == "merge_bf16":
            assert out["dtypes"] == {"torch.bfloat16"}  # an fp32 adapter keeps a bf16 base bf16


def test_several_adapters_and_delete(gpt_spawned, reference):
    ref = reference.merge
    assert relative_error(ref["both"], ref["lora"]) > 1e-3 and relative_error(ref["both"], ref["only_second"]) > 1e-3
    for out in [checks.merge for checks in layout_results(gpt_spawned, 2, (2, 1, True))]:
        for key in ("only_second", "both", "both_merged", "after_delete"):
            assert relative_error(out[key], ref[key]) < FP32, key
        assert relative_error(out["both_merged"], out["both"]) < FP32
        assert relative_error(out["after_delete"], out["lora"]) < FP32
        assert out["names_after_delete"] == ["default"]


TARGETING_LAYOUTS = [pytest.param(1, REFERENCE, id="tp1"), pytest.param(2, (1, 2, False), id="pp2")]


@pytest.mark.parametrize("world, layout", TARGETING_LAYOUTS)
def test_targets_by_name_suffix_glob_and_regex(gpt_spawned, world, layout):
    results = [checks.targeting for checks in layout_results(gpt_spawned, world, layout)]
    expected_count = {"leaf": 4, "suffix": 4, "glob": 4, "glob_layers": 8, "regex": 4,
                      "exclude": 13, "output_layer": 1, "first_layer_only": 1}
    for case, count in expected_count.items():
        names = sorted({n for out in results for n in out[case][0]})  # union over PP stages
        assert len(names) == count, (case, names)
        assert all(out[case][1] == count for out in results), case  # the global report
    names_of = lambda case: sorted({n for out in results for n in out[case][0]})  # noqa: E731
    assert names_of("leaf") == [f"decoder.layers.{i}.mlp.linear_fc1" for i in range(4)]
    assert names_of("suffix") == [f"decoder.layers.{i}.self_attention.linear_proj" for i in range(4)]
    assert names_of("output_layer") == ["output_layer"]
    assert not any(n.startswith("decoder.layers.0.") for n in names_of("exclude"))
    assert all(n.startswith(("decoder.layers.2.", "decoder.layers.3.")) for n in names_of("regex"))
    for out in results:  # every stage refuses, also the one without decoder.layers.0
        assert "'first_layer' already exists" in out["duplicate_on_one_stage"]


def test_targeting_and_adapter_errors(gpt_spawned):
    out = gpt_spawned(1)[0].layouts[REFERENCE].targeting
    assert "['linear_fc3']" in out["no_match"] and "decoder.layers.*.mlp.linear_fc1" in out["no_match"]
    assert out["untouched_after_error"]
    assert "already exists" in out["duplicate"] and "'default'" in out["duplicate"]
    assert "unknown adapter" in out["unknown_set"] and "'nope'" in out["unknown_set"]
    assert "unknown adapter" in out["unknown_delete"]
    assert out["not_a_config"].startswith("TypeError") and "LoraConfig" in out["not_a_config"]
    assert "unmerge_adapter" in out["disable_merged"]
    assert "unmerge" in out["delete_merged"]


# --- model variants: tied embeddings under PP, the MoE alltoall dispatcher under EP ---------------

VARIANT_LAYOUTS = [pytest.param(name, world, entry[0], id=entry[0])
                   for name, (_, layouts) in VARIANTS.items()
                   for world, entries in layouts.items() if world > 1 for entry in entries]


def variant_results(gpt_spawned, world, layout_id):
    return [rank_result.variants[layout_id] for rank_result in gpt_spawned(world)]


def variant_reference(gpt_spawned, name):
    (reference_id, *_), = VARIANTS[name][1][1]
    return gpt_spawned(1)[0].variants[reference_id]


@pytest.mark.parametrize("name, world, layout_id", VARIANT_LAYOUTS)
def test_variant_matches_its_single_process_run(gpt_spawned, name, world, layout_id):
    reference = variant_reference(gpt_spawned, name).parity
    results = variant_results(gpt_spawned, world, layout_id)
    factors = merged_over_ranks([checks.parity for checks in results], "factors")
    assert sorted(factors) == sorted(reference["factors"])
    for factor_name, (weight_a, weight_b) in reference["factors"].items():
        assert torch.equal(factors[factor_name][0], weight_a), factor_name
        assert torch.equal(factors[factor_name][1], weight_b), factor_name
    logits = [out for out in values_over_ranks([checks.parity for checks in results], "logits") if out is not None]
    assert logits, "no rank returned logits"
    for out in logits:
        assert relative_error(out, reference["logits"]) < FP32
    losses = [loss for loss in values_over_ranks([checks.parity for checks in results], "loss") if loss is not None]
    assert losses
    for loss in losses:
        assert loss == pytest.approx(reference["loss"], rel=FP32)
    grads = merged_over_ranks([checks.parity for checks in results], "grads")
    assert sorted(grads) == sorted(reference["grads"])
    for grad_name, (grad_a, grad_b) in reference["grads"].items():
        assert grad_a.abs().max() > 0 and grad_b.abs().max() > 0, grad_name
        assert relative_error(grads[grad_name][0], grad_a) < FP32, f"{grad_name} lora_A"
        assert relative_error(grads[grad_name][1], grad_b) < FP32, f"{grad_name} lora_B"
    for norm in values_over_ranks([checks.parity for checks in results], "grad_norm"):
        assert norm == pytest.approx(reference["grad_norm"], rel=FP32)
    for report in values_over_ranks([checks.parity for checks in results], "report"):
        assert report == reference["report"]  # the logical model, counted once


def test_variants_adapt_what_they_should(gpt_spawned):
    tied = variant_reference(gpt_spawned, "tied").parity["report"]
    alltoall = variant_reference(gpt_spawned, "alltoall").parity["report"]
    shared = variant_reference(gpt_spawned, "moe-shared").parity["report"]
    assert tied[0] == 17  # output_layer adapted although its weight is the embedding's
    tied_embedding = variant_reference(gpt_spawned, "tied-embedding").parity
    assert tied_embedding["report"][0] == 18  # the word embeddings too, counted once
    assert "embedding.word_embeddings" in tied_embedding["grads"]
    assert alltoall[0] == 4 * (2 + 4 * 2) + 1  # qkv, proj and 4 experts' fc1 / fc2 per layer
    # per layer: qkv, proj, the shared expert's fc1 / fc2, the router, 4 experts' fc1 / fc2;
    # then the output layer and the word embeddings
    assert shared[0] == 4 * (2 + 2 + 1 + 4 * 2) + 2


# 20 Adam steps on a top-2 routed model amplify fp32 reduction-order noise more than a dense
# one does (measured on 0.16: <= 1.7e-6 for the first 12 steps; by step 20, 4.6e-5 at the
# trained layout and 1.0e-4 at TP 4 + SP)
MOE_CURVE = 3e-4
def test_mla_projections_train_at_tp1(gpt_spawned):
    for name in ("mla", "mla-q-proj"):
        (reference_id, *_), = VARIANTS[name][1][1]
        checks = gpt_spawned(1)[0].variants[reference_id]
        assert checks.parity["report"][0] == 4 * len(VARIANT_TARGETS[name]), name
        grads = checks.parity["grads"]
        projections = {n.rsplit(".", 1)[-1] for n in grads if ".self_attention." in n}
        want = set(VARIANT_TARGETS[name]) - {"linear_fc1", "linear_fc2"}
        assert projections == want, (name, projections)
        for grad_name, (grad_a, grad_b) in grads.items():
            assert grad_a.abs().max() > 0 and grad_b.abs().max() > 0, grad_name
    losses = gpt_spawned(1)[0].variants["mla-tp1"].training["losses"]
    assert losses[-1] < 0.7 * losses[0]  # it learns


def test_mla_at_tp2_is_refused_with_the_reason(gpt_spawned):
    for checks in gpt_spawned(2):
        message = checks.variants["mla-refused"].refusal
        assert message is not None
        assert "multi-latent attention at tensor-parallel size 2" in message
        assert "use TP=1" in message


def test_word_embeddings_tied_to_the_output_layer_are_refused_over_pipeline_stages(gpt_spawned):
    for checks in gpt_spawned(2):
        message = checks.variants["tied-refused"].refusal
        assert message is not None
        assert "embedding.word_embeddings" in message and "tied to the output layer" in message
        assert "pipeline size 1 only" in message


@pytest.mark.parametrize("world", [1, 2, 4])
def test_an_adapter_on_tied_embeddings_changes_both_sides_and_merges_exactly(gpt_spawned, world):
    """The output layer adds the embedding adapter's delta on the shared weight, so merging
    it into the table (which both sides read) changes nothing."""
    (layout_id, *_), = VARIANTS["tied-embedding"][1][world]
    for checks in variant_results(gpt_spawned, world, layout_id):
        merge = checks.tied_weights
        if merge["unmerged"] is None:
            continue
        assert relative_error(merge["merged"], merge["unmerged"]) < FP32
        assert relative_error(merge["unmerged_again"], merge["unmerged"]) < FP32
        assert relative_error(merge["base"], merge["unmerged"]) > 1e-3  # the adapter matters


PARALLEL_TRAINED_LAYOUTS = [pytest.param(name, world, entry[0], id=entry[0])
                            for name, (_, layouts) in VARIANTS.items()
                            for world, entries in layouts.items() if world > 1
                            for entry in entries if entry[0] in TRAINED_LAYOUTS]


@pytest.mark.parametrize("name, world, layout_id", PARALLEL_TRAINED_LAYOUTS)
def test_variant_training_curve_matches_its_single_process_run(gpt_spawned, name, world,
                                                               layout_id):
    reference = variant_reference(gpt_spawned, name).training
    assert len(reference["losses"]) == TRAIN_STEPS
    assert reference["losses"][-1] < 0.7 * reference["losses"][0]  # it learns
    curves = [c for c in values_over_ranks([out.training for out in
                                             variant_results(gpt_spawned, world, layout_id)],
                                            "losses") if c[0] is not None]
    assert curves
    for curve in curves:
        for step, (loss, want) in enumerate(zip(curve, reference["losses"])):
            assert loss == pytest.approx(want, rel=FP32 if step < 12 else MOE_CURVE), f"step {step}"


@pytest.mark.parametrize("world", [2, 4])
def test_tied_output_copy_is_the_word_embedding(gpt_spawned, world):
    """The last stage's copy of tied embeddings starts as the first stage's embedding, the
    same logical tensor as at PP=1 (drawn once from the embedding's name)."""
    reference = variant_reference(gpt_spawned, "tied").tied_weights["embedding"]
    (layout_id, *_), = VARIANTS["tied"][1][world]
    weights = [out.tied_weights for out in variant_results(gpt_spawned, world, layout_id)]
    embeddings = [w["embedding"] for w in weights if w["embedding"] is not None]
    copies = [w["output_copy"] for w in weights if w["output_copy"] is not None]
    assert embeddings and copies
    for weight in embeddings + copies:
        assert torch.equal(weight, reference)
    # megatron's mark: the grad norm and the parameter report count the copy once
    assert all(w["output_copy_marked_shared"] for w in weights if w["output_copy"] is not None)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_tied_checkpoints_load_with_the_same_logits(gpt_spawned, saved_adapters, world):
    """Adapter files and megatron dist-checkpoints of the tied model: loaded back at the
    layout they were saved at, the same logits; the adapter file is the same at every layout
    (so one saved at PP=2 loads at PP=1)."""
    from checkpoint_checks import _same_tensors

    (layout_id, *_), = VARIANTS["tied"][1][world]
    results = [out.checkpoints for out in variant_results(gpt_spawned, world, layout_id)]
    assert any(out["logits"] is not None for out in results)
    for out in results:
        if out["logits"] is not None:
            assert relative_error(out["adapter_logits"], out["logits"]) < FP32
            assert relative_error(out["dist_checkpoint_logits"], out["logits"]) < FP32
    if world > 1:
        directory = saved_adapters[0]
        gpt_spawned(1)  # the one-process layout's file
        (reference_id, *_), = VARIANTS["tied"][1][1]
        assert _same_tensors(directory / layout_id / "adapter", directory / reference_id / "adapter")
