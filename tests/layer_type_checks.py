"""Embedding and router LoRA inside spawned gloo process groups, against one-process references.

Run from mp_checks.run_all (one spawn per TP size). Each check builds the real megatron-core
layer at TP = world size from seeded full weights, wraps it with dispatch_megatron, and
compares output, input gradient and every LoRA gradient (after the one grad sync) with plain
torch on the full tensors. Collectives of one step are counted against the frozen base.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from megatron_lora.diagnostics import CollectiveCounter
from mp_checks import (BATCH, DTYPES, HIDDEN, RANK, SEQ, error_absolute_below_one, leaf,
                       logical_factors, model_parallel_config)

VOCAB, EXPERTS, TOPK = 32, 8, 2


def _lora(seed=11, **kwargs):
    from megatron_lora import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=7.0, init_lora_weights=False, seed=seed, **kwargs)


def _sequence_shard(tensor, rank, world, sp):
    """This rank's part of a [s, b, ...] tensor: its sequence chunk under SP, else all."""
    return tensor.chunk(world, 0)[rank] if sp else tensor


# --- embedding -------------------------------------------------------------------------------


def build_embedding(world, rank, sp, dtype, fused=True, name="embedding.word_embeddings"):
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    from megatron_lora import dispatch_megatron

    config = model_parallel_config(world, sp, dtype)
    base = VocabParallelEmbedding(VOCAB, HIDDEN, init_method=torch.nn.init.zeros_,
                                  reduce_scatter_embeddings=sp, config=config)
    generator = torch.Generator().manual_seed(31)
    full_w = torch.randn(VOCAB, HIDDEN, generator=generator, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        base.weight.copy_(full_w.chunk(world, 0)[rank])
    base.weight.requires_grad_(False)
    layer = dispatch_megatron(base, "default", _lora(), module_name=name, fused_collectives=fused)
    return layer, full_w


def _tokens():
    generator = torch.Generator().manual_seed(32)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)


def _embedding_output_layout(tensor_bsh, rank, world, sp):
    """The base's output layout: [b, s, h] without SP, this rank's [s/t, b, h] with it."""
    return _sequence_shard(tensor_bsh.transpose(0, 1), rank, world, sp) if sp else tensor_bsh


def embedding_parity(rank, world, group):
    """Output and both LoRA gradients at TP = world, SP on/off, fast and fallback paths;
    merge/unmerge; collectives against the frozen base."""
    from megatron_lora import finalize_lora_grads

    results = {}
    sps = (False, True) if world > 1 else (False,)
    for dtype_name, sp, path in itertools.product(DTYPES, sps, ("fast", "fallback")):
        dtype = DTYPES[dtype_name]
        layer, full_w = build_embedding(world, rank, sp, dtype, fused=path == "fast")
        lora = layer.lora_configs["default"]
        full_a, full_b = logical_factors(lora, "embedding.word_embeddings", VOCAB, HIDDEN, dtype)
        tokens = _tokens()
        dy = torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(33),
                         dtype=torch.float64).to(dtype)
        ra, rb = leaf(full_a), leaf(full_b)
        ref = full_w[tokens] + lora.scaling * F.linear(ra.t()[tokens], rb)
        ref.backward(dy)
        local = lambda t: _embedding_output_layout(t, rank, world, sp)  # noqa: E731
        out = layer(tokens)
        out.backward(local(dy))
        finalize_lora_grads([layer])
        vocab_part = slice(rank * VOCAB // world, (rank + 1) * VOCAB // world)
        results[f"{dtype_name}-{'sp' if sp else 'nosp'}-{path}"] = {
            "out": error_absolute_below_one(out, local(ref.detach())),
            "dA": error_absolute_below_one(layer.lora_A["default"].weight.grad,
                                           ra.grad[:, vocab_part]),
            "dB": error_absolute_below_one(layer.lora_B["default"].weight.grad, rb.grad),
            "A_is_vocab_shard": tuple(layer.lora_A["default"].weight.shape) == (RANK, VOCAB // world),
        }
    return results


def embedding_merge_and_collectives(rank, world, group):
    from megatron_lora import finalize_lora_grads

    out = {}
    sps = (False, True) if world > 1 else (False,)
    for sp in sps:
        layer, _ = build_embedding(world, rank, sp, torch.float64)
        tokens = _tokens()
        with torch.no_grad():
            adapted = layer(tokens)
            weight_before = layer.base_layer.weight.clone()
            layer.merge()
            merged = layer(tokens)  # the merged adapter no longer adds its delta
            layer.unmerge()
            restored = layer.base_layer.weight.clone()
        key = "sp" if sp else "nosp"
        out[f"merge-{key}"] = error_absolute_below_one(merged, adapted)
        out[f"unmerge-{key}"] = error_absolute_below_one(restored, weight_before)
        calls = {}
        base_weight = layer.base_layer.weight
        for label, fn in (("base", layer.base_layer), ("lora", layer)):
            # the frozen base alone has nothing to back-propagate: count it as trainable, so
            # both steps run the same backward collective (the reduce's adjoint)
            base_weight.requires_grad_(label == "base")
            with CollectiveCounter() as counter:
                fn(tokens).sum().backward()
            calls[label] = len(counter.calls)
        base_weight.requires_grad_(False)
        with CollectiveCounter() as counter:
            finalize_lora_grads([layer])
        calls["grad_sync"] = len(counter.calls)
        out[f"collectives-{key}"] = calls
    return out


# --- router ----------------------------------------------------------------------------------


def build_router(world, rank, sp, dtype, lora=None):
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_lora import dispatch_megatron

    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_moe_experts=EXPERTS,
        moe_router_topk=TOPK, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        tensor_model_parallel_size=world, sequence_parallel=sp, use_cpu_initialization=True,
        params_dtype=dtype, add_bias_linear=False)
    base = TopKRouter(config=config, pg_collection=_groups())
    generator = torch.Generator().manual_seed(41)
    full_w = torch.randn(EXPERTS, HIDDEN, generator=generator, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        base.weight.copy_(full_w)
    base.weight.requires_grad_(False)
    layer = dispatch_megatron(base, "default", lora or _lora(), module_name="mlp.router")
    return layer, base, full_w


def router_parity(rank, world, group):
    """probs (top-k of the adapted logits) and both LoRA gradients at TP = world, SP on/off.

    The reference is a TopKRouter at TP=1 semantics whose weight is the merged W + s·B A,
    built from leaf A and B, on the full sequence: its probs and the gradients autograd
    gives A and B through megatron's own gating function.
    """
    from megatron_lora import finalize_lora_grads

    results = {}
    sps = (False, True) if world > 1 else (False,)
    for dtype_name, sp in itertools.product(DTYPES, sps):
        dtype = DTYPES[dtype_name]
        layer, base, full_w = build_router(world, rank, sp, dtype)
        lora = layer.lora_configs["default"]
        full_a, full_b = logical_factors(lora, "mlp.router", HIDDEN, EXPERTS, dtype)
        generator = torch.Generator().manual_seed(42)
        x = torch.randn(SEQ, BATCH, HIDDEN, generator=generator, dtype=torch.float64).to(dtype)
        dprobs = torch.randn(SEQ * BATCH, EXPERTS, generator=generator,
                             dtype=torch.float64).to(dtype)
        reference = _plain_router(dtype)
        ra, rb, rx = leaf(full_a), leaf(full_b), leaf(x)
        del reference.weight
        reference.weight = full_w + lora.scaling * rb @ ra
        ref_probs, ref_map = reference(rx)
        (ref_probs * dprobs).sum().backward()

        x_local = leaf(_sequence_shard(x, rank, world, sp))
        probs, routing_map = layer(x_local)
        rows = slice(rank * SEQ // world * BATCH, (rank + 1) * SEQ // world * BATCH) if sp \
            else slice(None)
        (probs * dprobs[rows]).sum().backward()
        finalize_lora_grads([layer])
        results[f"{dtype_name}-{'sp' if sp else 'nosp'}"] = {
            "probs": error_absolute_below_one(probs, ref_probs.detach()[rows]),
            "same_experts": bool(torch.equal(routing_map, ref_map[rows])),
            "dx": error_absolute_below_one(x_local.grad, _sequence_shard(rx.grad, rank, world, sp)),
            "dA": error_absolute_below_one(layer.lora_A["default"].weight.grad, ra.grad),
            "dB": error_absolute_below_one(layer.lora_B["default"].weight.grad, rb.grad),
        }
    return results


def _groups():
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return get_default_pg_collection()


def _plain_router(dtype):
    """A TopKRouter with the same settings, unwrapped and unsplit (its TP group is unused when
    no auxiliary loss is computed)."""
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_moe_experts=EXPERTS,
        moe_router_topk=TOPK, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        use_cpu_initialization=True, params_dtype=dtype, add_bias_linear=False)
    return TopKRouter(config=config, pg_collection=_groups())


def router_collectives(rank, world, group):
    """Collectives of one router step, base vs LoRA, and of the grad sync, SP on/off."""
    from megatron_lora import finalize_lora_grads

    out = {}
    for sp in ((False, True) if world > 1 else (False,)):
        layer, base, _ = build_router(world, rank, sp, torch.float32)
        x = torch.randn(SEQ // world if sp else SEQ, BATCH, HIDDEN)
        calls = {}
        for label, fn in (("base", base), ("lora", layer)):
            xin = leaf(x)
            with CollectiveCounter() as counter:
                probs, _ = fn(xin)
                probs.sum().backward()
            calls[label] = len(counter.calls)
        with CollectiveCounter() as counter:
            calls["grad_sync_returned"] = finalize_lora_grads([layer])
        calls["grad_sync"] = len(counter.calls)
        out["sp" if sp else "nosp"] = calls
    return out


def router_refuses_dropout(rank, world, group):
    from megatron_lora import AdapterError

    try:
        build_router(world, rank, False, torch.float32, lora=_lora(lora_dropout=0.1))
    except AdapterError as error:
        return str(error)
    return None


def run_all(rank, world, group) -> dict:
    return {
        "embedding": embedding_parity(rank, world, group),
        "embedding_merge": embedding_merge_and_collectives(rank, world, group),
        "router": router_parity(rank, world, group),
        "router_collectives": router_collectives(rank, world, group),
        "router_dropout": router_refuses_dropout(rank, world, group),
    }
