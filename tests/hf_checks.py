"""Hugging Face models made by transformers, read into megatron-core at several layouts.

``make_family_models`` (the test process) builds a tiny random model of every supported family
with transformers itself, perturbs every parameter (no norm weight stays 1), saves it with
``save_pretrained`` and records transformers' own fp32 logits and per-token loss.
``run_all`` (spawned ranks) builds each family's megatron GPT from config.json at each layout
of LAYOUTS, loads the weights with ``load_hf_weights`` and returns the logits the user would
see (gathered over TP, padded vocabulary cut), the per-token loss, and which slices each rank
read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

SEQ, BATCH = 16, 2
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
              rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# family -> (config class, model class, what differs from COMMON)
FAMILIES = {
    # Llama 3.1's rope scaling and a vocabulary TP=2 does not divide (padded to 1024)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(vocab_size=1001, rope_parameters=LLAMA3_ROPE)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4096, head_dim=16)),
    # q/k/v biases, tied embeddings
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    # per-head q/k norms, a head size that is not hidden / heads
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2)),
    # shared expert with its sigmoid gate, softmax then top-k without renormalising
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                       shared_expert_intermediate_size=80, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                       norm_topk_prob=True, head_dim=32)),
}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
# (name, megatron_config overrides); all run in one world of 2 ranks (TP=1 is two replicas)
DENSE_LAYOUTS = {
    "tp1": {},
    "tp2-sp": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    "pp2": {"pipeline_model_parallel_size": 2},
}
MOE_LAYOUTS = {
    "tp1": {},
    "ep2": {"expert_model_parallel_size": 2, "moe_token_dispatcher_type": "alltoall"},
    "tp2-sp-ep2": {"tensor_model_parallel_size": 2, "sequence_parallel": True,
                   "expert_model_parallel_size": 2, "expert_tensor_parallel_size": 1,
                   "moe_token_dispatcher_type": "alltoall"},
}
WORLD = 2


def layouts_of(family: str) -> Dict[str, dict]:
    return MOE_LAYOUTS if family in MOE else DENSE_LAYOUTS


@dataclass
class FamilyModel:
    directory: str
    tokens: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor  # transformers' own
    loss: torch.Tensor  # per token


def make_family_models(root: Path) -> Dict[str, FamilyModel]:
    import transformers

    made = {}
    for index, (family, (config_name, model_name, extra)) in enumerate(FAMILIES.items()):
        torch.manual_seed(100 + index)
        config = getattr(transformers, config_name)(**{**COMMON, **extra})
        model = getattr(transformers, model_name)(config).float().eval()
        with torch.no_grad():
            for param in model.parameters():  # every weight away from its initial value
                param.add_(torch.randn_like(param) * 0.05)
        directory = root / family
        # sharded with an index for the MoE families, one file for the others
        model.save_pretrained(directory, max_shard_size="300KB" if family in MOE else "1GB")
        vocab = config.vocab_size
        tokens = torch.randint(0, vocab, (BATCH, SEQ))
        labels = torch.randint(0, vocab, (BATCH, SEQ))
        with torch.no_grad():
            logits = model(tokens).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1),
                                                 reduction="none").reshape(BATCH, SEQ)
        made[family] = FamilyModel(str(directory), tokens, labels, logits, loss)
    return made


def transformers4_spelling(directory: Path, target: Path) -> Path:
    """A copy of a model directory whose config.json spells the rope settings as transformers 4
    did: rope_theta (and rope_scaling) at the top level, no rope_parameters."""
    import shutil

    shutil.copytree(directory, target)
    config = json.loads((target / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope
    (target / "config.json").write_text(json.dumps(config))
    return target


@dataclass
class LayoutResult:
    logits: Optional[torch.Tensor] = None  # on the last stage
    loss: Optional[torch.Tensor] = None
    # (tensor name, elements read, elements in the tensor) of every read this rank made
    reads: List[tuple] = field(default_factory=list)


def _forward(model, tokens, labels):
    """(logits, loss) on the last pipeline stage (None elsewhere); stages pass activations
    point to point."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_lora.gpt import gathered_logits, gpt_forward_inputs

    position_ids, mask = gpt_forward_inputs(tokens)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp > 1:
        first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
        group_ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
        stage = parallel_state.get_pipeline_model_parallel_rank()
        if not first:
            hidden = torch.empty(SEQ, BATCH, model.config.hidden_size)
            dist.recv(hidden, src=group_ranks[stage - 1])
            model.set_input_tensor(hidden)
        out = model(tokens, position_ids, mask)
        if not last:
            dist.send(out.contiguous(), dst=group_ranks[stage + 1])
            return None, None
        model.set_input_tensor(hidden)
        loss = model(tokens, position_ids, mask, labels=labels)
        return gathered_logits(out, vocab_size=getattr(model, "unpadded_vocab_size", None)), loss
    logits = model(tokens, position_ids, mask)
    loss = model(tokens, position_ids, mask, labels=labels)
    vocab = getattr(model, "unpadded_vocab_size", None)
    return gathered_logits(logits, vocab_size=vocab), loss


def run_all(rank: int, world: int, models: Dict[str, FamilyModel]):
    """{family: {layout: LayoutResult}} on this rank."""
    from megatron_lora import hf
    from megatron_lora.gpt import build_gpt_model, initialize_model_parallel

    reads: List[tuple] = []
    original_read = hf.HFCheckpoint.read

    def recording_read(self, name, rows=None, cols=None):
        out = original_read(self, name, rows, cols)
        total = 1
        for size in self.shape(name):
            total *= size
        reads.append((name, out.numel(), total))
        return out

    hf.HFCheckpoint.read = recording_read
    results: Dict[str, Dict[str, LayoutResult]] = {}
    for family, made in models.items():
        results[family] = {}
        for layout, overrides in layouts_of(family).items():
            experiment = hf.hf_experiment(
                made.directory, overrides={"megatron_config": {**overrides, "seq_length": SEQ}},
                world_size=world)
            initialize_model_parallel(experiment)
            model = build_gpt_model(experiment, initialize=False)
            reads.clear()
            hf.load_hf_weights(model, made.directory, experiment)
            model.eval()
            with torch.no_grad():
                logits, loss = _forward(model, made.tokens, made.labels)
            results[family][layout] = LayoutResult(logits, loss, list(reads))
    hf.HFCheckpoint.read = original_read
    return results


# --- a small Hugging Face model with its own tokenizer, for the scripts -----------------------

TOKENIZER_TEXT = ["the quick brown fox jumps over the lazy dog", "a cat sat on the mat",
                  "every good boy does fine", "she sells sea shells by the sea shore"]


def make_tokenizer(directory: Path, extra_tokens: int = 0):
    """A byte-level BPE tokenizer made with the tokenizers library (what a hub model ships as
    tokenizer.json), with an EOS token and a chat template; saved for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TOKENIZER_TEXT * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|end|>")
    if extra_tokens:
        fast.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|end|>"
                          "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    fast.save_pretrained(directory)
    return fast


def make_llama_with_tokenizer(directory: Path, vocab_size: int = 1001, shards: bool = False):
    """A tiny random Llama (vocabulary 1001: TP=2 does not divide it) saved by transformers,
    with its tokenizer beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "vocab_size": vocab_size, "max_position_embeddings": 64})
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(directory, max_shard_size="200KB" if shards else "1GB")
    make_tokenizer(directory)
    return directory
