"""Greedy generation with a megatron-core GPT at any TP size (pipeline size 1), and exact-match
scoring of expected answers.

A whole forward per new token (no KV cache): meant for samples and tests, not for serving.
Prompts of different lengths share one batch: each is left-aligned and the rows are padded on
the right. Under causal attention a position never sees the positions after it, so the padding
cannot change what a row generates: each row reads its logits at its own last token and writes
its next token right after it.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch


@torch.no_grad()
def greedy_complete(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop_tokens: Iterable[int] = ()) -> List[List[int]]:
    """The greedy continuation of each prompt (token ids), in one batch.

    A row stops after ``max_new_tokens`` tokens or at the first of ``stop_tokens``, which is
    left out of its result. Every TP rank returns the same lists.
    """
    from megatron.core import parallel_state

    from .gpt import gathered_logits, gpt_forward_inputs

    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("greedy_complete needs pipeline_model_parallel_size 1; load the adapter "
                         "at PP=1 for generation (adapters load at any layout)")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_complete needs at least one prompt and no empty prompt")
    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max()) + max_new_tokens
    seq_limit = getattr(model, "max_sequence_length", None)
    if seq_limit is not None and width > seq_limit:
        raise ValueError(f"the longest prompt ({int(lengths.max())} tokens) + {max_new_tokens} "
                         f"new tokens exceed the model's sequence length {seq_limit}")
    device = next(model.parameters()).device
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)  # right padding: never read
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.as_tensor(prompt)
    tokens, lengths = tokens.to(device), lengths.to(device)
    stop = torch.tensor(sorted(set(int(t) for t in stop_tokens)), dtype=torch.long, device=device)
    start = lengths.clone()
    running = torch.ones(len(prompts), dtype=torch.bool, device=device)
    rows = torch.arange(len(prompts), device=device)

    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        window = tokens[:, :int(lengths.max())]
        position_ids, mask = gpt_forward_inputs(window)
        logits = gathered_logits(model(window, position_ids, mask))
        next_token = logits[rows, lengths - 1].argmax(dim=-1)
        running &= ~torch.isin(next_token, stop)
        # a stopped row keeps its length: its stop token is not part of the result
        tokens[rows[running], lengths[running]] = next_token[running]
        lengths = lengths + running.long()
        if not running.any():
            break
    model.train(was_training)
    return [tokens[row, int(start[row]):int(lengths[row])].tolist() for row in range(len(prompts))]


def answer_line_ends(tokenizer) -> Tuple[int, ...]:
    """The token ids that end a one-line answer: a newline and the end of the document."""
    return (tokenizer.eod, *tokenizer.tokenize("\n"))


@torch.no_grad()
def exact_matches(model, tokenizer, examples: Sequence[Tuple[str, str]], batch_size: int = 64,
                  line_ends: Optional[Sequence[int]] = None) -> List[bool]:
    """For each (prompt, expected answer) text pair: does greedy decoding continue the prompt
    with exactly the answer and then end it? ``line_ends``: the token ids that end an answer
    (default: a newline and the end of the document); an answer must not contain one.

    Greedy decoding gives the answer exactly when, at every step, the most likely next token
    after the prompt and the answer's tokens so far is the answer's next token, and after the
    whole answer a line end. One forward of prompt + answer (teacher forcing) therefore gives
    the verdict of token-by-token generation (up to floating-point rounding) at the cost of
    one generation step.
    """
    from .gpt import gathered_logits, gpt_forward_inputs

    if line_ends is None:
        line_ends = answer_line_ends(tokenizer)
    line_ends = torch.tensor(list(line_ends))
    verdicts: List[bool] = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for first in range(0, len(examples), batch_size):
        batch = [(tokenizer.tokenize(prompt), tokenizer.tokenize(answer))
                 for prompt, answer in examples[first:first + batch_size]]
        width = max(len(p) + len(a) for p, a in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)  # right padding: never read
        for row, (prompt, answer) in enumerate(batch):
            tokens[row, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        position_ids, mask = gpt_forward_inputs(tokens.to(device))
        predicted = gathered_logits(model(tokens.to(device), position_ids, mask)).argmax(-1).cpu()
        for row, (prompt, answer) in enumerate(batch):
            # the predictions after the prompt's last token, ..., after the answer's last token
            guesses = predicted[row, len(prompt) - 1:len(prompt) + len(answer)]
            verdicts.append(guesses[:-1].tolist() == answer and
                            bool(torch.isin(guesses[-1], line_ends)))
    model.train(was_training)
    return verdicts
