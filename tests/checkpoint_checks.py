"""Adapter checkpoint checks that run inside spawned gloo process groups.

``save_and_break`` (world 2, TP=2 + SP) writes the adapters the other layouts load: a random
one (every factor non-zero) and one overfitted on a single sequence; then it breaks copies of
them in every way the loader must refuse, and crashes a save half-way. ``load_checks`` runs
inside gpt_checks.run_all for every other layout.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from gpt_checks import (TARGETS, TINY_GPT, batches, build, experiment, logits_of, random_lora,
                        run_schedule, zero_lora_grads)

OVERFIT_STEPS, OVERFIT_LR = 60, 1e-2


def _sequence():
    generator = torch.Generator().manual_seed(77)
    return torch.randint(0, TINY_GPT["vocab_size"], (1, TINY_GPT["seq_length"] + 1),
                         generator=generator)


def _model_state(model):
    """Every parameter and the adapter set: what a failed load must leave as it was."""
    from megatron_lora import adapter_names

    return ({n: p.detach().clone() for n, p in model.state_dict().items()
             if isinstance(p, torch.Tensor)}, adapter_names(model))


def _same_state(model, state):
    tensors, names = state
    now, now_names = _model_state(model)
    return names == now_names and tensors.keys() == now.keys() and all(
        torch.equal(tensors[k], now[k]) for k in tensors)


def overfit(model, sequence):
    """LoRA-only Adam on one sequence; (first, last) loss and grad norm."""
    from megatron_lora import finalize_lora_grads, lora_grad_norm

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=OVERFIT_LR)
    losses, norms = [], []
    for _ in range(OVERFIT_STEPS):
        zero_lora_grads(model)
        losses.append(run_schedule(model, [sequence]))
        finalize_lora_grads(model)
        norms.append(lora_grad_norm(model))
        optimizer.step()
    return losses, norms


def greedy_generate(model, prompt, new_tokens):
    tokens = prompt
    for _ in range(new_tokens):
        logits = logits_of(model, tokens)
        tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    return tokens


# --- breaking adapters -----------------------------------------------------------------------


def _rewrite(source: Path, target: Path, edit_tensors=None, edit_config=None, raw=None,
             rehash=True):
    """A copy of an adapter with edited tensors / config / raw weight bytes; the config's
    sha256 and module list are updated to match the tensors unless rehash=False (damage after
    the save)."""
    import hashlib

    from safetensors.torch import load_file, save

    from megatron_lora.adapter_file import CONFIG_NAME, WEIGHTS_NAME

    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / CONFIG_NAME).read_text())
    tensors = load_file(source / WEIGHTS_NAME)
    if edit_tensors:
        edit_tensors(tensors)
    weights = save(tensors, metadata={"format": "megatron_lora.adapter"}) if raw is None else raw
    if rehash:
        config["weights_sha256"] = hashlib.sha256(weights).hexdigest()
        config["modules"] = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    if edit_config:
        edit_config(config)
    (target / WEIGHTS_NAME).write_bytes(weights)
    (target / CONFIG_NAME).write_text(json.dumps(config))
    return target


def _broken_adapters(good: Path, scratch: Path):
    from megatron_lora.adapter_file import WEIGHTS_NAME

    fc1_a = "decoder.layers.1.mlp.linear_fc1.lora_A.weight"
    fc2_a = "decoder.layers.2.mlp.linear_fc2.lora_A.weight"
    weights = (good / WEIGHTS_NAME).read_bytes()

    def drop(tensors):
        del tensors[fc1_a]

    def extra(tensors):
        tensors["decoder.layers.9.mlp.linear_fc1.lora_A.weight"] = tensors[fc1_a].clone()
        tensors["decoder.layers.9.mlp.linear_fc1.lora_B.weight"] = torch.zeros(192, 4)

    def reshape(tensors):
        tensors[fc1_a] = torch.zeros(4, TINY_GPT["hidden_size"] + 8)

    def odd_split(tensors):  # fc2's A [r, ffn] with an odd ffn cannot be split over TP=2
        tensors[fc2_a] = torch.zeros(4, TINY_GPT["ffn_hidden_size"] + 1)

    def integer(tensors):
        tensors[fc1_a] = tensors[fc1_a].to(torch.int32)

    def version(config):
        config["format_version"] = 99

    def no_base(config):  # as import_peft(model, …) writes it: the model checks the shapes
        config["base_model"] = {}

    def rank_edited(config):
        config["lora_config"]["r"] = 2

    def other_base(config):
        config["base_model"]["hidden_size"] = 128

    damaged = bytearray(weights)
    damaged[len(damaged) // 2] ^= 0xFF
    cases = {
        "missing_key": _rewrite(good, scratch / "missing_key", edit_tensors=drop),
        "extra_key": _rewrite(good, scratch / "extra_key", edit_tensors=extra, edit_config=no_base),
        "wrong_shape": _rewrite(good, scratch / "wrong_shape", edit_tensors=reshape,
                                edit_config=no_base),
        "tp_does_not_divide": _rewrite(good, scratch / "tp_does_not_divide", edit_tensors=odd_split,
                                       edit_config=no_base),
        "shape_against_description": _rewrite(good, scratch / "shape_against_description",
                                              edit_tensors=reshape),
        "rank_edited": _rewrite(good, scratch / "rank_edited", edit_config=rank_edited),
        "integer_dtype": _rewrite(good, scratch / "integer_dtype", edit_tensors=integer),
        "format_version": _rewrite(good, scratch / "format_version", edit_config=version),
        "other_base": _rewrite(good, scratch / "other_base", edit_config=other_base),
        "truncated_checked": _rewrite(good, scratch / "truncated_checked", raw=weights[: len(weights) // 2]),
        "corrupt": _rewrite(good, scratch / "corrupt", raw=bytes(damaged), rehash=False),
        "not_safetensors": _rewrite(good, scratch / "not_safetensors", raw=b"PK\x03\x04 not a tensor file"),
    }
    # what a copy cut short looks like: the checksum no longer matches
    cases["truncated"] = _rewrite(good, scratch / "truncated", raw=weights[: len(weights) // 3],
                                  rehash=False)
    not_adapter = scratch / "not_adapter"
    not_adapter.mkdir(exist_ok=True)
    (not_adapter / "notes.txt").write_text("hello")
    cases["not_adapter"] = not_adapter
    return cases


def _packed_fc1_layout(model, directory: Path):
    """SwiGLU fc1's B in the file vs. this rank's shard: [gate_i; up_i] of [gate_all; up_all]."""
    from safetensors.torch import load_file

    from megatron_lora.adapter_file import WEIGHTS_NAME
    from megatron_lora.model import lora_layers

    name = "decoder.layers.1.mlp.linear_fc1"
    saved_b = load_file(directory / WEIGHTS_NAME)[f"{name}.lora_B.weight"]
    layer = dict(lora_layers(model))[name]
    local_b = layer.lora_B["default"].weight.detach()
    rank, world = layer.layout.rank, layer.layout.world_size
    gate, up = saved_b.chunk(2, dim=0)
    return {"saved_b": saved_b,
            "gate_up_slice": torch.equal(local_b, torch.cat([gate.chunk(world)[rank],
                                                             up.chunk(world)[rank]])),
            "contiguous_slice": torch.equal(local_b, saved_b.chunk(world)[rank])}


# --- the spawned entry points ----------------------------------------------------------------


@dataclass
class SavedAdapters:
    """What save_and_break did on one rank (TP=2 + SP), for the checkpoint tests. Every field
    is filled as the run goes; the two marked rank 0 stay None on the other rank."""

    random_logits: Optional[torch.Tensor] = None  # the saved "random" adapter's logits
    random_header: Optional[dict] = None  # rank 0: its adapter_config as read back
    fc1: Optional[dict] = None  # how the packed gate/up factor lies in the file
    refused_save: Optional[str] = None  # the error of a save over a file
    sharded_keys: Optional[list] = None  # the model's megatron sharded-state-dict keys
    overfit_losses: Optional[list] = None
    overfit_norms: Optional[list] = None
    sequence: Optional[torch.Tensor] = None  # what the "overfit" adapter learned
    errors: Optional[dict] = None  # broken-adapter case -> the load's error (None: it loaded)
    untouched: Optional[dict] = None  # broken-adapter case -> the model unchanged by the refused load
    reloaded_logits: Optional[torch.Tensor] = None  # a good load after every refusal
    coverage: Optional[dict] = None  # coverage_checks
    crash: Optional[dict] = None  # rank 0: a save killed midway
    moe: Optional[dict] = None  # expert adapters saved at EP=2


def save_and_break(rank, world, directory) -> SavedAdapters:
    """World 2, TP=2 + SP: save the adapters every other layout loads, then the error paths."""
    from megatron_lora import LoraConfig, apply_lora
    from megatron.core import dist_checkpointing

    from megatron_lora.adapter_file import AdapterCheckpointError, read_adapter
    from megatron_lora.checkpoint import load_adapter, save_adapter
    from megatron_lora.dist_checkpoint import save_adapter_distributed
    from megatron_lora.interop import export_peft

    directory = Path(directory)
    exp = experiment(2, 1, True)
    out = SavedAdapters()

    model = build(exp, random_lora())
    tokens = batches(0)[0][:, :-1]
    out.random_logits = logits_of(model, tokens)
    save_adapter(model, directory / "random")
    if rank == 0:
        out.random_header = read_adapter(directory / "random").config
    torch.distributed.barrier()
    out.fc1 = _packed_fc1_layout(model, directory / "random")
    # saving again over an existing adapter replaces it atomically
    save_adapter(model, directory / "random")
    out.refused_save = _refused_save(model, directory / "a_file")
    # megatron dist-checkpointing: adapter only, and the whole model (base + adapter)
    save_adapter_distributed(model, directory / "dist_adapter")
    export_peft(model, directory / "peft")
    (directory / "dist_full").mkdir(exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(directory / "dist_full"))
    out.sharded_keys = sorted(model.sharded_state_dict().keys())

    overfit_model = build(exp)
    apply_lora(overfit_model, LoraConfig(r=8, lora_alpha=16.0, seed=1, target_modules=TARGETS),
               verbose=False)
    sequence = _sequence()
    out.overfit_losses, out.overfit_norms = overfit(overfit_model, sequence)
    out.sequence = sequence
    save_adapter(overfit_model, directory / "overfit")

    # every broken adapter: a clear error on every rank, and the model untouched
    fresh = build(exp)
    if rank == 0:
        _broken_adapters(directory / "random", directory / "broken")
    torch.distributed.barrier()
    cases = {p.name: p for p in (directory / "broken").iterdir()}
    cases["missing_directory"] = directory / "broken" / "does_not_exist"
    errors, untouched = {}, {}
    for name, path in sorted(cases.items()):
        state = _model_state(fresh)
        try:
            load_adapter(fresh, path)
            errors[name] = None
        except AdapterCheckpointError as error:
            errors[name] = str(error)
        untouched[name] = _same_state(fresh, state)
    out.errors, out.untouched = errors, untouched

    # a good load into the same model still works afterwards
    load_adapter(fresh, directory / "random")
    out.reloaded_logits = logits_of(fresh, tokens)
    torch.distributed.barrier()
    out.coverage = coverage_checks(exp, directory)
    if rank == 0:
        out.crash = _crash_mid_save_single(model, directory / "random")
    out.moe = moe_check(2, directory / "moe", save=True)
    return out


def _refused_save(model, path: Path):
    """A save rank 0 cannot write (the path is a file): this rank's error, or None."""
    from megatron_lora.adapter_file import AdapterCheckpointError
    from megatron_lora.checkpoint import save_adapter

    if torch.distributed.get_rank() == 0:
        path.write_text("not an adapter")
    torch.distributed.barrier()
    try:
        save_adapter(model, path)
    except AdapterCheckpointError as error:
        return str(error)
    return None


def _refusal(model, path, **kwargs):
    """(error message or None, every parameter and the adapter set unchanged)."""
    from megatron_lora.adapter_file import AdapterCheckpointError
    from megatron_lora.checkpoint import load_adapter

    state = _model_state(model)
    try:
        load_adapter(model, path, **kwargs)
        message = None
    except AdapterCheckpointError as error:
        message = str(error)
    return message, _same_state(model, state)


def coverage_checks(exp, directory: Path):
    """The file and the model's existing adapter covering different modules: refused before
    any parameter changes, and allow_subset=True loading a subset with a rank-0 warning."""
    import logging

    from megatron_lora.checkpoint import load_adapter, save_adapter
    from megatron_lora.model import lora_layers

    out = {}
    # the whole adapter into a model whose "default" adapts only linear_fc1
    fc1_only = build(exp, random_lora(seed=11, target_modules=["linear_fc1"]))
    out["more_in_file"] = _refusal(fc1_only, directory / "random")
    # an fc1-only file into a model whose "default" adapts every target
    save_adapter(fc1_only, directory / "fc1_only")
    torch.distributed.barrier()
    everything = build(exp, random_lora(seed=12))
    out["fewer_in_file"] = _refusal(everything, directory / "fc1_only")

    before = {name: (layer.lora_A["default"].weight.detach().clone(),
                     layer.lora_B["default"].weight.detach().clone())
              for name, layer in lora_layers(everything)}
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("megatron_lora.checkpoint")
    logger.addHandler(handler)
    try:
        out["subset_name"] = load_adapter(everything, directory / "fc1_only", allow_subset=True)
    finally:
        logger.removeHandler(handler)
    out["subset_log"] = [record.getMessage() for record in records]
    source = dict(lora_layers(fc1_only))
    changed, kept = [], []
    for name, layer in lora_layers(everything):
        now = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        if all(torch.equal(a, b) for a, b in zip(now, before[name])):
            kept.append(name)
        if name in source and all(torch.equal(a, b) for a, b in zip(
                now, (source[name].lora_A["default"].weight, source[name].lora_B["default"].weight))):
            changed.append(name)
    out["subset_loaded"], out["subset_kept"] = sorted(changed), sorted(kept)
    return out


def moe_experiment(ep):
    """The tiny GPT with 4 experts (SequentialMLP, allgather dispatcher) at EP=ep, TP=1."""
    return experiment(1, 1, False, num_moe_experts=4, moe_router_topk=2,
                      expert_model_parallel_size=ep, moe_token_dispatcher_type="allgather")


def moe_check(ep, path: Path, save: bool):
    """Expert adapters: saved at EP=2 (experts named by their global number), loaded at EP=ep."""
    from megatron_lora import disable_adapters
    from megatron_lora.checkpoint import load_adapter, save_adapter
    from megatron_lora.model import lora_layers

    tokens = batches(0)[0][:, :-1]
    exp = moe_experiment(ep)
    if save:
        model = build(exp, random_lora(target_modules=["linear_qkv", "linear_fc1", "linear_fc2"]))
        save_adapter(model, path)
    else:
        model = build(exp)
        load_adapter(model, path)
    with disable_adapters(model):
        base_logits = logits_of(model, tokens)
    return {"logits": logits_of(model, tokens), "base_logits": base_logits,
            "names": sorted(name for name, _ in lora_layers(model))}


def _crash_mid_save_single(model, path):
    """Rank 0 only, outside any collective: the atomic write under a simulated crash."""
    import megatron_lora.adapter_file as adapter_file

    real_fsync, calls = os.fsync, []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError("simulated crash during save")
        return real_fsync(fd)

    names = (adapter_file.CONFIG_NAME, adapter_file.WEIGHTS_NAME)
    before = {name: (path / name).read_bytes() for name in names}
    os.fsync = failing_fsync
    try:
        adapter_file.write_directory_atomically(path, {adapter_file.WEIGHTS_NAME: b"new weights",
                                                       adapter_file.CONFIG_NAME: b"{}"})
        error = None
    except OSError as caught:
        error = str(caught)
    finally:
        os.fsync = real_fsync
    after = {name: (path / name).read_bytes() for name in before}
    leftovers = sorted(p.name for p in path.parent.iterdir() if ".saving-" in p.name)
    return {"error": error, "previous_intact": after == before, "leftovers": leftovers,
            "still_loads": adapter_file.read_adapter(path).config["format_version"]}


def load_checks(exp, directory):
    """Load the TP=2 + SP adapters at this layout (consolidated and through megatron
    dist-checkpointing, adapter only and whole model): logits, and greedy generation at TP=1."""
    from megatron.core import dist_checkpointing

    from megatron_lora.checkpoint import load_adapter, save_adapter
    from megatron_lora.dist_checkpoint import load_adapter_distributed
    from megatron_lora.interop import export_peft, import_peft

    directory = Path(directory)
    tokens = batches(0)[0][:, :-1]
    model = build(exp)
    name = load_adapter(model, directory / "random")
    out = {"name": name, "random_logits": logits_of(model, tokens)}

    # saving and exporting again from this layout gives the same files' tensors, bit for bit
    tag = f"tp{exp.tensor_model_parallel_size}-pp{exp.pipeline_model_parallel_size}"
    save_adapter(model, directory / f"resaved-{tag}")
    export_peft(model, directory / f"peft-{tag}")
    torch.distributed.barrier()
    out["resave_identical"] = _same_tensors(directory / f"resaved-{tag}", directory / "random")
    out["reexport_identical"] = _same_tensors(directory / f"peft-{tag}", directory / "peft")

    # PEFT import of the TP=2 + SP export
    model = build(exp)
    import_peft(model, directory / "peft")
    out["peft_import_logits"] = logits_of(model, tokens)
    save_adapter(model, directory / f"from-peft-{tag}")
    torch.distributed.barrier()
    out["peft_round_trip_identical"] = _same_tensors(directory / f"from-peft-{tag}",
                                                     directory / "random")

    # dist-checkpointing, adapter only: into an adapter with other values
    model = build(exp, random_lora(seed=99))
    load_adapter_distributed(model, directory / "dist_adapter")
    out["dist_adapter_logits"] = logits_of(model, tokens)
    # the whole model: into another base (other seed) with another adapter
    model = build(experiment(exp.tensor_model_parallel_size, exp.pipeline_model_parallel_size,
                             exp.sequence_parallel, seed=4321), random_lora(seed=99))
    before = logits_of(model, tokens)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(directory / "dist_full"))
    model.load_state_dict(state)
    out["dist_full_logits"] = logits_of(model, tokens)
    out["dist_full_changed"] = before is None or not torch.equal(before, out["dist_full_logits"])
    if exp.pipeline_model_parallel_size == 1 and exp.tensor_model_parallel_size == 1:
        model = build(exp)
        load_adapter(model, directory / "overfit")
        sequence = _sequence()
        prompt_length = 4
        out["generated"] = greedy_generate(model, sequence[:, :prompt_length],
                                           sequence.shape[1] - prompt_length)
        out["sequence"] = sequence
        out.update(transformers_checks(exp, directory, tokens))
    return out


def _same_tensors(first: Path, second: Path) -> bool:
    from safetensors.torch import load_file

    from megatron_lora.adapter_file import WEIGHTS_NAME

    a, b = load_file(first / WEIGHTS_NAME), load_file(second / WEIGHTS_NAME)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def hf_llama_from(model):
    """The transformers LlamaForCausalLM with this TP=1 megatron GPT's base weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_lora.interop import _model_shape, hf_state_dict

    config = LlamaConfig(
        vocab_size=TINY_GPT["vocab_size"], hidden_size=TINY_GPT["hidden_size"],
        intermediate_size=TINY_GPT["ffn_hidden_size"], num_hidden_layers=TINY_GPT["num_layers"],
        num_attention_heads=TINY_GPT["num_attention_heads"],
        num_key_value_heads=TINY_GPT["num_query_groups"], max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, hidden_act="silu")
    hf = LlamaForCausalLM(config)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    hf.load_state_dict(hf_state_dict(state, _model_shape(model)))
    return hf.eval()


def transformers_checks(exp, directory: Path, tokens):
    """Against the real transformers + peft (TP=1): the exported adapter read by PeftModel,
    and a PEFT-made adapter (different A for q/k/v and gate/up) imported here."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    from megatron_lora.interop import import_peft

    out = {}
    base = build(exp)
    hf = hf_llama_from(base)
    with torch.no_grad():
        out["hf_base_logits"] = hf(tokens).logits
    out["megatron_base_logits"] = logits_of(base, tokens)
    peft_model = PeftModel.from_pretrained(hf, str(directory / "peft"))
    with torch.no_grad():
        out["peft_logits"] = peft_model(tokens).logits

    torch.manual_seed(5)
    native = get_peft_model(hf_llama_from(base), PeftLoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        out["native_peft_logits"] = native(tokens).logits
    native.save_pretrained(str(directory / "peft_native"))
    imported = build(exp)
    import_peft(imported, directory / "peft_native")
    out["native_imported_logits"] = logits_of(imported, tokens)
    return out


# --- expert, router and embedding adapters to and from Hugging Face -------------------------

# megatron variant layouts whose adapters go to Hugging Face names: {layout id: architecture}
HF_MOE_LAYOUTS = {"alltoall-ep1": "mixtral", "alltoall-ep2": "mixtral",
                  "moe-shared-ep1": "qwen2_moe", "moe-shared-tp2-sp-ep2-etp2": "qwen2_moe"}
HF_MOE_TARGETS = TARGETS + ["router", "word_embeddings"]
# {loading layout: saving layout} in the same spawn (the saver runs first): the adapters
# hf_moe_checks saved (consolidated and megatron dist-checkpoint) loaded at another TP/EP/ETP
MOE_CHECKPOINT_PAIRS = {"moe-shared-tp4-sp": "moe-shared-tp2-sp-ep2-etp2"}
NUM_EXPERTS, HF_RANK, HF_ALPHA = 4, 4, 8.0


def hf_module_sizes(architecture, shared_ffn=None):
    """{HF module: (out, in)} of the tiny MoE GPT in that family's PEFT names, written out by
    hand here (not from the package's table) so that a wrong name in the table is caught."""
    hidden, vocab = TINY_GPT["hidden_size"], TINY_GPT["vocab_size"]
    head_dim = hidden // TINY_GPT["num_attention_heads"]
    q_rows, kv_rows, ffn = hidden, TINY_GPT["num_query_groups"] * head_dim, TINY_GPT["ffn_hidden_size"]
    sizes = {"model.embed_tokens": (hidden, vocab), "lm_head": (vocab, hidden)}
    for layer in range(TINY_GPT["num_layers"]):
        p = f"model.layers.{layer}."
        sizes.update({p + "self_attn.q_proj": (q_rows, hidden), p + "self_attn.k_proj": (kv_rows, hidden),
                      p + "self_attn.v_proj": (kv_rows, hidden), p + "self_attn.o_proj": (hidden, q_rows)})
        if architecture == "mixtral":
            sizes[p + "block_sparse_moe.gate"] = (NUM_EXPERTS, hidden)
            experts, names = p + "block_sparse_moe.experts.", ("w1", "w3", "w2")
        else:
            sizes[p + "mlp.gate"] = (NUM_EXPERTS, hidden)
            experts, names = p + "mlp.experts.", ("gate_proj", "up_proj", "down_proj")
            shared = p + "mlp.shared_expert."
            sizes.update({shared + "gate_proj": (shared_ffn, hidden), shared + "up_proj": (shared_ffn, hidden),
                          shared + "down_proj": (hidden, shared_ffn)})
        for e in range(NUM_EXPERTS):
            sizes.update({f"{experts}{e}.{names[0]}": (ffn, hidden), f"{experts}{e}.{names[1]}": (ffn, hidden),
                          f"{experts}{e}.{names[2]}": (hidden, ffn)})
    return sizes


def write_hf_made_adapter(directory: Path, architecture, shared_ffn=None, seed=7):
    """A PEFT adapter as PEFT itself would save one trained on the HF model (each module its own
    A, so fused partners differ), from a seed: the same file on every rank and in every spawn."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out, inp) in hf_module_sizes(architecture, shared_ffn).items():
        a = torch.randn(HF_RANK, inp, generator=generator) * 0.2
        b = torch.randn(out, HF_RANK, generator=generator) * 0.2
        kind = ("lora_embedding_A", "lora_embedding_B") if module.endswith("embed_tokens") else \
            ("lora_A.weight", "lora_B.weight")
        tensors[f"base_model.model.{module}.{kind[0]}"] = a
        tensors[f"base_model.model.{module}.{kind[1]}"] = b
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    leaves = sorted({m.rsplit(".", 1)[-1] for m in hf_module_sizes(architecture, shared_ffn)})
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": HF_RANK, "lora_alpha": HF_ALPHA, "lora_dropout": 0.0, "bias": "none",
        "target_modules": leaves, "fan_in_fan_out": False}))
    return directory


def merged_hf_state(base_state, peft_dir: Path, architecture):
    """transformers 5 state dict with a PEFT file's deltas merged in by hand (s·B A per module
    name; experts stacked as gate_up_proj / down_proj; the embedding's delta (B A)ᵀ): the
    reference for the Qwen2-MoE family, which peft 0.21 cannot load with routed and shared
    experts both adapted (huggingface/peft#3711)."""
    from safetensors.torch import load_file

    config = json.loads((peft_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = {k[len("base_model.model."):]: v for k, v in load_file(peft_dir / "adapter_model.safetensors").items()}
    state = {k: v.clone() for k, v in base_state.items()}
    ffn = TINY_GPT["ffn_hidden_size"]
    for key in [k for k in tensors if k.endswith("lora_A.weight") or k.endswith("lora_embedding_A")]:
        embedding = key.endswith("lora_embedding_A")
        module = key.rsplit(".lora_", 1)[0]
        a = tensors[key]
        b = tensors[module + (".lora_embedding_B" if embedding else ".lora_B.weight")]
        delta = scaling * (b @ a)
        if embedding:
            state[module + ".weight"] += delta.t()
            continue
        name = module.replace("block_sparse_moe.", "mlp.")
        expert = re.fullmatch(r"(.+\.mlp\.experts)\.(\d+)\.(\w+)", name)
        if expert is None:
            state[name + ".weight"] += delta
            continue
        stacked, e, leaf = expert.group(1), int(expert.group(2)), expert.group(3)
        if leaf in ("w1", "gate_proj"):
            state[stacked + ".gate_up_proj"][e, :ffn] += delta
        elif leaf in ("w3", "up_proj"):
            state[stacked + ".gate_up_proj"][e, ffn:] += delta
        else:
            state[stacked + ".down_proj"][e] += delta
    return state


def hf_moe_model(architecture, state, shared_ffn=None):
    """The transformers Mixtral / Qwen2-MoE model of the tiny MoE GPT, holding ``state``."""
    common = dict(
        vocab_size=TINY_GPT["vocab_size"], hidden_size=TINY_GPT["hidden_size"],
        num_hidden_layers=TINY_GPT["num_layers"], num_attention_heads=TINY_GPT["num_attention_heads"],
        num_key_value_heads=TINY_GPT["num_query_groups"], max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=False, num_experts_per_tok=2, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if architecture == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        hf = MixtralForCausalLM(MixtralConfig(**common, intermediate_size=TINY_GPT["ffn_hidden_size"],
                                              num_local_experts=NUM_EXPERTS))
    else:
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

        # norm_topk_prob: megatron's top-k then softmax is Qwen's softmax, top-k, renormalise
        hf = Qwen2MoeForCausalLM(Qwen2MoeConfig(
            **common, intermediate_size=TINY_GPT["ffn_hidden_size"],
            moe_intermediate_size=TINY_GPT["ffn_hidden_size"], shared_expert_intermediate_size=shared_ffn,
            num_experts=NUM_EXPERTS, norm_topk_prob=True, qkv_bias=False, decoder_sparse_step=1,
            mlp_only_layers=[]))
    hf.load_state_dict(state)
    return hf.eval()


def hf_moe_checks(exp, directory: Path, architecture):
    """At this layout: the random expert/router/embedding adapter exported with HF names (the
    file's tensors), megatron -> PEFT -> megatron bit for bit, and a PEFT-made adapter imported
    (logits). At TP = EP = 1 also the transformers side: base logits, and the exported and the
    PEFT-made adapter applied by real peft (Mixtral) or merged by hand (Qwen2-MoE)."""
    from safetensors.torch import load_file

    from megatron_lora import disable_adapters
    from megatron_lora.adapter_file import WEIGHTS_NAME
    from megatron_lora.checkpoint import save_adapter
    from megatron_lora.dist_checkpoint import save_adapter_distributed
    from megatron_lora.interop import _model_shape, export_peft, hf_state_dict, import_peft
    from megatron_lora.model import lora_layers

    tokens = batches(0)[0][:, :-1]
    shared_ffn = exp.megatron_config.get("moe_shared_expert_intermediate_size")
    model = build(exp, random_lora(target_modules=HF_MOE_TARGETS))
    out = {"logits": logits_of(model, tokens)}
    export_peft(model, directory / "export", architecture=architecture)
    save_adapter(model, directory / "original")
    save_adapter_distributed(model, directory / "dist")
    round_trip = build(exp)
    import_peft(round_trip, directory / "export")
    save_adapter(round_trip, directory / "round-trip")
    if torch.distributed.get_rank() == 0:
        write_hf_made_adapter(directory / "hf-made", architecture, shared_ffn)
    torch.distributed.barrier()
    out["exported"] = load_file(directory / "export" / WEIGHTS_NAME)
    out["export_config"] = json.loads((directory / "export" / "adapter_config.json").read_text())
    out["round_trip_identical"] = _same_tensors(directory / "round-trip", directory / "original")
    imported = build(exp)
    import_peft(imported, directory / "hf-made")
    out["hf_made_logits"] = logits_of(imported, tokens)
    out["hf_made_names"] = sorted(name for name, _ in lora_layers(imported))

    layout = exp.megatron_config
    if layout["tensor_model_parallel_size"] == 1 and layout.get("expert_model_parallel_size", 1) == 1:
        from peft import PeftModel

        with disable_adapters(model):
            out["base_logits"] = logits_of(model, tokens)
        base = build(exp)
        state = {k: v for k, v in base.state_dict().items() if not k.endswith("_extra_state")}
        base_state = hf_state_dict(state, _model_shape(base), architecture)
        with torch.no_grad():
            out["hf_base_logits"] = hf_moe_model(architecture, base_state, shared_ffn)(tokens).logits
            for name in ("export", "hf-made"):
                merged = hf_moe_model(architecture, merged_hf_state(base_state, directory / name,
                                                                    architecture), shared_ffn)
                out[f"hf_merged_{name}_logits"] = merged(tokens).logits
                if architecture == "mixtral":
                    peft_model = PeftModel.from_pretrained(
                        hf_moe_model(architecture, base_state), str(directory / name))
                    out[f"peft_{name}_logits"] = peft_model(tokens).logits
    return out


def moe_checkpoint_checks(exp, source: Path):
    """The router / embedding / expert / shared-expert adapter saved at another layout, loaded
    here: consolidated into a bare model, dist-checkpoint into one with other values."""
    from megatron_lora.checkpoint import load_adapter
    from megatron_lora.dist_checkpoint import load_adapter_distributed

    tokens = batches(0)[0][:, :-1]
    model = build(exp)
    load_adapter(model, source / "original")
    out = {"consolidated_logits": logits_of(model, tokens)}
    model = build(exp, random_lora(seed=99, target_modules=HF_MOE_TARGETS))
    before = logits_of(model, tokens)
    load_adapter_distributed(model, source / "dist")
    out["dist_logits"] = logits_of(model, tokens)
    out["dist_changed"] = before is None or not torch.equal(before, out["dist_logits"])
    return out
