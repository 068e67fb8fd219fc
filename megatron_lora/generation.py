"""Generation with a megatron-core GPT at any TP size (pipeline size 1), and exact-match
scoring of expected answers.

:func:`generate` prefills each prompt once and then feeds one token per step, keeping the
keys and values in megatron-core's own static KV cache (``StaticInferenceContext``), so the
cost grows linearly with the tokens generated. Greedy by default; ``temperature`` > 0 samples
(with ``top_p``) from seeded generators, one per prompt, so a prompt's draw depends on neither
its batch nor the TP rank: every rank samples from the same gathered logits with the same
seed and the ranks agree without a broadcast.

Ragged batches: megatron's static cache keeps one sequence offset for the whole batch, and its
decode steps attend to every cached position (no mask). Prompts of different lengths would need
padding that the cache would then attend to, so prompts are batched only with prompts of the
same length; each group is exact.

Sequence parallelism changes only how TP ranks split the work, not the result; a one-token
decode step cannot be split over the sequence, so generation runs with SP switched off on the
model (megatron's own static inference does the same) and restores it afterwards.

``use_cache=False`` is the reference: the whole sequence through the model per new token.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from .errors import MegatronLoraError


class GenerationError(MegatronLoraError):
    """A generation request this model or these settings cannot take."""

_SEQUENCE_PARALLEL_ATTRIBUTES = ("sequence_parallel", "scatter_to_sequence_parallel",
                                 "reduce_scatter_embeddings")


def _config_of(model):
    from .model import model_chunks

    return getattr(model_chunks(model)[0], "config", None)


def check_request(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                  temperature: float = 0.0, top_p: float = 1.0, vocab_size: Optional[int] = None,
                  use_cache: bool = True) -> None:
    """Refuse, with the reason, what :func:`generate` cannot do exactly."""
    from megatron.core import parallel_state

    from .model import model_chunks

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp != 1:
        raise GenerationError(f"generation needs pipeline_model_parallel_size 1 (got {pp}); "
                              f"load the model at PP=1 for generation (adapters load at any "
                              f"layout)")
    config = _config_of(model)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if config is not None and getattr(config, "num_moe_experts", None) and tp > 1:
        raise GenerationError(f"generation of a mixture-of-experts model at "
                              f"tensor_model_parallel_size {tp} is not yet compared with TP=1 "
                              f"(its sequence parallelism is switched off to decode); generate "
                              f"at tensor_model_parallel_size 1")
    if use_cache and config is not None and getattr(config, "multi_latent_attention", False):
        raise GenerationError("KV-cached generation of multi-latent attention is refused: the "
                              "local-spec MLA core attention here is causal over its own "
                              "queries only; pass use_cache=False")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("generation needs at least one prompt and no empty prompt")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens {max_new_tokens!r} is invalid: expected an "
                              f"integer >= 0")
    if not temperature >= 0:
        raise GenerationError(f"temperature {temperature!r} is invalid: expected >= 0 "
                              f"(0 is greedy)")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p {top_p!r} is invalid: expected 0 < top_p <= 1")
    model_vocab = getattr(model_chunks(model)[0], "vocab_size", None)
    if vocab_size is not None and (vocab_size < 1 or (model_vocab and vocab_size > model_vocab)):
        raise GenerationError(f"vocab_size {vocab_size} is invalid: expected 1 .. the model's "
                              f"(padded) vocabulary {model_vocab}")
    longest = max(len(p) for p in prompts)
    seq_limit = getattr(model_chunks(model)[0], "max_sequence_length", None)
    if seq_limit is not None and longest + max_new_tokens > seq_limit:
        raise GenerationError(f"the longest prompt ({longest} tokens) + {max_new_tokens} new "
                              f"tokens exceed the model's sequence length {seq_limit}")


@contextlib.contextmanager
def sequence_parallel_off(model):
    """Run the model without sequence parallelism (the same result, TP-only communication),
    then restore every flag: a decode step of one token cannot be split over the sequence."""
    from .model import model_chunks

    switched, configs = [], {}
    for chunk in model_chunks(model):
        for module in chunk.modules():
            state = vars(module)
            for attr in _SEQUENCE_PARALLEL_ATTRIBUTES:
                if state.get(attr) is True:
                    switched.append((module, attr))
            config = state.get("config")
            if getattr(config, "sequence_parallel", False):
                configs[id(config)] = config
    try:
        for module, attr in switched:
            setattr(module, attr, False)
        for config in configs.values():
            config.sequence_parallel = False
        yield
    finally:
        for module, attr in switched:
            setattr(module, attr, True)
        for config in configs.values():
            config.sequence_parallel = True


def _row_generators(seed: int, count: int) -> List[torch.Generator]:
    # one stream per prompt (by its index): a prompt's draws depend on neither its batch nor
    # the TP rank
    from .init import stable_seed

    return [torch.Generator(device="cpu").manual_seed(stable_seed(seed, "generate", row))
            for row in range(count)]


def next_tokens(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generators: Optional[Sequence[torch.Generator]] = None,
                vocab_size: Optional[int] = None) -> torch.Tensor:
    """The next token per row of full-vocabulary ``logits`` [rows, vocab]: argmax when
    ``temperature`` is 0, else a draw from softmax(logits / temperature) restricted to the
    smallest set of most likely tokens whose probability reaches ``top_p`` (one generator per
    row). Never a token id >= ``vocab_size`` (the real vocabulary of a padded model)."""
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # keep a token while the more likely ones before it hold less than top_p (the first always)
    keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p
    sorted_probs = sorted_probs * keep
    picks = [order[row, torch.multinomial(sorted_probs[row], 1, generator=generators[row])]
             for row in range(probs.shape[0])]
    return torch.cat(picks).to(logits.device)


def _generate_group(model, tokens: torch.Tensor, max_new_tokens: int, pick, stop: torch.Tensor,
                    use_cache: bool) -> torch.Tensor:
    """[rows, new] tokens after ``tokens`` [rows, length] (prompts of one length); ends early
    once every row has produced a stop token."""
    from .gpt import gathered_logits, gpt_forward_inputs

    rows, length = tokens.shape
    generated = tokens.new_empty(rows, 0)
    if use_cache:
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(rows, length + max_new_tokens)
    step_input = tokens
    stopped = torch.zeros(rows, dtype=torch.bool, device=tokens.device)
    for _ in range(max_new_tokens):
        if use_cache:
            offset = context.sequence_len_offset
            position_ids = torch.arange(offset, offset + step_input.shape[1],
                                        device=tokens.device).expand(rows, -1)
            # only the last position's logits, gathered over TP (megatron's inference path)
            logits = model(step_input, position_ids, None, inference_context=context,
                           runtime_gather_output=True)[:, -1]
            context.increment_sequence_len_offset(step_input.shape[1])
            context.enable_decode_mode()
        else:
            sequence = torch.cat([tokens, generated], dim=1)
            position_ids, mask = gpt_forward_inputs(sequence)
            logits = gathered_logits(model(sequence, position_ids, mask))[:, -1]
        chosen = pick(logits)
        generated = torch.cat([generated, chosen[:, None]], dim=1)
        step_input = chosen[:, None]
        stopped |= torch.isin(chosen, stop)
        if stopped.all():
            break
    return generated


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             stop_tokens: Iterable[int] = (), temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, vocab_size: Optional[int] = None,
             use_cache: bool = True) -> List[List[int]]:
    """The continuation of each prompt (token ids). Every TP rank returns the same lists.

    A row stops after ``max_new_tokens`` tokens or at the first of ``stop_tokens`` (the
    tokenizer's end of text / end of turn), which is left out of its result. Greedy when
    ``temperature`` is 0, else top-p sampling seeded by ``seed``. ``vocab_size``: the real
    vocabulary of a model whose vocabulary is padded (default: the model's
    ``unpadded_vocab_size`` when it has one); no token id at or above it is produced.
    """
    check_request(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                  vocab_size=vocab_size, use_cache=use_cache)
    from .model import model_chunks

    chunk = model_chunks(model)[0]
    if vocab_size is None:  # a padded vocabulary records its real size on the model
        vocab_size = getattr(chunk, "unpadded_vocab_size", None)
    device = next(chunk.parameters()).device
    stop = torch.tensor(sorted({int(t) for t in stop_tokens}), dtype=torch.long, device=device)
    stop_set = set(stop.tolist())
    generators = _row_generators(seed, len(prompts)) if temperature > 0 else None
    results: List[List[int]] = [[] for _ in prompts]
    by_length = {}
    for row, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(row)

    was_training = model.training
    model.eval()
    try:
        with sequence_parallel_off(model):
            for length, rows in sorted(by_length.items()):
                # exact for equal lengths only: the static cache has one offset per batch
                tokens = torch.tensor([list(prompts[row]) for row in rows], dtype=torch.long,
                                      device=device)
                group_generators = [generators[row] for row in rows] if generators else None

                def pick(logits, group_generators=group_generators):
                    return next_tokens(logits, temperature, top_p, group_generators, vocab_size)

                generated = _generate_group(model, tokens, max_new_tokens, pick, stop, use_cache)
                for index, row in enumerate(rows):
                    out = generated[index].tolist()
                    ends = [i for i, token in enumerate(out) if token in stop_set]
                    results[row] = out[:ends[0]] if ends else out
    finally:
        model.train(was_training)
    return results


def greedy_complete(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop_tokens: Iterable[int] = (), vocab_size: Optional[int] = None,
                    use_cache: bool = True) -> List[List[int]]:
    """The greedy continuation of each prompt (token ids): :func:`generate` at temperature 0."""
    return generate(model, prompts, max_new_tokens, stop_tokens=stop_tokens,
                    vocab_size=vocab_size, use_cache=use_cache)


def answer_line_ends(tokenizer) -> Tuple[int, ...]:
    """The token ids that end a one-line answer: a newline and the end of the document."""
    return (tokenizer.eod, *tokenizer.tokenize("\n"))


@torch.no_grad()
def exact_matches(model, tokenizer, examples: Sequence[Tuple[str, str]], batch_size: int = 64,
                  line_ends: Optional[Sequence[int]] = None,
                  vocab_size: Optional[int] = None) -> List[bool]:
    """For each (prompt, expected answer) text pair: does greedy decoding continue the prompt
    with exactly the answer and then end it? ``line_ends``: the token ids that end an answer
    (default: a newline and the end of the document); an answer must not contain one.
    ``vocab_size``: the real vocabulary of a padded model (padding ids are never predicted).

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
        logits = gathered_logits(model(tokens.to(device), position_ids, mask))
        predicted = next_tokens(logits, vocab_size=vocab_size).cpu()
        for row, (prompt, answer) in enumerate(batch):
            # the predictions after the prompt's last token, ..., after the answer's last token
            guesses = predicted[row, len(prompt) - 1:len(prompt) + len(answer)]
            verdicts.append(guesses[:-1].tolist() == answer and
                            bool(torch.isin(guesses[-1], line_ends)))
    model.train(was_training)
    return verdicts
