#!/usr/bin/env python
"""Loading a Hugging Face checkpoint at TP=2: memory per rank and time, against
transformers' own load of the same directory, and the time to the first step with and
without drawing the model first.

    python scripts/benchmark_hf_load.py [--layers 20] [--dir /tmp/llama-1b]

It writes a Llama-shaped checkpoint of about 1B parameters (bfloat16 shards and an index, as
the hub stores them; random weights, made here) once, then in the same run:

* per rank of a TP=2 gloo job (fp32 model): the growth of anonymous resident memory during
  ``load_hf_weights`` (sampled every 5 ms: file pages that safetensors maps are page cache, not
  the process's memory), against the rank's share of the weights and its largest slice;
* the time of that load, against ``AutoModelForCausalLM.from_pretrained`` of the directory (one
  process, the whole model, the same dtype);
* the time from start to the end of the first forward-backward step with LoRA: the model built
  with ``initialize=False`` (nothing drawn) versus the old path (megatron's initialisation,
  then the layout-invariant draw, then the load).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import script_setup  # noqa: F401  (repository on sys.path, known warnings filtered)
import torch

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)
SEQ, SHARD_BYTES = 64, 500 * 2**20


def make_checkpoint(directory: Path, layers: int) -> int:
    """A Llama checkpoint of random bfloat16 weights in ~500 MB shards with an index (made
    one shard at a time); its parameter count."""
    from safetensors.torch import save_file

    config = dict(SHAPE, architectures=["LlamaForCausalLM"], model_type="llama",
                  num_hidden_layers=layers, hidden_act="silu", rms_norm_eps=1e-5,
                  tie_word_embeddings=False, dtype="bfloat16",
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if (directory / "config.json").is_file():
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        return index["metadata"]["total_parameters"]
    directory.mkdir(parents=True, exist_ok=True)
    h, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = h * SHAPE["num_key_value_heads"] // SHAPE["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
              "lm_head.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, size, files, total = {}, {}, 0, [], 0

    def flush():
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, shape in shapes.items():
        tensor = (torch.ones(shape) if len(shape) == 1 else
                  torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[name], size, total = tensor, size + tensor.numel() * 2, total + tensor.numel()
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * 2, "total_parameters": total},
         "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return total


def _anonymous_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """The largest anonymous resident memory seen while it runs (sampled every 5 ms)."""

    def __enter__(self):
        self.start, self.peak, self._stop = _anonymous_rss(), 0, threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, _anonymous_rss())
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anonymous_rss())


def _first_step(model):
    from megatron_lora.gpt import gpt_forward_inputs

    tokens = torch.randint(0, SHAPE["vocab_size"], (1, SEQ))
    position_ids, mask = gpt_forward_inputs(tokens)
    loss = model(tokens, position_ids, mask, labels=tokens).float().mean()
    loss.backward()


def rank_worker(rank, world, directory, drawn_first):
    import torch.distributed as dist

    from megatron_lora import LoraConfig, apply_lora
    from megatron_lora.gpt import build_gpt_model, initialize_model_parallel
    from megatron_lora.hf import hf_experiment, load_hf_weights

    dist.barrier()
    started = time.perf_counter()
    experiment = hf_experiment(directory, overrides={"megatron_config": {
        "tensor_model_parallel_size": world, "seq_length": SEQ}}, world_size=world)
    initialize_model_parallel(experiment)
    model = build_gpt_model(experiment, initialize=drawn_first)
    share = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    dist.barrier()
    load_started = time.perf_counter()
    with PeakSampler() as sampler:
        load_hf_weights(model, directory, experiment)
    dist.barrier()
    load_s = time.perf_counter() - load_started
    apply_lora(model, LoraConfig(r=16, lora_alpha=32), verbose=False)
    _first_step(model)
    dist.barrier()
    return {"share": share, "largest": largest, "growth": sampler.peak - sampler.start,
            "load_s": load_s, "to_first_step_s": time.perf_counter() - started}


def transformers_load(directory) -> float:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # a table is printed, not a bar
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True,
                                                 dtype=torch.float32)
    elapsed = time.perf_counter() - started
    del model
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20, help="20 layers: about 1.1B parameters")
    parser.add_argument("--dir", default="/tmp/megatron_lora_llama_1b")
    args = parser.parse_args()
    from megatron_lora.cpu import spawn_gloo

    directory = Path(args.dir)
    started = time.perf_counter()
    total = make_checkpoint(directory, args.layers)
    print(f"checkpoint: {directory} ({total / 1e9:.2f}B parameters, bfloat16 shards; made or "
          f"found in {time.perf_counter() - started:.0f} s)", flush=True)
    hf_s = transformers_load(str(directory))
    results = {}
    for drawn_first in (False, True):
        results[drawn_first] = spawn_gloo(rank_worker, 2, args=(str(directory), drawn_first),
                                          timeout=1800)
    GiB = 2**30
    print("\nTP=2, fp32 model; memory: growth of anonymous resident memory during the load")
    print("| rank | its share of the weights | largest slice | memory growth | growth / share |")
    print("|---|---|---|---|---|")
    for rank, r in enumerate(results[False]):
        print(f"| {rank} | {r['share'] / GiB:.2f} GiB | {r['largest'] / GiB:.3f} GiB | "
              f"{r['growth'] / GiB:.2f} GiB | {r['growth'] / r['share']:.2f}× |")
    ours = max(r["load_s"] for r in results[False])
    print(f"\nload time: load_hf_weights at TP=2 {ours:.1f} s vs transformers "
          f"from_pretrained (one process, fp32) {hf_s:.1f} s: {ours / hf_s:.2f}×")
    before = max(r["to_first_step_s"] for r in results[True])
    after = max(r["to_first_step_s"] for r in results[False])
    print(f"start to the end of the first LoRA step: drawn first {before:.1f} s, not drawn "
          f"{after:.1f} s ({before / after:.2f}× faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
