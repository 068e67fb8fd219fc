"""megatron_lora.data (and the byte tokenizer): JSONL -> indexed dataset, GPT datasets, batches, demo data."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_lora.data import (
    DEMO_CORPORA,
    PAST_TENSE,
    TASK_SEPARATOR,
    build_gpt_datasets,
    main,
    make_demo_corpora,
    make_demo_data,
    micro_batches,
    preprocess_jsonl,
    split_task_line,
)
from megatron_lora.tokenizers import TOKENIZER_NAME, ByteTokenizer, get_tokenizer

SEQ = 32
REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 200-document pretraining corpus, tokenized: its data prefix."""
    directory = tmp_path_factory.mktemp("corpus")
    paths = make_demo_corpora(directory, pretrain_docs=200, finetune_docs=10, heldout_docs=10)
    prefix = directory / "pretrain_text_document"
    preprocess_jsonl(paths["pretrain"], prefix)
    return prefix


def tokens_of(dataset, count):
    return [dataset[i]["tokens"].tolist() for i in range(count)]


# --- tokenizer --------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_special_ids():
    from megatron.core.tokenizers import MegatronTokenizerBase

    tokenizer = get_tokenizer(TOKENIZER_NAME)
    assert isinstance(tokenizer, ByteTokenizer) and isinstance(tokenizer, MegatronTokenizerBase)
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.eos) == (257, 256, 256)
    assert tokenizer.pad == -1  # megatron's "no pad token"
    assert tokenizer.tokenize("Hi!") == [72, 105, 33]
    for text in ("plain ASCII, with\nnewline", "héllo wörld → 世界 🙂", ""):
        ids = tokenizer.tokenize(text)
        assert all(0 <= i < 256 for i in ids)
        assert tokenizer.detokenize(ids) == text
        assert tokenizer.detokenize(ids + [tokenizer.eod]) == text
    assert tokenizer.detokenize([0xFF, 65]) == "\ufffdA"
    with pytest.raises(ValueError, match="outside"):
        tokenizer.detokenize([257])
    with pytest.raises(ValueError, match="valid names: byte"):
        get_tokenizer("gpt2")


# --- preprocessing ---------------------------------------------------------------------------


def test_preprocess_reads_back_through_megatron(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    texts = ["first document", "zweites Dokument: grüße", "", "last → one"]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts))
                      + "\n\n", encoding="utf-8")  # trailing blank lines are skipped
    tokenizer = ByteTokenizer()
    bin_path, idx_path = preprocess_jsonl(source, tmp_path / "out", json_key="body")
    assert (bin_path, idx_path) == (str(tmp_path / "out.bin"), str(tmp_path / "out.idx"))
    dataset = IndexedDataset(str(tmp_path / "out"))
    assert len(dataset) == len(texts)
    for i, text in enumerate(texts):
        assert dataset[i].tolist() == tokenizer.tokenize(text) + [256]
    assert dataset[0].dtype.name == "uint16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.bin", "out.idx"]

    preprocess_jsonl(source, tmp_path / "noeod", json_key="body", append_eod=False)
    no_eod = IndexedDataset(str(tmp_path / "noeod"))
    # the empty document has no tokens left and is skipped
    assert [no_eod[i].tolist() for i in range(len(no_eod))] == [
        tokenizer.tokenize(t) for t in texts if t]


@pytest.mark.parametrize("lines, where, problem", [
    (['{"text": "ok"}', '{"text": "broken"', '{"text": "ok"}'], 2, "not valid JSON"),
    (['{"text": "ok"}', "", '{"other": "x"}'], 3, "no key 'text'"),
    (['["text"]'], 1, "expected a JSON object"),
    (['{"text": 5}'], 1, "expected a string"),
    (['{"text": "ok"}', '{"text": "\\ud800"}'], 2, "cannot encode"),
])
def test_preprocess_bad_jsonl_names_file_and_line_and_leaves_nothing(tmp_path, lines, where,
                                                                     problem):
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join(lines) + "\n")
    (tmp_path / "out.bin").write_bytes(b"previous")  # an earlier good output survives
    with pytest.raises(ValueError, match=rf"{re.escape(str(source))}:{where}: .*{problem}"):
        preprocess_jsonl(source, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "out.bin"]
    assert (tmp_path / "out.bin").read_bytes() == b"previous"


def test_preprocess_bad_utf8_names_its_line(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_bytes(b'{"text": "a"}\n' * 3000 + b'{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3001: not UTF-8"):
        preprocess_jsonl(source, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]


def test_preprocess_missing_input(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        preprocess_jsonl(missing, tmp_path / "new" / "out")
    assert list(tmp_path.iterdir()) == []


# --- GPT datasets ----------------------------------------------------------------------------


def test_build_gpt_datasets_shapes_sizes_and_split(corpus, tmp_path):
    train, valid, test = build_gpt_datasets(corpus, split="8,2,0", seq_length=SEQ, seed=3,
                                            num_samples=(150, 20, 0), cache_dir=tmp_path)
    assert test is None  # weight 0
    # megatron builds whole epochs: at least the samples asked for
    assert train.num_samples == 150 and len(train) >= 150
    assert valid.num_samples == 20 and len(valid) >= 20
    # 200 documents split 8:2, disjoint
    assert (len(train.indices), len(valid.indices)) == (160, 40)
    assert not set(train.indices.tolist()) & set(valid.indices.tolist())
    sample = train[7]
    assert sample["tokens"].shape == sample["labels"].shape == (SEQ,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert torch.equal(sample["position_ids"], torch.arange(SEQ))
    assert torch.equal(sample["loss_mask"], torch.ones(SEQ))
    assert "attention_mask" not in sample  # the GPT forward builds its own causal mask
    assert any(f.name.endswith("shuffle_index.npy") for f in tmp_path.iterdir())


def test_build_gpt_datasets_same_seed_same_samples(corpus, tmp_path):
    def build(seed, cache):
        return build_gpt_datasets(corpus, split="9,1,0", seq_length=SEQ, seed=seed,
                                  num_samples=(64, 8, 0), cache_dir=tmp_path / cache)

    first, second, other = build(5, "a"), build(5, "b"), build(6, "c")  # separate caches
    assert tokens_of(first[0], 64) == tokens_of(second[0], 64)
    assert tokens_of(first[1], 8) == tokens_of(second[1], 8)
    assert tokens_of(first[0], 64) != tokens_of(other[0], 64)


def test_build_gpt_datasets_default_cache_dir(tmp_path):
    paths = make_demo_corpora(tmp_path, pretrain_docs=20, finetune_docs=1, heldout_docs=1)
    preprocess_jsonl(paths["pretrain"], tmp_path / "data" / "small")
    train, valid, test = build_gpt_datasets(tmp_path / "data" / "small", split="1", seq_length=SEQ,
                                            seed=0, num_samples=(10, 0, 0))
    assert valid is None and test is None and len(train) >= 10
    assert any((tmp_path / "data" / "index-cache").iterdir())


def test_build_gpt_datasets_errors(corpus, tmp_path):
    with pytest.raises(ValueError) as error:
        build_gpt_datasets(tmp_path / "nothing", seq_length=SEQ, seed=0, num_samples=(1, 1, 0))
    assert str(tmp_path / "nothing.bin") in str(error.value)
    assert str(tmp_path / "nothing.idx") in str(error.value)

    half = tmp_path / "half"
    (tmp_path / "half.idx").write_bytes(Path(str(corpus) + ".idx").read_bytes())
    with pytest.raises(ValueError, match="missing [^,]*half.bin$"):
        build_gpt_datasets(half, seq_length=SEQ, seed=0, num_samples=(1, 1, 0))

    kwargs = dict(seq_length=SEQ, seed=0, num_samples=(1, 1, 0), cache_dir=tmp_path)
    for bad in ("a,b", "0,0,0", "1,-1", "1,1,1,1", "inf,1", "nan"):
        with pytest.raises(ValueError, match="split"):
            build_gpt_datasets(corpus, split=bad, **kwargs)
    # 0.1% of 200 documents rounds to none: refused instead of megatron looping forever
    with pytest.raises(ValueError, match="valid split .* no document"):
        build_gpt_datasets(corpus, split="999,1,0", **kwargs)


# --- micro-batches ---------------------------------------------------------------------------


class IndexDataset:
    """Sample i is filled with i: shows exactly which global samples a batch holds."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        row = torch.full((4,), i)
        return {"tokens": row, "labels": row + 1, "loss_mask": torch.ones(4),
                "position_ids": torch.arange(4)}


def sample_ids(batches, count):
    return [next(batches)["tokens"][:, 0].tolist() for _ in range(count)]


def test_micro_batches_global_order_resume_and_dp_ranks():
    data = IndexDataset(10)
    # DP=2, MBS=2: each step takes 4 consecutive samples, rank r the r-th pair; wraps at 10
    rank0 = sample_ids(micro_batches(data, micro_batch_size=2, data_parallel_size=2), 4)
    rank1 = sample_ids(micro_batches(data, micro_batch_size=2, data_parallel_rank=1,
                                     data_parallel_size=2), 4)
    assert rank0 == [[0, 1], [4, 5], [8, 9], [2, 3]]
    assert rank1 == [[2, 3], [6, 7], [0, 1], [4, 5]]
    # resume after 2 steps (8 consumed samples) = continuation of the uninterrupted stream
    resumed = sample_ids(micro_batches(data, micro_batch_size=2, start_sample=8,
                                       data_parallel_size=2), 2)
    assert resumed == rank0[2:]
    for bad in (dict(micro_batch_size=0), dict(micro_batch_size=1, data_parallel_rank=2,
                                               data_parallel_size=2),
                dict(micro_batch_size=1, start_sample=-1)):
        with pytest.raises(ValueError):
            micro_batches(data, **bad)


def test_micro_batches_of_a_gpt_dataset(corpus, tmp_path):
    train, _, _ = build_gpt_datasets(corpus, split="1,0,0", seq_length=SEQ, seed=1,
                                     num_samples=(40, 0, 0), cache_dir=tmp_path)
    stream = micro_batches(train, micro_batch_size=3)
    batches = [next(stream) for _ in range(4)]
    for batch in batches:
        assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert all(t.shape == (3, SEQ) for t in batch.values())
        assert batch["tokens"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
    again = micro_batches(train, micro_batch_size=3, start_sample=6)
    for expected in batches[2:]:
        assert all(torch.equal(expected[k], v) for k, v in next(again).items())
    # DP ranks read disjoint samples of each step
    halves = [next(micro_batches(train, micro_batch_size=3, data_parallel_rank=r,
                                 data_parallel_size=2))["tokens"] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), torch.cat([batches[0]["tokens"],
                                                    batches[1]["tokens"]]))


# --- several ranks at once -------------------------------------------------------------------


def build_on_rank(rank, world_size, prefix, cache_dir):
    """Spawned: every rank builds the datasets at the same time from an empty cache."""
    import torch.distributed as dist

    train, valid, _ = build_gpt_datasets(prefix, split="9,1,0", seq_length=SEQ, seed=11,
                                         num_samples=(50, 10, 0), cache_dir=cache_dir)
    tokens = tokens_of(train, 50) + tokens_of(valid, 10)
    dist.barrier()
    return tokens


def test_datasets_built_on_two_gloo_ranks_agree(corpus, tmp_path):
    from megatron_lora.cpu import spawn_gloo

    per_rank = spawn_gloo(build_on_rank, 2, args=(str(corpus), str(tmp_path / "cache")),
                          timeout=120)
    train, valid, _ = build_gpt_datasets(corpus, split="9,1,0", seq_length=SEQ, seed=11,
                                         num_samples=(50, 10, 0), cache_dir=tmp_path / "single")
    assert per_rank[0] == per_rank[1] == tokens_of(train, 50) + tokens_of(valid, 10)


# --- demo data and command line --------------------------------------------------------------

TASK_LINE = re.compile(r"([A-Z][a-z ]+)\. -> ([a-z]+)")


def corpus_texts(path):
    return [json.loads(line)["text"] for line in Path(path).read_text().splitlines()]


def test_demo_corpora_deterministic_and_sized(tmp_path):
    sizes = dict(pretrain_docs=300, finetune_docs=300, heldout_docs=50)
    first = make_demo_corpora(tmp_path / "a", **sizes)
    second = make_demo_corpora(tmp_path / "b", **sizes)
    other_seed = make_demo_corpora(tmp_path / "c", seed=1, **sizes)
    for name in first:
        assert Path(first[name]).read_bytes() == Path(second[name]).read_bytes()
        assert Path(first[name]).read_bytes() != Path(other_seed[name]).read_bytes()
    assert [len(corpus_texts(first[name])) for name in DEMO_CORPORA] == [300, 300, 50]


@pytest.fixture(scope="module")
def demo_corpora(tmp_path_factory):
    """The demo's own corpora (default sizes): name -> list of document texts."""
    paths = make_demo_corpora(tmp_path_factory.mktemp("demo"))
    return {name: corpus_texts(path) for name, path in paths.items()}


def test_finetune_lines_give_the_verb_of_the_sentence_in_the_past_tense(demo_corpora):
    lines = [line for name in ("finetune", "finetune_heldout")
             for text in demo_corpora[name] for line in text.split("\n")]
    pairs = set()
    for line in lines:
        sentence, answer = TASK_LINE.fullmatch(line).groups()
        assert split_task_line(line) == (f"{sentence}. ->", f" {answer}")
        verbs = [word for word in sentence.split() if word in PAST_TENSE]
        assert len(verbs) == 1 and sentence.split().index(verbs[0]) >= 2, line
        assert answer == PAST_TENSE[verbs[0]]
        pairs.add((verbs[0], answer))
    assert pairs == set(PAST_TENSE.items())  # every verb of the grammar, irregular ones too


def test_heldout_prompts_are_not_in_the_finetuning_data(demo_corpora):
    def prompts(name):
        return {split_task_line(line)[0] for text in demo_corpora[name]
                for line in text.split("\n")}

    heldout, finetune = prompts("finetune_heldout"), prompts("finetune")
    assert len(heldout) > 400 and len(finetune) > 4000
    assert not heldout & finetune


def test_pretraining_never_shows_the_task(demo_corpora):
    pretrain = demo_corpora["pretrain"]
    assert not any(TASK_SEPARATOR.strip() in text or "\n" in text for text in pretrain)
    # each story is in one tense: no present-tense verb stands next to its past
    present_verbs, past_verbs = set(PAST_TENSE), set(PAST_TENSE.values())
    past_stories = 0
    for text in pretrain:
        words = set(text.replace(".", "").split())
        assert not (words & present_verbs and words & past_verbs), text
        past_stories += bool(words & past_verbs)
    assert len(pretrain) / 3 < past_stories < 2 * len(pretrain) / 3


def test_make_demo_data_is_idempotent(tmp_path):
    lines = []
    prefixes = make_demo_data(tmp_path, log=lines.append)
    assert set(prefixes) == {"pretrain", "finetune", "finetune_heldout"}
    assert all(line.startswith("wrote ") for line in lines)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert len(stamps) == 9 and f"{Path(prefixes['finetune']).name}.idx" in stamps
    lines.clear()
    make_demo_data(tmp_path, log=lines.append)
    assert all(line.startswith("up to date") for line in lines) and len(lines) == 3
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps


def test_cli_preprocess_and_errors(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"t": "hello"}, {"t": "world"}])
    assert main(["preprocess", "--input", str(source), "--output-prefix",
                 str(tmp_path / "out"), "--json-key", "t"]) == 0
    assert "2 documents, 12 tokens" in capsys.readouterr().out

    for argv in (["preprocess", "--input", str(tmp_path / "none.jsonl"), "--output-prefix",
                  str(tmp_path / "x")],
                 ["preprocess", "--input", str(source)],
                 ["preprocess", "--input", str(source), "--output-prefix", "x",
                  "--tokenizer", "gpt2"],
                 ["unknown-command"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "x.bin").exists()


# torch's logging format: level letter, date, time, pid, file:line]
TORCH_LOG_LINE = re.compile(r"^[IWE]\d{4} [\d:.]+ +\d+ torch/\S+:\d+\] ")


def test_cli_module_exit_code_on_missing_input(tmp_path):
    missing = tmp_path / "missing.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")  # megatron's import
    result = subprocess.run([sys.executable, "-m", "megatron_lora.data", "preprocess", "--input",
                             str(missing), "--output-prefix", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    # torch's CUDA build on a machine without a CUDA runtime logs one line about that when
    # megatron imports torch.utils.cpp_extension: the environment, not this CLI's output
    ours = [line for line in result.stderr.splitlines() if not TORCH_LOG_LINE.match(line)]
    assert len(ours) == 1 and str(missing) in ours[0], result.stderr
    assert list(tmp_path.iterdir()) == []
