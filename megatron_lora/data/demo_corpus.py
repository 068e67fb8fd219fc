"""The demo's corpora: short stories in a small English-like grammar to pretrain on, and a
fine-tuning task in a pattern the stories never show."""

from __future__ import annotations

import json
import os
import random
from typing import Callable, Dict, List, Sequence, Tuple

from ..atomic import write_file_atomically
from .pretraining import _preprocess


# The demo's fine-tuning task: the verb of a sentence in the past tense, one sentence per line,
#     "The red fox sees a dog. -> saw"
# which asks the model to find the verb among the sentence's words and to conjugate it
# (regular and irregular verbs). The pretraining corpus is short stories in a small
# English-like grammar, each told wholly in the present or wholly in the past tense: the base
# learns the words of both tenses and where a verb stands, but it never sees "->" nor a
# present-tense verb next to its past: pairing the tenses is what the adapter has to learn.
# (Rewriting the whole sentence would also need copying from the context, and a base this
# small did not learn to copy within the demo's pretraining budget, even from repetition.)
TASK_SEPARATOR = " ->"

_DETERMINERS = ("the", "a", "my", "your", "her", "his", "our", "that", "this")
_ADJECTIVES = ("small", "big", "red", "old", "young", "happy", "quiet", "green", "brave",
               "tired", "clever", "little", "blue", "kind", "lazy", "bright")
_NOUNS = ("cat", "dog", "bird", "girl", "boy", "farmer", "teacher", "fox", "horse", "king",
          "queen", "child", "sailor", "baker", "rabbit", "owl", "friend", "doctor")
_OBJECTS = ("ball", "book", "apple", "letter", "hat", "song", "cake", "box", "flower", "map",
            "key", "basket", "lamp", "boat", "picture", "coat")
# present -> past, regular and irregular
_TRANSITIVE = {"sees": "saw", "likes": "liked", "finds": "found", "carries": "carried",
               "watches": "watched", "follows": "followed", "paints": "painted", "holds": "held",
               "wants": "wanted", "loves": "loved", "helps": "helped", "visits": "visited",
               "brings": "brought", "takes": "took", "opens": "opened", "draws": "drew"}
_INTRANSITIVE = {"sleeps": "slept", "sings": "sang", "runs": "ran", "waits": "waited",
                 "smiles": "smiled", "dances": "danced", "sits": "sat", "laughs": "laughed",
                 "walks": "walked", "rests": "rested"}
_COPULA = {"is": "was"}
PAST_TENSE = {**_TRANSITIVE, **_INTRANSITIVE, **_COPULA}
_PLACES = ("in the garden", "near the river", "on the hill", "at the market", "under the tree",
           "by the sea", "in the kitchen", "behind the house", "at school", "in the forest")
_TIMES = ("every morning", "at night", "today", "in the evening", "on sunday", "again")


def _noun_phrase(rng: random.Random, nouns) -> str:
    words = [rng.choice(_DETERMINERS)]
    if rng.random() < 0.5:
        words.append(rng.choice(_ADJECTIVES))
    words.append(rng.choice(nouns))
    return " ".join(words)


def _verb_and_complement(rng: random.Random) -> Tuple[str, str]:
    kind = rng.random()
    if kind < 0.55:
        return rng.choice(sorted(_TRANSITIVE)), _noun_phrase(rng, _OBJECTS + _NOUNS)
    if kind < 0.8:
        return rng.choice(sorted(_INTRANSITIVE)), ""
    return "is", rng.choice(_ADJECTIVES)


def _clause(rng: random.Random, adverbials: bool) -> List[str]:
    """A sentence as its parts [subject, present-tense verb, complement, place, time] ('' for
    none), to be rendered in either tense."""
    verb, complement = _verb_and_complement(rng)
    place = rng.choice(_PLACES) if adverbials and rng.random() < 0.5 else ""
    time = rng.choice(_TIMES) if adverbials and rng.random() < 0.3 else ""
    return [_noun_phrase(rng, _NOUNS), verb, complement, place, time]


def _render(parts: Sequence[str], past: bool) -> str:
    subject, verb, *rest = parts
    text = " ".join(p for p in (subject, PAST_TENSE[verb] if past else verb, *rest) if p)
    return text[0].upper() + text[1:] + "."


def _pretrain_document(rng: random.Random) -> str:
    """A story: 2-5 sentences, all in the present or all in the past tense."""
    past = rng.random() < 0.5
    return " ".join(_render(_clause(rng, adverbials=True), past)
                    for _ in range(rng.randint(2, 5)))


def task_line(parts: Sequence[str]) -> str:
    """One fine-tuning line: the sentence, the separator, its verb in the past tense."""
    return f"{_render(parts, past=False)}{TASK_SEPARATOR} {PAST_TENSE[parts[1]]}"


def split_task_line(line: str) -> Tuple[str, str]:
    """(prompt, expected answer) of a fine-tuning line: ("S ->", " <verb in the past tense>")."""
    cut = line.index(TASK_SEPARATOR) + len(TASK_SEPARATOR)
    return line[:cut], line[cut:]


def _task_document(rng: random.Random, exclude=frozenset()) -> str:
    """1-4 task lines; sentences whose prompt is in ``exclude`` (the held-out ones) are skipped."""
    lines: List[str] = []
    for _ in range(rng.randint(1, 4)):
        line = task_line(_clause(rng, adverbials=False))
        while split_task_line(line)[0] in exclude:
            line = task_line(_clause(rng, adverbials=False))
        lines.append(line)
    return "\n".join(lines)


def write_if_changed(path: str, content: str) -> None:
    """Write atomically, and not at all when the file already holds ``content``: an unchanged
    corpus keeps its timestamp, so make_demo_data can tell that its outputs are up to date."""
    data = content.encode("utf-8")
    try:
        with open(path, "rb") as stream:
            if stream.read() == data:
                return
    except FileNotFoundError:
        pass
    write_file_atomically(path, data)


DEMO_CORPORA = ("pretrain", "finetune", "finetune_heldout")


def make_demo_corpora(
    out_dir,
    *,
    seed: int = 0,
    pretrain_docs: int = 5000,
    finetune_docs: int = 5000,
    heldout_docs: int = 200,
) -> Dict[str, str]:
    """Write ``pretrain.jsonl``, ``finetune.jsonl`` and ``finetune_heldout.jsonl`` into
    ``out_dir``; the same arguments always give the same bytes. Returns name -> path.

    pretrain: a story of 2-5 sentences of a small English-like grammar per document, all in the
    present or all in the past tense. finetune and finetune_heldout: 1-4 lines
    ``<present-tense sentence> -> <its verb in the past tense>`` per document, from independent
    random streams; no fine-tuning line has the prompt of a held-out line.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    def documents(name, count, make_document):
        # string seeds are hashed deterministically (not by PYTHONHASHSEED)
        rng = random.Random(f"megatron_lora-demo-{name}-{seed}")
        return [make_document(rng) for _ in range(int(count))]

    texts = {"pretrain": documents("pretrain", pretrain_docs, _pretrain_document),
             "finetune_heldout": documents("finetune_heldout", heldout_docs, _task_document)}
    heldout_prompts = frozenset(split_task_line(line)[0] for text in texts["finetune_heldout"]
                                for line in text.split("\n"))
    texts["finetune"] = documents("finetune", finetune_docs,
                                  lambda rng: _task_document(rng, exclude=heldout_prompts))
    paths = {}
    for name in DEMO_CORPORA:
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        write_if_changed(paths[name], "".join(json.dumps({"text": text}) + "\n"
                                               for text in texts[name]))
    return paths


def demo_data_prefix(out_dir, name: str) -> str:
    """Megatron-LM's naming: ``<out_dir>/<name>_text_document``."""
    return os.path.join(os.fspath(out_dir), f"{name}_text_document")


def make_demo_data(out_dir, *, seed: int = 0, log: Callable[[str], None] = print) -> Dict[str, str]:
    """The demo corpora (make_demo_corpora) tokenized into ``<out_dir>/<name>_text_document``
    ``.bin``/``.idx``. Outputs newer than their JSONL are kept. Returns name -> data prefix."""
    from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

    jsonl = make_demo_corpora(out_dir, seed=seed)
    prefixes = {}
    for name in DEMO_CORPORA:
        prefix = prefixes[name] = demo_data_prefix(out_dir, name)
        outputs = (get_bin_path(prefix), get_idx_path(prefix))
        source_time = os.path.getmtime(jsonl[name])
        if all(os.path.isfile(p) and os.path.getmtime(p) >= source_time for p in outputs):
            log(f"up to date: {prefix}.{{bin,idx}}")
            continue
        _, _, documents, tokens = _preprocess(jsonl[name], prefix, "text", True, None)
        log(f"wrote {prefix}.{{bin,idx}}: {documents} documents, {tokens} tokens "
            f"(from {jsonl[name]})")
    return prefixes
