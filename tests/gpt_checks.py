"""Whole-GPT checks that run inside spawned gloo process groups.

One spawn per world size runs every layout of that size (megatron's parallel state is rebuilt
between layouts). Each layout builds the same logical GPT from the same seed, with no weight
copying, and returns plain tensors keyed by global module name; the tests compare every
layout with the TP=1 run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from megatron_lora.diagnostics import CollectiveCounter

# GQA (8 heads, 4 query groups), SwiGLU, RMSNorm, rotary, no bias; divisible by TP 4 and PP 2.
TINY_GPT = dict(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=8,
    num_query_groups=4,
    ffn_hidden_size=96,
    vocab_size=128,
    seq_length=16,
    normalization="RMSNorm",
    activation="swiglu",
    add_bias_linear=False,
    position_embedding_type="rope",
    hidden_dropout=0.0,
    attention_dropout=0.0,
    init_method_std=0.05,
    seed=1234,
)
# the four linears plus the vocab-parallel output layer (whose logits megatron's cross entropy
# modifies in place, which a LoRA output must allow)
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer"]
MICRO_BATCHES, MICRO_BATCH_SIZE = 2, 2
TRAIN_STEPS, LEARNING_RATE, CLIP_NORM = 20, 1e-2, 1.0

# (TP, PP, SP) layouts run by each world size; (1, 1, False) is the reference.
LAYOUTS = {1: [(1, 1, False)], 2: [(2, 1, True), (1, 2, False)], 4: [(4, 1, False), (2, 2, True)]}

# Model variants whose layouts crashed on CPU before: each variant's layouts are compared with
# its own world-1 run. name -> (model settings, {world: [(id, TP, PP, SP, layout settings)]}).
VARIANTS = {
    # the last stage holds a copy of the word embeddings (zeroed and all-reduced by megatron)
    "tied": (dict(untie_embeddings_and_output_weights=False), {
        1: [("tied-tp1", 1, 1, False, {})],
        2: [("tied-pp2", 1, 2, False, {})],
        4: [("tied-tp2-sp-pp2", 2, 2, True, {})],
    }),
    # an adapter on tied word embeddings: the output layer adds its delta on the shared weight
    # too (next to its own adapter); pipeline size 1 only (refused above that)
    "tied-embedding": (dict(untie_embeddings_and_output_weights=False), {
        1: [("tied-embedding-tp1", 1, 1, False, {})],
        2: [("tied-embedding-tp2-sp", 2, 1, True, {})],
        4: [("tied-embedding-tp4", 4, 1, False, {})],
    }),
    # 4 experts, top-2, the alltoall dispatcher (split sizes, uneven expert-TP gathers). Its
    # TP + SP + EP layouts are run by "moe-shared" below: the same layouts, on the same model
    # plus shared experts, with more adapted layers.
    "alltoall": (dict(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall"), {
        1: [("alltoall-ep1", 1, 1, False, {})],
        2: [("alltoall-ep2", 1, 1, False, dict(expert_model_parallel_size=2))],
    }),
    # shared experts (TP-split like a dense MLP, outside the expert dispatch) next to routed
    # ones (with Qwen2-MoE's sigmoid gate on the shared expert), with LoRA on the router and the
    # word embeddings as well
    "moe-shared": (dict(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                        moe_shared_expert_intermediate_size=64, moe_shared_expert_gate=True), {
        1: [("moe-shared-ep1", 1, 1, False, {})],
        2: [("moe-shared-tp2-sp-ep2", 2, 1, True,
             dict(expert_model_parallel_size=2, expert_tensor_parallel_size=1)),
            ("moe-shared-overlap-tp2-sp", 2, 1, True, dict(moe_shared_expert_overlap=True))],
        4: [("moe-shared-tp2-sp-ep2-etp2", 2, 1, True, dict(expert_model_parallel_size=2)),
            ("moe-shared-tp4-sp", 4, 1, True, {})],
    }),
    # DeepSeek-style multi-latent attention (local spec): TP=1 only (TP > 1 is refused)
    "mla": (dict(multi_latent_attention=True, q_lora_rank=32, kv_lora_rank=16, qk_head_dim=8,
                 qk_pos_emb_head_dim=8, v_head_dim=8, rope_type="rope"), {
        1: [("mla-tp1", 1, 1, False, {})],
    }),
    # MLA without a query down-projection (q_lora_rank unset: one linear_q_proj)
    "mla-q-proj": (dict(multi_latent_attention=True, q_lora_rank=None, kv_lora_rank=16,
                        qk_head_dim=8, qk_pos_emb_head_dim=8, v_head_dim=8, rope_type="rope"), {
        1: [("mla-q-proj-tp1", 1, 1, False, {})],
    }),
}
MLA_TARGETS = ["linear_q_proj", "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj",
               "linear_kv_up_proj", "linear_proj", "linear_fc1", "linear_fc2"]
# variants whose adapter targets more than TARGETS
VARIANT_TARGETS = {"moe-shared": TARGETS + ["router", "word_embeddings"],
                   "tied-embedding": TARGETS + ["word_embeddings"],
                   "mla": MLA_TARGETS[1:], "mla-q-proj": [MLA_TARGETS[0]] + MLA_TARGETS[3:]}
# variant layouts also trained for TRAIN_STEPS steps: the parallel ones' curves must match
# their world-1 run (one MoE layout with every kind of parallelism at once, to keep CI short)
TRAINED_LAYOUTS = ("moe-shared-ep1", "moe-shared-tp2-sp-ep2-etp2", "mla-tp1")
# (world, variant) -> (TP, PP, SP, targets) where apply_lora must refuse (not proven exact there)
REFUSED_VARIANTS = {
    (2, "mla"): (2, 1, True, VARIANT_TARGETS["mla"]),
    (2, "tied"): (1, 2, False, TARGETS + ["word_embeddings"]),
}

def experiment(tp, pp, sp, **overrides):
    from megatron_lora.experiment import load_experiment

    settings = dict(TINY_GPT, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                    sequence_parallel=sp, **overrides)
    return load_experiment(data={"megatron_config": settings, "lora": {"target_modules": TARGETS}})


def build(exp, lora=None, adapter="default"):
    from megatron_lora import apply_lora
    from megatron_lora.gpt import build_gpt_model, initialize_model_parallel

    initialize_model_parallel(exp)
    model = build_gpt_model(exp)
    if lora is not None:
        apply_lora(model, lora, adapter, verbose=False)
    return model


def random_lora(seed=3, **kwargs):
    """Both factors random, so every gradient and every delta is non-zero."""
    from megatron_lora import LoraConfig

    return LoraConfig(r=4, lora_alpha=8.0, init_lora_weights=False, seed=seed,
                      target_modules=kwargs.pop("target_modules", TARGETS), **kwargs)


def batches(step, count=MICRO_BATCHES):
    """The same token batches on every rank: [mbs, seq + 1] each (inputs and shifted labels)."""
    generator = torch.Generator().manual_seed(1000 + step)
    vocab, seq = TINY_GPT["vocab_size"], TINY_GPT["seq_length"]
    return [torch.randint(0, vocab, (MICRO_BATCH_SIZE, seq + 1), generator=generator)
            for _ in range(count)]


def _forward_step(data_iterator, model):
    from megatron_lora.gpt import gpt_forward_inputs

    batch = next(data_iterator)
    tokens, labels = batch[:, :-1], batch[:, 1:]
    position_ids, mask = gpt_forward_inputs(tokens)
    per_token_loss = model(tokens, position_ids, mask, labels=labels)

    def loss_func(losses):
        loss = losses.float().mean()
        return loss, {"loss": loss.detach()}

    return per_token_loss, loss_func


def run_schedule(model, micro_batches, forward_only=False):
    """megatron-core's forward-backward schedule (1F1B under PP); the mean loss on the last
    pipeline stage, None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_lora.cpu import cuda_arguments_to_cpu

    with cuda_arguments_to_cpu():  # the schedules name CUDA explicitly (docs/cpu.md)
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iter(micro_batches), model=[model],
            num_microbatches=len(micro_batches), seq_length=TINY_GPT["seq_length"],
            micro_batch_size=MICRO_BATCH_SIZE, forward_only=forward_only)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return sum(item["loss"].item() for item in losses)  # each is already divided by the count


def logits_of(model, tokens):
    """Full-vocabulary logits; under PP through the schedule, and None off the last stage."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_lora.cpu import cuda_arguments_to_cpu
    from megatron_lora.gpt import gathered_logits, gpt_forward_inputs

    position_ids, mask = gpt_forward_inputs(tokens)
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        with torch.no_grad():
            return gathered_logits(model(tokens, position_ids, mask)).detach().clone()

    def forward_step(data_iterator, model):
        return model(next(data_iterator), position_ids, mask), None  # no loss: keep the output

    with torch.no_grad(), cuda_arguments_to_cpu():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model],
            num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
            forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return gathered_logits(outputs[0]).detach().clone()


def full_factors(model, grads=False):
    """{global name: (A, B)} in the canonical layout, this rank's modules (collective per TP)."""
    from megatron_lora.model import lora_layers

    return {name: layer.full_factors("default", grads=grads) for name, layer in lora_layers(model)}


def zero_lora_grads(model):
    for param in model.parameters():
        param.grad = None


# --- sections --------------------------------------------------------------------------------


def check_parity(exp, all_logits=False, count_collectives=True, targets=TARGETS):
    """Logits, loss, every LoRA gradient and the grad norm of one step; collectives counted.

    Logits under PP only with ``all_logits`` (through the schedule). Every rank sees the same
    batches, so data-parallel replicas (expert parallelism at TP x PP < world) average to the
    single-process gradients.
    """
    from megatron_lora import finalize_lora_grads, lora_grad_norm
    from megatron_lora.grad_sync import average_over_data_parallel

    model = build(exp, random_lora(target_modules=targets))
    report = model.lora_report
    result = {
        "factors": full_factors(model),
        "report": (report.global_adapted, report.global_trainable, report.global_total),
    }
    if exp.pipeline_model_parallel_size == 1 or all_logits:
        result["logits"] = logits_of(model, batches(0)[0][:, :-1])
    result["loss"] = run_schedule(model, batches(0))
    finalize_lora_grads(model)
    average_over_data_parallel([p for p in model.parameters() if p.requires_grad])
    result["grads"] = full_factors(model, grads=True)
    result["grad_norm"] = lora_grad_norm(model)
    if exp.pipeline_model_parallel_size == 1 and count_collectives:
        result["collectives"] = count_step_collectives(model)
    return result


def tied_weights(exp):
    """The full word embeddings on the first stage and the output layer's tied copy on the
    last (None where a stage has neither; gathered over TP)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model = build(exp)
    full = lambda weight: gather_from_tensor_model_parallel_region(  # noqa: E731
        weight.detach().t().contiguous()).t().contiguous()  # vocab rows are the TP shards
    out = {"embedding": None, "output_copy": None}
    if parallel_state.is_pipeline_first_stage():
        out["embedding"] = full(model.embedding.word_embeddings.weight)
    if parallel_state.is_pipeline_last_stage() and not parallel_state.is_pipeline_first_stage():
        out["output_copy"] = full(model.output_layer.weight)
        out["output_copy_marked_shared"] = getattr(model.output_layer.weight, "shared", False)
    return out


def tied_embedding_merge(exp):
    """An adapter on tied word embeddings: logits unmerged, merged into the shared weight (the
    output layer reads the merged table), and unmerged again. (The output layer's own adapter
    has no weight of its own to merge into, so it is left out here.)"""
    from megatron_lora import disable_adapters, merge_adapter, unmerge_adapter

    model = build(exp, random_lora(target_modules=["linear_qkv", "word_embeddings"]))
    tokens = batches(0)[0][:, :-1]
    out = {"unmerged": logits_of(model, tokens)}
    with disable_adapters(model):
        out["base"] = logits_of(model, tokens)
    merge_adapter(model)
    out["merged"] = logits_of(model, tokens)
    unmerge_adapter(model)
    out["unmerged_again"] = logits_of(model, tokens)
    return out


def tied_checkpoints(exp, directory):
    """An adapter saved and loaded at this layout, and a megatron dist-checkpoint of base +
    adapter (the last stage's copy keyed as the embedding) loaded into a model built from
    another seed: the logits each time. The adapter file is compared across layouts."""
    from megatron.core import dist_checkpointing

    from megatron_lora.checkpoint import load_adapter, save_adapter

    tokens = batches(0)[0][:, :-1]
    model = build(exp, random_lora())
    out = {"logits": logits_of(model, tokens)}
    save_adapter(model, directory / "adapter")
    if torch.distributed.get_rank() == 0:
        (directory / "model").mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(directory / "model"))

    fresh = build(exp)
    load_adapter(fresh, directory / "adapter")
    out["adapter_logits"] = logits_of(fresh, tokens)
    other = build(experiment(exp.tensor_model_parallel_size, exp.pipeline_model_parallel_size,
                             exp.sequence_parallel, untie_embeddings_and_output_weights=False,
                             seed=99), random_lora(seed=5))
    other.load_state_dict(dist_checkpointing.load(other.sharded_state_dict(),
                                                  str(directory / "model")))
    out["dist_checkpoint_logits"] = logits_of(other, tokens)
    return out


@dataclass
class VariantChecks:
    """What run_variants checked at one variant layout, on one rank."""

    parity: dict
    training: Optional[dict] = None  # TRAINED_LAYOUTS: check_training's curve
    refusal: Optional[str] = None  # REFUSED_VARIANTS: apply_lora's message
    tied_weights: Optional[dict] = None  # the tied-embedding variant
    checkpoints: Optional[dict] = None  # tied / MOE_CHECKPOINT_PAIRS, with an adapter directory
    hf: Optional[dict] = None  # HF_MOE_LAYOUTS, with an adapter directory: Hugging Face names


def _refusal(exp, targets):
    from megatron_lora import AdapterError

    try:
        build(exp, random_lora(target_modules=targets))
    except AdapterError as error:
        return str(error)
    return None


def run_variants(world, adapter_dir=None) -> Dict[str, VariantChecks]:
    """Every variant layout of this world size, by layout id."""
    from pathlib import Path

    import checkpoint_checks

    results = {}
    for (refused_world, name), (tp, pp, sp, targets) in REFUSED_VARIANTS.items():
        if refused_world == world:
            results[f"{name}-refused"] = VariantChecks(parity={}, refusal=_refusal(
                experiment(tp, pp, sp, **VARIANTS[name][0]), targets))
    for name, (model_settings, layouts) in VARIANTS.items():
        for layout_id, tp, pp, sp, layout_settings in layouts.get(world, []):
            exp = experiment(tp, pp, sp, **model_settings, **layout_settings)
            targets = VARIANT_TARGETS.get(name, TARGETS)
            layout = VariantChecks(parity=check_parity(exp, all_logits=True, count_collectives=False,
                                                       targets=targets))
            if layout_id in TRAINED_LAYOUTS:
                layout.training = check_training(exp, targets)
            if name == "tied-embedding":
                layout.tied_weights = tied_embedding_merge(exp)
            if name == "tied":
                layout.tied_weights = tied_weights(exp)
                if adapter_dir is not None:
                    layout.checkpoints = tied_checkpoints(exp, Path(adapter_dir) / layout_id)
            if adapter_dir is not None and layout_id in checkpoint_checks.HF_MOE_LAYOUTS:
                layout.hf = checkpoint_checks.hf_moe_checks(
                    exp, Path(adapter_dir) / layout_id, checkpoint_checks.HF_MOE_LAYOUTS[layout_id])
            if adapter_dir is not None and layout_id in checkpoint_checks.MOE_CHECKPOINT_PAIRS:
                layout.checkpoints = checkpoint_checks.moe_checkpoint_checks(
                    exp, Path(adapter_dir) / checkpoint_checks.MOE_CHECKPOINT_PAIRS[layout_id])
            results[layout_id] = layout
    return results


def count_step_collectives(model):
    """(base, LoRA) collectives of one forward + backward (+ the LoRA grad sync).

    The base step is the same model with adapters disabled, back-propagating to the
    embedding output as a frozen base inside a LoRA run does.
    """
    from megatron_lora import disable_adapters, finalize_lora_grads

    hook = model.embedding.register_forward_hook(lambda module, args, out: out.requires_grad_())
    counts = []
    try:
        for use_lora in (False, True):
            zero_lora_grads(model)
            counter = CollectiveCounter()
            context = disable_adapters(model) if not use_lora else torch.enable_grad()
            with counter, context:
                run_schedule(model, batches(0)[:1])
                if use_lora:
                    finalize_lora_grads(model)
            counts.append(len(counter.calls))
    finally:
        hook.remove()
    return tuple(counts)


def check_training(exp, targets=TARGETS):
    """TRAIN_STEPS Adam steps on LoRA parameters only, clipped; the loss and norm per step.

    Every step sees the same batches, so the loss must fall.
    """
    from megatron_lora import LoraConfig, clip_lora_grads_, finalize_lora_grads
    from megatron_lora.grad_sync import average_over_data_parallel

    lora = LoraConfig(r=4, lora_alpha=16.0, seed=7, target_modules=targets)  # B = 0 at start
    model = build(exp, lora)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    losses, norms, clipped = [], [], 0
    for step in range(TRAIN_STEPS):
        zero_lora_grads(model)
        losses.append(run_schedule(model, batches(0)))
        finalize_lora_grads(model)
        # replicas (expert parallelism at TP x PP < world) saw the same batches: average them
        average_over_data_parallel([p for p in model.parameters() if p.requires_grad])
        norm = clip_lora_grads_(model, CLIP_NORM)
        norms.append(norm)
        clipped += norm > CLIP_NORM
        optimizer.step()
    base_after = dict(model.named_parameters())
    unchanged = all(torch.equal(before, base_after[n]) for n, before in base_before.items())
    return {"losses": losses, "norms": norms, "clipped_steps": clipped,
            "factors": full_factors(model), "base_unchanged": unchanged}


# Activation recompute (docs/recompute.md): each case is compared with the same layout and
# adapter without recompute. id -> (megatron_config settings, LoRA variant). "all" layers
# means every layer of a pipeline stage.
RECOMPUTE_CASES = {
    "full-uniform-1": (dict(recompute_granularity="full", recompute_method="uniform",
                            recompute_num_layers=1), "plain"),
    "full-uniform-2": (dict(recompute_granularity="full", recompute_method="uniform",
                            recompute_num_layers=2), "plain"),
    "full-block-1": (dict(recompute_granularity="full", recompute_method="block",
                          recompute_num_layers=1), "plain"),
    "full-block-all": (dict(recompute_granularity="full", recompute_method="block",
                            recompute_num_layers="all"), "plain"),
    # the model: nothing after the decoder trains, so without the fix the loss had no
    # grad_fn (loss.backward() raises; megatron's schedule silently left every grad None)
    "full-uniform-1-four-linears": (dict(recompute_granularity="full", recompute_method="uniform",
                                         recompute_num_layers=1), "four-linears"),
    "selective": (dict(recompute_granularity="selective"), "plain"),
    # the MLP recomputed too; no attention has an adapter, so without the fix no recomputed
    # MLP's input required grad
    "selective-mlp": (dict(recompute_granularity="selective",
                           recompute_modules=["core_attn", "mlp"]), "mlp-only"),
    "selective-moe": (dict(recompute_granularity="selective", recompute_modules=["moe"]),
                      "plain"),
    "full-uniform-1-dropout": (dict(recompute_granularity="full", recompute_method="uniform",
                                    recompute_num_layers=1), "dropout"),
    "full-block-1-dropout": (dict(recompute_granularity="full", recompute_method="block",
                                  recompute_num_layers=1), "dropout"),
    "selective-dropout": (dict(recompute_granularity="selective"), "dropout"),
    "full-uniform-1-distributed": (dict(recompute_granularity="full", recompute_method="uniform",
                                        recompute_num_layers=1,
                                        distribute_saved_activations=True), "plain"),
}
RECOMPUTE_LORA = {"plain": {}, "dropout": dict(lora_dropout=0.1),
                  "mlp-only": dict(target_modules=["linear_fc1", "linear_fc2"]),
                  "four-linears": dict(target_modules=TARGETS[:4])}
# layout id -> (world, (TP, PP, SP), model settings, cases); each case's reference is its
# layout without recompute. distribute_saved_activations splits over TP, which megatron
# refuses with SP; the MoE layout has 4 experts split over 2 ranks (alltoall dispatcher).
_ALLTOALL_EP2 = dict(VARIANTS["alltoall"][0], expert_model_parallel_size=2)
RECOMPUTE_LAYOUTS = {
    "tp1": (1, (1, 1, False), {}, [c for c in RECOMPUTE_CASES if "distributed" not in c
                                   and "moe" not in c]),
    "tp2-sp": (2, (2, 1, True), {}, [c for c in RECOMPUTE_CASES if "distributed" not in c
                                     and "moe" not in c]),
    "tp2": (2, (2, 1, False), {}, ["full-uniform-1-distributed"]),
    "pp2": (2, (1, 2, False), {}, ["full-block-1", "full-uniform-1-dropout"]),
    "alltoall-ep2": (2, (1, 1, False), _ALLTOALL_EP2, ["full-uniform-1", "selective-moe"]),
}
RECOMPUTE_TRAINING_CASE = "full-uniform-1"


def _recompute_settings(case, pp):
    settings = dict(RECOMPUTE_CASES[case][0])
    if settings.get("recompute_num_layers") == "all":
        settings["recompute_num_layers"] = TINY_GPT["num_layers"] // pp
    return settings


def _recompute_step(exp, lora_variant):
    """One schedule step: loss, logits (PP=1, no dropout), every LoRA gradient, and the
    trainable parameters whose .grad is None after backward (their names)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_lora import finalize_lora_grads

    model = build(exp, random_lora(**RECOMPUTE_LORA[lora_variant]))
    torch.manual_seed(42)  # the same dropout streams in every run
    model_parallel_cuda_manual_seed(exp.seed)
    out = {}
    if exp.pipeline_model_parallel_size == 1 and lora_variant != "dropout":
        out["logits"] = logits_of(model, batches(0)[0][:, :-1])
    out["loss"] = run_schedule(model, batches(0))
    out["no_grad"] = sorted(n for n, p in model.named_parameters()
                            if p.requires_grad and p.grad is None)
    out["trainable"] = sum(p.requires_grad for p in model.parameters())
    if not out["no_grad"]:
        finalize_lora_grads(model)
        out["grads"] = full_factors(model, grads=True)
    return out


def check_recompute(layout_id):
    """{"reference": {variant: step}, "cases": {case: step}, "training": ...} at one layout."""
    _, (tp, pp, sp), settings, cases = RECOMPUTE_LAYOUTS[layout_id]
    variants = sorted({RECOMPUTE_CASES[case][1] for case in cases})
    out = {"reference": {v: _recompute_step(experiment(tp, pp, sp, **settings), v)
                         for v in variants},
           "cases": {case: _recompute_step(
               experiment(tp, pp, sp, **settings, **_recompute_settings(case, pp)),
               RECOMPUTE_CASES[case][1]) for case in cases}}
    if RECOMPUTE_TRAINING_CASE in cases and not settings:
        out["training"] = check_training(
            experiment(tp, pp, sp, **_recompute_settings(RECOMPUTE_TRAINING_CASE, pp)))
    return out


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of floating-point numbers at |x| in x's dtype."""
    mantissa_bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}
    _, exponent = torch.frexp(x.double().abs().clamp_min(torch.finfo(x.dtype).tiny))
    return torch.pow(2.0, (exponent - 1 - mantissa_bits[x.dtype]).double())


def _unmerge_fidelity(model, merged_weights, originals):
    """How well unmerge restored the base weights.

    exact_fraction: elements restored bit for bit; exact_where_kept: the same among elements
    whose merged value kept every bit of the original (|w_merged| not in a higher binade than
    |w|, so the rounding lost nothing); max_ulps: the worst error in ulps of max(|w|, |w_merged|).
    """
    exact = total = kept_exact = kept = 0
    worst = 0.0
    for name, param in model.named_parameters():
        if name not in originals:
            continue
        original, merged = originals[name], merged_weights[name]
        same = torch.eq(param, original)
        bits_kept = _ulp(merged) <= _ulp(original)
        exact += same.sum().item()
        total += param.numel()
        kept_exact += (same & bits_kept).sum().item()
        kept += bits_kept.sum().item()
        scale = torch.maximum(_ulp(original), _ulp(merged))
        worst = max(worst, ((param.double() - original.double()).abs() / scale).max().item())
    return {"exact_fraction": exact / max(1, total), "exact_where_kept": kept_exact / max(1, kept),
            "kept_fraction": kept / max(1, total), "max_ulps": worst}


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if n.endswith("base_layer.weight")}


def check_merge(exp):
    """Disable, merge, unmerge, several adapters, delete, merge_and_unload (PP=1 layouts)."""
    from megatron_lora import (LoraParallelLinear, adapter_names, apply_lora, delete_adapter,
                               disable_adapters, merge_adapter, merge_and_unload, set_adapter,
                               unmerge_adapter)

    tokens = batches(0)[0][:, :-1]
    model = build(exp)
    base_keys = sorted(model.state_dict().keys())
    out = {"base": logits_of(model, tokens)}
    apply_lora(model, random_lora(), verbose=False)
    out["lora"] = logits_of(model, tokens)
    with disable_adapters(model):
        out["disabled"] = logits_of(model, tokens)
    out["after_disable"] = logits_of(model, tokens)

    originals = _base_weights(model)
    merge_adapter(model)
    out["merged"] = logits_of(model, tokens)
    merged_weights = _base_weights(model)
    out["merge_changed_weights"] = any(
        not torch.equal(merged_weights[n], originals[n]) for n in originals)
    unmerge_adapter(model)
    out["unmerged"] = logits_of(model, tokens)
    out["unmerge"] = _unmerge_fidelity(model, merged_weights, originals)

    apply_lora(model, random_lora(seed=5, target_modules=["linear_qkv", "mlp.linear_fc1"]),
               "second", verbose=False)
    out["only_second"] = logits_of(model, tokens)
    set_adapter(model, ["default", "second"])
    out["both"] = logits_of(model, tokens)
    merge_adapter(model)
    out["both_merged"] = logits_of(model, tokens)
    unmerge_adapter(model)
    delete_adapter(model, "second")
    out["names_after_delete"] = adapter_names(model)
    set_adapter(model, "default")
    out["after_delete"] = logits_of(model, tokens)

    merge_and_unload(model)
    out["unloaded"] = logits_of(model, tokens)
    out["wrappers_left"] = sum(isinstance(m, LoraParallelLinear) for m in model.modules())
    out["keys_restored"] = sorted(model.state_dict().keys()) == base_keys
    return out


def check_merge_bf16(exp):
    """A float32 adapter merged into a bfloat16 base: the base stays bfloat16; unmerge bound."""
    from megatron_lora import merge_adapter, unmerge_adapter

    model = build(exp, random_lora(lora_dtype="float32"))
    originals = _base_weights(model)
    merge_adapter(model)
    merged = _base_weights(model)
    dtypes = {str(w.dtype) for w in merged.values()}
    unmerge_adapter(model)
    return {"dtypes": dtypes, "unmerge": _unmerge_fidelity(model, merged, originals)}


def _error_of(call):
    try:
        call()
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def check_targeting(exp):
    """Which modules each kind of target selects, and the errors (model left untouched)."""
    from megatron_lora import (LoraParallelLinear, apply_lora, delete_adapter, disable_adapters,
                               merge_adapter, set_adapter)
    from megatron_lora.model import lora_layers

    def adapted(**lora_kwargs):
        model = build(exp)
        apply_lora(model, random_lora(**lora_kwargs), verbose=False)
        return sorted(name for name, _ in lora_layers(model)), model.lora_report.global_adapted

    out = {
        "leaf": adapted(target_modules=["linear_fc1"]),
        "suffix": adapted(target_modules=["self_attention.linear_proj"]),
        "glob": adapted(target_modules=["decoder.layers.*.mlp.linear_fc1"]),
        "glob_layers": adapted(target_modules=["decoder.layers.[01].*"]),
        "regex": adapted(target_modules=[r"re:decoder\.layers\.[23]\.self_attention\..*"]),
        "exclude": adapted(target_modules=TARGETS, exclude_modules=["decoder.layers.0.*"]),
        "output_layer": adapted(target_modules=["output_layer"]),
        "first_layer_only": adapted(target_modules=["decoder.layers.0.mlp.linear_fc1"]),
    }
    model = build(exp)
    out["no_match"] = _error_of(
        lambda: apply_lora(model, random_lora(target_modules=["linear_fc1", "linear_fc3"])))
    out["untouched_after_error"] = not any(isinstance(m, LoraParallelLinear) for m in model.modules())
    apply_lora(model, random_lora(), verbose=False)
    out["duplicate"] = _error_of(lambda: apply_lora(model, random_lora(), verbose=False))
    # a name clash that only the first pipeline stage sees is refused on every stage too,
    # so no stage walks alone into the next collective
    first_layer = random_lora(target_modules=["decoder.layers.0.mlp.linear_fc1"])
    apply_lora(model, first_layer, "first_layer", verbose=False)
    out["duplicate_on_one_stage"] = _error_of(
        lambda: apply_lora(model, first_layer, "first_layer", verbose=False))
    set_adapter(model, "default")
    out["unknown_set"] = _error_of(lambda: set_adapter(model, "nope"))
    out["unknown_delete"] = _error_of(lambda: delete_adapter(model, "nope"))
    out["not_a_config"] = _error_of(lambda: apply_lora(model, {"r": 4}))
    merge_adapter(model)

    def enter_disabled():
        with disable_adapters(model):
            pass

    out["disable_merged"] = _error_of(enter_disabled)
    out["delete_merged"] = _error_of(lambda: delete_adapter(model, "default"))
    return out


def check_megatron_lm_provider(exp):
    """A Megatron-LM-style model_provider wrapped by lora_model_provider, flags from
    add_lora_args (Megatron-LM's get_args is the injected argument store)."""
    from argparse import ArgumentParser

    from megatron_lora.arguments import add_lora_args, lora_model_provider
    from megatron_lora.gpt import build_gpt_model, initialize_model_parallel
    from megatron_lora.model import lora_layers

    flags = add_lora_args(ArgumentParser()).parse_args(
        ["--lora-rank", "4", "--lora-target-modules", "linear_fc1", "linear_fc2"])

    def model_provider(pre_process=True, post_process=True):
        return build_gpt_model(exp)

    initialize_model_parallel(exp)
    model = lora_model_provider(model_provider, get_args=lambda: flags)(True, True)
    layers = dict(lora_layers(model))
    return {"names": sorted(layers), "ranks": {layer.lora_configs["default"].r
                                               for layer in layers.values()},
            "trainable": sorted({n.rsplit(".", 3)[-3] for n, p in model.named_parameters()
                                 if p.requires_grad})}


@dataclass
class LayoutChecks:
    """What run_all checked at one layout, on one rank; a check not run there is None."""

    parity: dict
    training: dict
    merge: Optional[dict] = None  # PP=1 layouts with TP=1 or SP
    merge_bf16: Optional[dict] = None
    targeting: Optional[dict] = None  # TP=1 layouts
    megatron_lm_provider: Optional[dict] = None  # world 1
    load: Optional[dict] = None  # with the adapters save_and_break wrote


@dataclass
class GptChecks:
    """run_all's result on one rank: every layout of its world size and the model variants."""

    layouts: Dict[Tuple[int, int, bool], LayoutChecks]
    variants: dict
    recompute: dict
    moe: Optional[dict] = None  # worlds 1 and 4: expert adapters saved at EP=2, loaded


def run_all(rank, world, adapter_dir=None) -> GptChecks:
    """Every layout of this world size. With ``adapter_dir`` (written by
    checkpoint_checks.save_and_break at TP=2 + SP) each layout also loads those adapters."""
    import checkpoint_checks

    torch.manual_seed(0)
    layouts = {}
    for tp, pp, sp in LAYOUTS[world]:
        exp = experiment(tp, pp, sp)
        layout = LayoutChecks(parity=check_parity(exp), training=check_training(exp))
        if pp == 1 and (tp == 1 or sp):
            layout.merge = check_merge(exp)
            layout.merge_bf16 = check_merge_bf16(experiment(tp, pp, sp, params_dtype="bfloat16"))
        if tp == 1:
            layout.targeting = check_targeting(exp)
        if world == 1:
            layout.megatron_lm_provider = check_megatron_lm_provider(exp)
        if adapter_dir is not None:
            layout.load = checkpoint_checks.load_checks(exp, adapter_dir)
        layouts[(tp, pp, sp)] = layout
    results = GptChecks(
        layouts=layouts,
        variants=run_variants(world, adapter_dir),
        recompute={layout_id: check_recompute(layout_id)
                   for layout_id, entry in RECOMPUTE_LAYOUTS.items() if entry[0] == world},
    )
    if adapter_dir is not None and world in (1, 4):  # expert adapters saved at EP=2
        from pathlib import Path

        results.moe = checkpoint_checks.moe_check(world, Path(adapter_dir) / "moe", save=False)
    return results
