"""megatron_lora.generation: batched greedy completion equals one prompt at a time, and the
exact-match accuracy built on it."""

import pytest
import torch

from gpt_checks import experiment

PROMPTS = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 6], [11], [2, 3, 5, 7, 11]]  # lengths differ
NEW_TOKENS = 6


def one_token_at_a_time(model, prompt, new_tokens):
    """The reference: the whole sequence through the model per token, argmax of the last."""
    from megatron_lora.gpt import gathered_logits, gpt_forward_inputs

    tokens = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new_tokens):
            position_ids, mask = gpt_forward_inputs(tokens)
            logits = gathered_logits(model(tokens, position_ids, mask))
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    return tokens[0, len(prompt):].tolist()


def generate_on_rank(rank, world):
    """Spawned at TP=1: the same tiny GPT, generated from in several ways."""
    from megatron_lora.data import ByteTokenizer
    from megatron_lora.generation import exact_matches, greedy_complete
    from megatron_lora.gpt import build_gpt_model, initialize_model_parallel

    exp = experiment(1, 1, False)
    initialize_model_parallel(exp)
    model = build_gpt_model(exp)
    model.eval()
    out = {"reference": [one_token_at_a_time(model, p, NEW_TOKENS) for p in PROMPTS],
           "batched": greedy_complete(model, PROMPTS, NEW_TOKENS),
           "single": [greedy_complete(model, [p], NEW_TOKENS)[0] for p in PROMPTS]}
    stop = out["reference"][0][2]  # the third token of the first row: it stops there
    out["stop"] = stop
    out["stopped"] = greedy_complete(model, PROMPTS, NEW_TOKENS, stop_tokens=[stop])

    # exact_matches (teacher forcing) against its definition: greedy generation that gives
    # the answer and then a line end; here the line end is a token the model does generate
    tokenizer = ByteTokenizer()
    texts = ["ab", "hello", "x y", "zz", "abc"]
    prompts = [tokenizer.tokenize(t) for t in texts]
    continued = greedy_complete(model, prompts, 5)
    line_end = continued[0][2]
    examples = []
    for text, row in zip(texts, continued):
        first_end = row.index(line_end) if line_end in row else len(row)
        # answers never hold a line end (generation would have stopped there)
        for length in sorted({min(2, first_end), first_end}):
            examples.append((text, tokenizer.detokenize(row[:length])))
    examples.append((texts[0], examples[0][1] + "q"))  # a wrong answer
    out["exact_matches"] = exact_matches(model, tokenizer, examples, batch_size=3,
                                         line_ends=[line_end])
    out["generated_matches"] = [
        greedy_complete(model, [tokenizer.tokenize(prompt)], len(answer) + 1,
                        stop_tokens=[line_end])[0] == tokenizer.tokenize(answer)
        for prompt, answer in examples]
    with pytest.raises(ValueError, match="sequence length"):
        greedy_complete(model, PROMPTS, exp.seq_length)
    return out


@pytest.fixture(scope="module")
def generated():
    from megatron_lora.cpu import spawn_gloo

    return spawn_gloo(generate_on_rank, 1, timeout=240)[0]


def test_batched_greedy_equals_one_prompt_at_a_time(generated):
    assert generated["batched"] == generated["single"] == generated["reference"]
    # the prompts do continue differently: the rows are not trivially equal
    assert len({tuple(row) for row in generated["reference"]}) > 1


def test_rows_stop_at_their_own_first_stop_token(generated):
    stop = generated["stop"]
    expected = [row[:row.index(stop)] if stop in row else row for row in generated["reference"]]
    assert generated["stopped"] == expected
    assert len(generated["stopped"][0]) <= 2 < NEW_TOKENS


def test_exact_matches_is_the_verdict_of_greedy_generation(generated):
    verdicts = generated["exact_matches"]
    assert verdicts == generated["generated_matches"]
    assert True in verdicts and False in verdicts
