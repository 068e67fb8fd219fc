"""Checks that run inside spawned gloo process groups (one spawn per TP size, many checks each).

Every check builds real megatron-core layers at TP = world size, wraps them, and compares with
a single-process reference computed in plain torch from the same full (logical) weights. Only
numbers travel back to the pytest process; the assertions live in the test files.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_lora.diagnostics import CollectiveCounter
from numerics import relative_error
from shards import ExpectedShard

SEQ, BATCH, HIDDEN, FFN, RANK = 8, 2, 16, 24, 5  # r=5 divides no TP size on purpose
DTYPES = {"float64": torch.float64, "float32": torch.float32}


# --- set-up --------------------------------------------------------------------------------


def setup_parallel(world):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    model_parallel_cuda_manual_seed(1234)
    return parallel_state.get_tensor_model_parallel_group()


def model_parallel_config(world, sp, dtype):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=world,
        sequence_parallel=sp,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=dtype,
    )


def full_weights(seed, in_features, out_features, dtype):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    bias = torch.randn(out_features, generator=generator, dtype=torch.float64) * 0.1
    return (weight / math.sqrt(in_features)).to(dtype), bias.to(dtype)


def build_layer(kind, in_f, out_f, *, world, rank, sp, dtype, bias, skip, gather_output=False,
                input_is_parallel=True, seed=0, lora=None, name="layer", fused=True, trainable=False):
    """A megatron layer holding this rank's shard of seeded full weights, wrapped with LoRA."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_lora import LoraConfig, dispatch_megatron

    config = model_parallel_config(world, sp, dtype)
    full_w, full_b = full_weights(seed, in_f, out_f, dtype)
    if kind == "column":
        base = ColumnParallelLinear(in_f, out_f, config=config, init_method=None, bias=bias,
                                    gather_output=gather_output, skip_bias_add=skip)
    else:
        base = RowParallelLinear(in_f, out_f, config=config, init_method=None, bias=bias,
                                 input_is_parallel=input_is_parallel, skip_bias_add=skip)
    shard = ExpectedShard(kind, rank, world)
    local_w, local_b = shard.weight(full_w), shard.bias(full_b)
    with torch.no_grad():
        base.weight.copy_(local_w)
        if bias:
            base.bias.copy_(local_b)
    lora = lora or LoraConfig(r=RANK, lora_alpha=7.0, init_lora_weights=False, seed=11)
    wrapped = dispatch_megatron(base, "default", lora, module_name=name, fused_collectives=fused)
    if not trainable:
        for param in base.parameters():
            param.requires_grad_(False)
    return wrapped, full_w, (full_b if bias else None)


def logical_factors(lora, name, in_f, out_f, dtype, adapter="default"):
    from megatron_lora.init import full_lora_factors

    full_a, full_b = full_lora_factors(lora, name, adapter, in_f, out_f)
    return full_a.to(dtype), full_b.to(dtype)


def error_absolute_below_one(actual, expected):
    """The layer checks' error: relative to the largest value, absolute below 1."""
    return relative_error(actual, expected, scale_floor=1.0)


def ref_lora_linear(x, weight, bias, weight_a, weight_b, scaling, add_bias=True):
    out = x @ weight.t() + scaling * (x @ weight_a.t()) @ weight_b.t()
    if bias is not None and add_bias:
        out = out + bias
    return out


def with_bias(output_and_bias):
    output, bias = output_and_bias
    return output if bias is None else output + bias


def leaf(tensor):
    return tensor.detach().clone().requires_grad_(True)


def sum_over_tp_if(grad, needed, group):
    if needed and group.size() > 1:
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=group)
    return grad


# --- parity matrix ---------------------------------------------------------------------------


def parity_cases(world):
    cases = []
    sps = (False, True) if world > 1 else (False,)
    for dtype, path in itertools.product(DTYPES, ("fast", "fallback")):
        for sp, gather, bias, skip in itertools.product(sps, (False, True), (False, True), (False, True)):
            cases.append(dict(kind="column", sp=sp, gather_output=gather, bias=bias, skip=skip,
                              dtype=dtype, path=path))
        for sp, iip, bias, skip in itertools.product(sps, (True, False), (False, True), (False, True)):
            if sp and not iip:
                continue  # megatron: sequence_parallel needs input_is_parallel
            cases.append(dict(kind="row", sp=sp, input_is_parallel=iip, bias=bias, skip=skip,
                              dtype=dtype, path=path))
        for sp, bias, skip in itertools.product(sps, (False, True), (False, True)):
            cases.append(dict(kind="chain", sp=sp, bias=bias, skip=skip, dtype=dtype, path=path))
    # a trainable base (fast path computes its weight gradient itself, fallback lets megatron)
    for case in list(cases):
        if case["dtype"] == "float64":
            cases.append(dict(case, trainable=True))
    return cases


def case_id(case):
    parts = [case["kind"], "sp" if case["sp"] else "nosp"]
    if case["kind"] == "column":
        parts.append("gather" if case["gather_output"] else "nogather")
    if case["kind"] == "row":
        parts.append("iip" if case["input_is_parallel"] else "scatter")
    parts += ["bias" if case["bias"] else "nobias", "skip" if case["skip"] else "noskip",
              case["dtype"], case["path"]]
    if case.get("trainable"):
        parts.append("trainable")
    return "-".join(parts)


def run_single_layer_case(case, rank, world, group):
    from megatron_lora import finalize_lora_grads

    dtype = DTYPES[case["dtype"]]
    kind, sp = case["kind"], case["sp"]
    in_f, out_f = (HIDDEN, FFN) if kind == "column" else (FFN, HIDDEN)
    trainable = case.get("trainable", False)
    layer, full_w, full_b = build_layer(
        kind, in_f, out_f, world=world, rank=rank, sp=sp, dtype=dtype, bias=case["bias"],
        skip=case["skip"], gather_output=case.get("gather_output", False),
        input_is_parallel=case.get("input_is_parallel", True), seed=3, name="m." + kind,
        fused=case["path"] == "fast", trainable=trainable)
    lora = layer.lora_configs["default"]
    full_a, full_b_lora = logical_factors(lora, "m." + kind, in_f, out_f, dtype)

    generator = torch.Generator().manual_seed(5)
    x = torch.randn(SEQ, BATCH, in_f, generator=generator, dtype=torch.float64).to(dtype)
    dy = torch.randn(SEQ, BATCH, out_f, generator=generator, dtype=torch.float64).to(dtype)

    # reference: one process, full tensors
    rx, rw, ra, rb = leaf(x), leaf(full_w), leaf(full_a), leaf(full_b_lora)
    rbias = leaf(full_b) if full_b is not None else None
    ref = ref_lora_linear(rx, rw, rbias, ra, rb, lora.scaling)
    ref.backward(dy)

    # layout of input, output and gradients on this rank
    shard = ExpectedShard(kind, rank, world, sp=sp, gather_output=case.get("gather_output", False),
                          input_is_parallel=case.get("input_is_parallel", True))
    local, expect_dx = shard.output, shard.input(rx.grad)

    x_local = leaf(shard.input(x))
    output, output_bias = layer(x_local)
    skip = case["skip"]
    result = {"bias_returned_iff_skip": (output_bias is not None) == (skip and case["bias"])}
    if output_bias is not None:  # megatron returns its own (local, for column) bias unadded
        local_bias = shard.bias(full_b)
        result["returned_bias"] = error_absolute_below_one(output_bias, local_bias)
    with torch.no_grad():
        expected = ref_lora_linear(x, full_w, full_b, full_a, full_b_lora, lora.scaling,
                                   add_bias=not skip)
    result["out"] = error_absolute_below_one(output, local(expected))
    output.backward(local(dy))
    finalize_lora_grads([layer])
    result["dx"] = error_absolute_below_one(x_local.grad, expect_dx)
    weight_a, weight_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    result["dA"] = error_absolute_below_one(weight_a.grad, shard.lora_a(ra.grad))
    result["dB"] = error_absolute_below_one(weight_b.grad, shard.lora_b(rb.grad))
    if trainable and not skip:
        base = layer.base_layer
        result["dW"] = error_absolute_below_one(base.weight.grad, shard.weight(rw.grad))
        if rbias is not None:
            # under SP the row bias meets a sequence shard: megatron's finalize sums it
            bias_grad = sum_over_tp_if(base.bias.grad, sp and kind == "row", group)
            result["dbias"] = error_absolute_below_one(bias_grad, shard.bias(rbias.grad))
    return result


def run_chain_case(case, rank, world, group):
    """column (no gather) -> gelu -> row (input parallel): the MLP / attention shape."""
    from megatron_lora import finalize_lora_grads

    dtype = DTYPES[case["dtype"]]
    sp, trainable = case["sp"], case.get("trainable", False)
    common = dict(world=world, rank=rank, sp=sp, dtype=dtype, bias=case["bias"], skip=case["skip"],
                  fused=case["path"] == "fast", trainable=trainable)
    fc1, w1, b1 = build_layer("column", HIDDEN, FFN, seed=21, name="mlp.linear_fc1", **common)
    fc2, w2, b2 = build_layer("row", FFN, HIDDEN, seed=22, name="mlp.linear_fc2", **common)
    lora = fc1.lora_configs["default"]
    a1, bb1 = logical_factors(lora, "mlp.linear_fc1", HIDDEN, FFN, dtype)
    a2, bb2 = logical_factors(lora, "mlp.linear_fc2", FFN, HIDDEN, dtype)

    generator = torch.Generator().manual_seed(6)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=generator, dtype=torch.float64).to(dtype)
    dy = torch.randn(SEQ, BATCH, HIDDEN, generator=generator, dtype=torch.float64).to(dtype)
    ref_leaves = [leaf(t) for t in (x, a1, bb1, a2, bb2)]
    rx, ra1, rb1, ra2, rb2 = ref_leaves
    hidden = F.gelu(ref_lora_linear(rx, w1, b1, ra1, rb1, lora.scaling))
    ref = ref_lora_linear(hidden, w2, b2, ra2, rb2, lora.scaling)
    ref.backward(dy)

    seq_local = (lambda t: t.chunk(world, 0)[rank]) if sp else (lambda t: t)
    x_local = leaf(seq_local(x))
    y = with_bias(fc2(F.gelu(with_bias(fc1(x_local)))))
    result = {"out": error_absolute_below_one(y, seq_local(ref.detach()))}
    y.backward(seq_local(dy))
    finalize_lora_grads([fc1, fc2])
    result["dx"] = error_absolute_below_one(x_local.grad, seq_local(rx.grad))
    column, row = ExpectedShard("column", rank, world, sp), ExpectedShard("row", rank, world, sp)
    result["dA1"] = error_absolute_below_one(fc1.lora_A["default"].weight.grad, column.lora_a(ra1.grad))
    result["dB1"] = error_absolute_below_one(fc1.lora_B["default"].weight.grad, column.lora_b(rb1.grad))
    result["dA2"] = error_absolute_below_one(fc2.lora_A["default"].weight.grad, row.lora_a(ra2.grad))
    result["dB2"] = error_absolute_below_one(fc2.lora_B["default"].weight.grad, row.lora_b(rb2.grad))
    return result


def parity_matrix(rank, world, group):
    results = {}
    for case in parity_cases(world):
        runner = run_chain_case if case["kind"] == "chain" else run_single_layer_case
        results[case_id(case)] = runner(case, rank, world, group)
    return results


# --- several active adapters -------------------------------------------------------------------


def multi_adapter(rank, world, group):
    """Two active adapters (different r and alpha) are summed, exactly, on every path."""
    from megatron_lora import LoraConfig, finalize_lora_grads

    second = LoraConfig(r=3, lora_alpha=5.0, init_lora_weights=False, seed=4)
    dtype = torch.float64
    results = {}
    sps = (False, True) if world > 1 else (False,)
    for kind, sp, path in itertools.product(("column", "row"), sps, ("fast", "fallback")):
        in_f, out_f = (HIDDEN, FFN) if kind == "column" else (FFN, HIDDEN)
        layer, w, _ = build_layer(kind, in_f, out_f, world=world, rank=rank, sp=sp, dtype=dtype,
                                  bias=False, skip=False, name="m", fused=path == "fast")
        layer.update_layer("second", second)
        assert layer.active_adapters == ["default", "second"]
        first = layer.lora_configs["default"]
        generator = torch.Generator().manual_seed(12)
        x = torch.randn(SEQ, BATCH, in_f, generator=generator, dtype=dtype)
        dy = torch.randn(SEQ, BATCH, out_f, generator=generator, dtype=dtype)
        factors = {}
        rx = leaf(x)
        ref = rx @ w.t()
        for name, config in (("default", first), ("second", second)):
            full_a, full_b = (leaf(t) for t in logical_factors(config, "m", in_f, out_f, dtype, name))
            factors[name] = (full_a, full_b)
            ref = ref + config.scaling * (rx @ full_a.t()) @ full_b.t()
        ref.backward(dy)
        shard = ExpectedShard(kind, rank, world, sp)
        local_out, expect_dx = shard.output, shard.input(rx.grad)
        x_local = leaf(shard.input(x))
        out, _ = layer(x_local)
        out.backward(local_out(dy))
        finalize_lora_grads(layer)
        metrics = {"out": error_absolute_below_one(out, local_out(ref.detach())), "dx": error_absolute_below_one(x_local.grad, expect_dx)}
        for name, (full_a, full_b) in factors.items():
            got_a, got_b = layer.lora_A[name].weight.grad, layer.lora_B[name].weight.grad
            metrics[f"dA-{name}"] = error_absolute_below_one(got_a, shard.lora_a(full_a.grad))
            metrics[f"dB-{name}"] = error_absolute_below_one(got_b, shard.lora_b(full_b.grad))
        results[f"{kind}-{'sp' if sp else 'nosp'}-{path}"] = metrics
    return results


# --- initialisation invariance ---------------------------------------------------------------


def _gather(tensor, dim, group):
    parts = [torch.empty_like(tensor) for _ in range(group.size())]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def init_factors(rank, world, group):
    """Gathered full A and B for each init mode and layer kind, as exact float lists."""
    from megatron_lora import LoraConfig

    found = {}
    for mode in (True, "gaussian", "xavier", False):
        lora = LoraConfig(r=RANK, lora_alpha=16, init_lora_weights=mode, seed=7)
        for kind, packed in (("column", False), ("column", True), ("row", False)):
            in_f, out_f = (HIDDEN, 2 * FFN) if kind == "column" else (2 * FFN, HIDDEN)
            layer, _, _ = build_layer(kind, in_f, out_f, world=world, rank=rank, sp=False,
                                      dtype=torch.float32, bias=False, skip=False, lora=lora,
                                      name=f"decoder.layers.3.mlp.{kind}")
            if packed:
                from megatron_lora.layer import LoraParallelLinear

                layer = LoraParallelLinear(layer.base_layer, "default", lora, packed_gate_up=True,
                                           module_name=f"decoder.layers.3.mlp.{kind}")
            weight_a = layer.lora_A["default"].weight.detach()
            weight_b = layer.lora_B["default"].weight.detach()
            if kind == "column":
                full_a = weight_a
                if packed:  # each rank holds [gate_i; up_i]; canonical is [gate_all; up_all]
                    gate, up = weight_b.chunk(2, 0)
                    full_b = torch.cat([_gather(gate, 0, group), _gather(up, 0, group)], 0)
                else:
                    full_b = _gather(weight_b, 0, group)
            else:
                full_a, full_b = _gather(weight_a, 1, group), weight_b
            key = f"{mode}-{kind}{'-packed' if packed else ''}"
            found[key] = {"A": full_a.tolist(), "B": full_b.tolist()}
    return found


# --- dropout ---------------------------------------------------------------------------------


def dropout_checks(rank, world, group):
    """Replicated inputs: the mask equals the TP=1 mask (so every rank's). Sharded inputs:
    per-rank masks, and the result equals the reference built from the gathered mask."""
    from megatron_lora import LoraConfig, finalize_lora_grads

    p = 0.3
    lora = LoraConfig(r=RANK, lora_alpha=7.0, lora_dropout=p, init_lora_weights=False, seed=2)
    results = {}
    dtype = torch.float64
    generator = torch.Generator().manual_seed(9)
    x = torch.rand(SEQ, BATCH, HIDDEN, generator=generator, dtype=dtype) + 0.5  # never 0
    dy = torch.randn(SEQ, BATCH, FFN, generator=generator, dtype=dtype)

    # column, no SP: replicated input -> default stream, same on all ranks and at TP=1
    for path in ("fast", "fallback"):
        layer, w, _ = build_layer("column", HIDDEN, FFN, world=world, rank=rank, sp=False, dtype=dtype,
                                  bias=False, skip=False, lora=lora, name="c", fused=path == "fast")
        layer.train()
        full_a, full_b = logical_factors(lora, "c", HIDDEN, FFN, dtype)
        torch.manual_seed(77)
        ref_mask = F.dropout(torch.ones_like(x), p, training=True)
        ra, rb = leaf(full_a), leaf(full_b)
        ref = x @ w.t() + lora.scaling * ((x * ref_mask) @ ra.t()) @ rb.t()
        ref.backward(dy)
        torch.manual_seed(77)
        x_local = leaf(x)
        out, _ = layer(x_local)
        shard = ExpectedShard("column", rank, world)
        out.backward(shard.output(dy))
        finalize_lora_grads([layer])
        results[f"column-replicated-{path}"] = {
            "out": error_absolute_below_one(out, shard.output(ref.detach())),
            "dA": error_absolute_below_one(layer.lora_A["default"].weight.grad, shard.lora_a(ra.grad)),
            "dB": error_absolute_below_one(layer.lora_B["default"].weight.grad, shard.lora_b(rb.grad)),
        }

    # sharded inputs: row (input split along hidden) and column under SP (split along sequence)
    shard_cases = [("row", False)] + ([("column", True)] if world > 1 else [])
    for kind, sp in shard_cases:
        in_f, out_f = (FFN, HIDDEN) if kind == "row" else (HIDDEN, FFN)
        xs = torch.rand(SEQ, BATCH, in_f, generator=generator, dtype=dtype) + 0.5
        dys = torch.randn(SEQ, BATCH, out_f, generator=generator, dtype=dtype)
        layer, w, _ = build_layer(kind, in_f, out_f, world=world, rank=rank, sp=sp, dtype=dtype,
                                  bias=False, skip=False, lora=lora, name=kind)
        layer.train()
        captured = {}

        def capture_mask(module, inputs, output):
            captured.setdefault("mask", (output != 0).to(dtype) / (1 - p))  # returns None

        layer.lora_dropout["default"].register_forward_hook(capture_mask)
        split = -1 if kind == "row" else 0
        x_local = leaf(xs.chunk(world, split)[rank])
        out, _ = layer(x_local)
        full_mask = _gather(captured["mask"], split, group)
        local_masks_differ = world > 1 and not torch.equal(
            full_mask.chunk(world, split)[0], full_mask.chunk(world, split)[1])
        full_a, full_b = logical_factors(lora, kind, in_f, out_f, dtype)
        ra, rb = leaf(full_a), leaf(full_b)
        ref = xs @ w.t() + lora.scaling * ((xs * full_mask) @ ra.t()) @ rb.t()
        ref.backward(dys)
        shard = ExpectedShard(kind, rank, world, sp)
        local = shard.output
        out.backward(local(dys))
        finalize_lora_grads([layer])
        grads = {
            "dA": layer.lora_A["default"].weight.grad,
            "dB": layer.lora_B["default"].weight.grad,
        }
        expected = {"dA": shard.lora_a(ra.grad), "dB": shard.lora_b(rb.grad)}
        results[f"{kind}-sharded"] = {
            "out": error_absolute_below_one(out, local(ref.detach())),
            "dA": error_absolute_below_one(grads["dA"], expected["dA"]),
            "dB": error_absolute_below_one(grads["dB"], expected["dB"]),
            "masks_differ_across_ranks": bool(local_masks_differ),
            "drop_fraction": 1.0 - (full_mask != 0).double().mean().item(),
        }
    return results


# --- collectives -----------------------------------------------------------------------------


def _count_step(module_fn, x):
    x = leaf(x)
    with CollectiveCounter() as counter:
        y = module_fn(x)
        y.backward(torch.ones_like(y))
    return counter.calls


def collective_counts(rank, world, group):
    """Collectives of one forward+backward: frozen base alone vs. base + LoRA."""
    from megatron_lora import LoraConfig, finalize_lora_grads

    lora = LoraConfig(r=RANK, lora_alpha=7.0, init_lora_weights=False)
    dtype = torch.float32
    found = {}
    for path, sp in itertools.product(("fast", "fallback"), (False, True) if world > 1 else (False,)):
        seq_local = SEQ // world if sp else SEQ  # a column input is sequence-sharded under SP
        specs = {
            "column": dict(kind="column", in_f=HIDDEN, out_f=FFN, gather_output=False),
            "column-gather": dict(kind="column", in_f=HIDDEN, out_f=FFN, gather_output=True),
            "row": dict(kind="row", in_f=FFN, out_f=HIDDEN, input_is_parallel=True),
        }
        if not sp:
            specs["row-scatter"] = dict(kind="row", in_f=FFN, out_f=HIDDEN, input_is_parallel=False)
        for label, spec in specs.items():
            spec = dict(spec)
            kind, in_f, out_f = spec.pop("kind"), spec.pop("in_f"), spec.pop("out_f")
            layer, _, _ = build_layer(kind, in_f, out_f, world=world, rank=rank, sp=sp, dtype=dtype,
                                      bias=True, skip=False, lora=lora, fused=path == "fast", **spec)
            width = in_f // world if (kind == "row" and spec.get("input_is_parallel", True)) else in_f
            x = torch.randn(seq_local if kind == "column" else SEQ, BATCH, width)
            found[f"{path}-{'sp' if sp else 'nosp'}-{label}"] = {
                "base": _count_step(lambda t: with_bias(layer.base_layer(t)), x),
                "lora": _count_step(lambda t: with_bias(layer(t)), x),
                "in_features": in_f,
            }
    # the gradient sync: one collective for a whole (dense) model
    layers = []
    for index in range(4):
        for kind, in_f, out_f in (("column", HIDDEN, FFN), ("row", FFN, HIDDEN)):
            layer, _, _ = build_layer(kind, in_f, out_f, world=world, rank=rank, sp=False,
                                      dtype=dtype, bias=False, skip=False, lora=lora,
                                      name=f"layers.{index}.{kind}")
            layers.append(layer)
    x = leaf(torch.randn(SEQ, BATCH, HIDDEN))
    y = x
    for layer in layers:
        y = with_bias(layer(y))
    y.sum().backward()
    model = torch.nn.ModuleList(layers)
    with CollectiveCounter() as counter:
        returned = finalize_lora_grads(model)
    found["grad_sync"] = {"calls": counter.calls, "returned": returned, "layers": len(layers)}
    return found


# --- megatron DDP, grad norm -----------------------------------------------------------------


class _Mlp(torch.nn.Module):
    def __init__(self, fc1, fc2, config):
        super().__init__()
        self.fc1, self.fc2, self.config = fc1, fc2, config

    def forward(self, x):
        return with_bias(self.fc2(F.gelu(with_bias(self.fc1(x)))))


def ddp_and_grad_norm(rank, world, group):
    """finalize_model_grads_with_lora on megatron DDP (main_grad), and the grad norm that
    megatron's own clip code computes, against the TP=1 reference."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer import TransformerConfig

    from megatron_lora import finalize_model_grads_with_lora
    from megatron_lora.cpu import cuda_arguments_to_cpu

    results = {}
    for sp in ((False, True) if world > 1 else (False,)):
        dtype = torch.float32
        common = dict(world=world, rank=rank, sp=sp, dtype=dtype, bias=False, skip=False)
        fc1, w1, _ = build_layer("column", HIDDEN, FFN, seed=31, name="fc1", **common)
        fc2, w2, _ = build_layer("row", FFN, HIDDEN, seed=32, name="fc2", **common)
        lora = fc1.lora_configs["default"]
        config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4,
                                   tensor_model_parallel_size=world, sequence_parallel=sp,
                                   use_cpu_initialization=True)
        model = DistributedDataParallel(config, DistributedDataParallelConfig(), _Mlp(fc1, fc2, config))
        a1, b1 = logical_factors(lora, "fc1", HIDDEN, FFN, dtype)
        a2, b2 = logical_factors(lora, "fc2", FFN, HIDDEN, dtype)
        generator = torch.Generator().manual_seed(8)
        x = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
        dy = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
        ra1, rb1, ra2, rb2 = (leaf(t) for t in (a1, b1, a2, b2))
        ref = ref_lora_linear(F.gelu(ref_lora_linear(x, w1, None, ra1, rb1, lora.scaling)),
                              w2, None, ra2, rb2, lora.scaling)
        ref.backward(dy)
        seq_local = (lambda t: t.chunk(world, 0)[rank]) if sp else (lambda t: t)
        model.zero_grad_buffer()
        y = model(seq_local(x))
        y.backward(seq_local(dy))
        finalize_model_grads_with_lora([model])
        key = "sp" if sp else "nosp"
        column, row = ExpectedShard("column", rank, world), ExpectedShard("row", rank, world)
        results[key] = {
            "dA1": error_absolute_below_one(fc1.lora_A["default"].weight.main_grad, column.lora_a(ra1.grad)),
            "dB1": error_absolute_below_one(fc1.lora_B["default"].weight.main_grad, column.lora_b(rb1.grad)),
            "dA2": error_absolute_below_one(fc2.lora_A["default"].weight.main_grad, row.lora_a(ra2.grad)),
            "dB2": error_absolute_below_one(fc2.lora_B["default"].weight.main_grad, row.lora_b(rb2.grad)),
        }
        lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
        grads_for_norm = [p.main_grad for p in lora_params
                          if param_is_not_tensor_parallel_duplicate(p, tp_group=group)]
        with cuda_arguments_to_cpu():
            norm = get_grad_norm_fp32(grads_for_norm, grad_stats_parallel_group=group)
        ref_norm = torch.sqrt(sum((t.grad.double() ** 2).sum() for t in (ra1, rb1, ra2, rb2))).item()
        results[key]["grad_norm"] = abs(norm - ref_norm) / ref_norm
    return results


# --- bad layers --------------------------------------------------------------------------------


def layout_errors(rank, world, group):
    """Messages for layers whose parallel state cannot be read."""
    from megatron_lora import LoraConfig, dispatch_megatron

    lora = LoraConfig(r=4)
    messages = {}

    def message_of(make_layer):
        layer = make_layer()
        try:
            dispatch_megatron(layer, "default", lora)
        except Exception as error:  # the test checks type and text
            return f"{type(error).__name__}: {error}"
        return "no error"

    def fresh(kind="column"):
        layer, _, _ = build_layer(kind, HIDDEN, FFN * world, world=world, rank=rank, sp=False,
                                  dtype=torch.float32, bias=False, skip=False)
        return layer.base_layer

    def no_group():
        layer = fresh()
        layer.tp_group = None
        return layer

    def missing_attribute():
        layer = fresh("row")
        del layer.input_is_parallel
        return layer

    def wrong_weight():
        layer = fresh()
        layer.weight = torch.nn.Parameter(torch.zeros(3, 5))
        return layer

    messages["no_group"] = message_of(no_group)
    messages["missing_attribute"] = message_of(missing_attribute)
    messages["wrong_weight"] = message_of(wrong_weight)
    return messages


# --- entry point ---------------------------------------------------------------------------------


@dataclass
class LayerChecks:
    """What run_all checked on one rank, one field per check function above."""

    parity: dict  # parity_matrix: case id -> output / gradient errors against TP=1
    multi_adapter: dict  # multi_adapter
    init: dict  # init_factors: the full factors each rank drew
    dropout: dict  # dropout_checks: mask agreement per layer kind
    collectives: dict  # collective_counts: per forward, backward and grad sync
    ddp: dict  # ddp_and_grad_norm: per layout
    errors: dict  # layout_errors: case -> message
    layer_types: dict  # layer_type_checks.run_all: embedding and router


def run_all(rank, world) -> LayerChecks:
    import layer_type_checks  # it imports this module's helpers

    group = setup_parallel(world)
    return LayerChecks(
        parity=parity_matrix(rank, world, group),
        multi_adapter=multi_adapter(rank, world, group),
        init=init_factors(rank, world, group),
        dropout=dropout_checks(rank, world, group),
        collectives=collective_counts(rank, world, group),
        ddp=ddp_and_grad_norm(rank, world, group),
        errors=layout_errors(rank, world, group),
        layer_types=layer_type_checks.run_all(rank, world, group),
    )
