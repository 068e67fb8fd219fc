"""Instruction-data checks that run inside spawned gloo process groups: the loss is the mean
over the counted tokens of the global batch however the batch is cut (micro-batches, DP), and
packed conversations give the loss and LoRA gradients of the same conversations unpacked.
Only numbers travel back; the assertions live in tests/test_sft.py."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from gpt_checks import TINY_GPT, build, experiment, full_factors, random_lora

SEQ = 32
CONVERSATIONS = 8


def conversations():
    """8 conversations of skewed lengths (4..33 tokens), each with a prompt and one or two
    answers of different lengths, so that a per-micro-batch mean would weigh them wrongly."""
    generator = torch.Generator().manual_seed(7)
    lengths = [33, 5, 12, 4, 20, 7, 26, 9]
    result = []
    for index, length in enumerate(lengths):
        ids = torch.randint(0, TINY_GPT["vocab_size"], (length,), generator=generator)
        counted = torch.zeros(length, dtype=torch.bool)
        counted[length // 2:] = True  # the answer: the second half
        if index % 3 == 0 and length > 8:  # two turns: an earlier, shorter answer too
            counted[1:3] = True
        result.append((ids, counted))
    return result


def dataset(pack: bool, loss_on_all_tokens: bool = False):
    from megatron_lora.data.instructions import InstructionDataset

    return InstructionDataset(conversations(), seq_length=SEQ, seed=0, num_samples=None,
                              pack=pack, loss_on_all_tokens=loss_on_all_tokens, pad_id=0)


def one_step(model, samples, micro_batch_size, dp_rank, dp_size, positions=None):
    """The trainer's own step (run_micro_batches + finalize_gradients) over one global batch:
    (loss, counted tokens, every LoRA factor's full gradient, grad norm)."""
    from megatron_lora.data import micro_batches
    from megatron_lora.grad_sync import finalize_gradients
    from megatron_lora.training.loop import run_micro_batches

    count = len(samples) // (micro_batch_size * dp_size)
    stream = micro_batches(samples, micro_batch_size=micro_batch_size,
                           data_parallel_rank=dp_rank, data_parallel_size=dp_size)
    batches = [next(stream) for _ in range(count)]
    for param in model.parameters():
        param.grad = None
    exp = SimpleNamespace(seq_length=SEQ)
    loss_sum, tokens = run_micro_batches(model, batches,
                                         SimpleNamespace(micro_batch_size=micro_batch_size), exp,
                                         forward_only=False, positions=positions)
    params = [p for p in model.parameters() if p.requires_grad]
    norm = finalize_gradients(model, params, True, clip_grad=0.0)
    return {"loss": loss_sum / tokens, "tokens": tokens,
            "grads": full_factors(model, grads=True), "grad_norm": norm}


def _model(tp, sp):
    exp = experiment(tp, 1, sp, seq_length=SEQ)
    return build(exp, random_lora())


def world_one(rank, world):
    """References at one process: 1 x 8, 2 x 4, 8 x 1 and packed."""
    from megatron_lora.positions import RestartedPositions

    model = _model(1, False)
    unpacked = dataset(pack=False)
    packed = dataset(pack=True)
    results = {f"{mbs}x{CONVERSATIONS // mbs}": one_step(model, unpacked, mbs, 0, 1)
               for mbs in (8, 4, 1)}
    results["packed"] = one_step(model, packed, len(packed), 0, 1,
                                 RestartedPositions.install(model))
    results["packed_samples"] = len(packed)
    results["rotary"], results["rotary_outside"] = _rotary_reindexing(model)
    return results


def _rotary_reindexing(model):
    """(table for positions 0..5, the table inside restarted() for two position rows, those
    rows) and whether the table is unchanged outside restarted()."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_lora.positions import RestartedPositions

    rotary = next(m for m in model.modules() if type(m) is RotaryEmbedding)
    positions = RestartedPositions.install(model)
    table = rotary(6).clone()
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    with positions.restarted(position_ids):
        restarted = rotary(6).clone()
    return (table, restarted, position_ids), torch.equal(rotary(6), table)


def world_two(rank, world):
    """DP = 2 (TP = 1) on the unpacked batch; TP = 2 + SP unpacked and packed."""
    from megatron_lora.positions import RestartedPositions

    results = {"dp2": one_step(_model(1, False), dataset(pack=False), 4, rank, 2)}
    model = _model(2, True)
    results["tp2-sp"] = one_step(model, dataset(pack=False), CONVERSATIONS, 0, 1)
    packed = dataset(pack=True)
    results["tp2-sp-packed"] = one_step(model, packed, len(packed), 0, 1,
                                        RestartedPositions.install(model))
    return results
