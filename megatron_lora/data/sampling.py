"""The order in which a data-parallel rank reads samples: Megatron's pretraining sampler."""

from __future__ import annotations

from typing import Dict, Iterator

import torch

from ..errors import DataError


def micro_batches(
    dataset,
    *,
    micro_batch_size: int,
    start_sample: int = 0,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
) -> Iterator[Dict[str, torch.Tensor]]:
    """Endless micro-batches of one data-parallel rank: dicts of [micro_batch_size, seq] tensors,
    one per key of the samples (each sample a dict of same-shaped tensors under the same keys).

    The k-th micro-batch of DP rank r holds global samples
    ``start_sample + k*dp*mbs + r*mbs + j`` (j < mbs), modulo ``len(dataset)`` -- Megatron's
    pretraining sampler order: each step of dp*mbs samples is cut into consecutive slices, one
    per DP rank. Restarting with ``start_sample = consumed_samples`` continues an interrupted
    stream exactly; TP/PP ranks of one DP rank get the same batches.
    """
    micro_batch_size, start_sample = int(micro_batch_size), int(start_sample)
    data_parallel_rank, data_parallel_size = int(data_parallel_rank), int(data_parallel_size)
    if micro_batch_size < 1:
        raise DataError(f"micro_batch_size must be positive, got {micro_batch_size}")
    if start_sample < 0:
        raise DataError(f"start_sample must be >= 0, got {start_sample}")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise DataError(f"data_parallel_rank {data_parallel_rank} is not in "
                         f"[0, {data_parallel_size})")
    if dataset is None or len(dataset) == 0:
        raise DataError("micro_batches needs a non-empty dataset")

    def generate():
        size = len(dataset)
        base = start_sample + data_parallel_rank * micro_batch_size
        stride = data_parallel_size * micro_batch_size
        while True:
            samples = [dataset[(base + j) % size] for j in range(micro_batch_size)]
            # every key the samples carry: instruction samples have more than GPTDataset's
            yield {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
                   for key in samples[0]}
            base += stride

    # a generator function would check the arguments only at the first next()
    return generate()
