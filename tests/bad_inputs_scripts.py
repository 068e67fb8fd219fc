"""Bad inputs of scripts/pretrain_gpt.py and scripts/finetune_gpt.py (rows of the table in
tests/bad_inputs.py), and the valid inputs they start from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from bad_inputs import BadInput

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {
    "megatron_config": {
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
        "ffn_hidden_size": 128, "vocab_size": 512, "seq_length": 32, "seed": 7,
        "hidden_dropout": 0.0, "attention_dropout": 0.0},
    "lora": {"r": 4, "lora_alpha": 8.0, "target_modules": [
        "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]},
    "training": {"micro_batch_size": 2, "global_batch_size": 2, "lr": 5e-3, "eval_iters": 1,
                 "log_interval": 1, "progress_bar": False},
}


def _script(script, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, flags)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def make_given(directory: Path) -> dict:
    """{name: path}: the demo data, a training YAML, a 2-iteration base and a finished 2-iteration
    LoRA run (checkpoints at 1 and 2) on that base. One process each."""
    data = directory / "data"
    _script("make_demo_data.py", data)
    config = directory / "train.yaml"
    config.write_text(yaml.safe_dump(TRAIN))
    base, run = directory / "base", directory / "run"
    _script("pretrain_gpt.py", "--config", config, "--data-path", data / "pretrain_text_document",
            "--train-iters", 2, "--save", base)
    _script("finetune_gpt.py", "--config", config, "--data-path", data / "finetune_text_document",
            "--train-iters", 2, "--save-interval", 1, "--pretrained-checkpoint", base,
            "--save", run)
    from hf_checks import make_llama_with_tokenizer, make_tokenizer

    hf = make_llama_with_tokenizer(directory / "hf", shards=True)
    big_tokenizer = directory / "big_tokenizer"
    make_tokenizer(big_tokenizer, extra_tokens=800)  # ~1100 tokens: more than the model's 1001
    return {"data": data / "finetune_text_document", "train_config": config, "base": base,
            "run": run, "hf": hf, "big_tokenizer": big_tokenizer}


# --- building rows ------------------------------------------------------------------------------


def _flags(given, workdir, *extra, config=None, save="save"):
    return ["--config", config or given.train_config, "--data-path", given.data,
            "--train-iters", 2, "--save", workdir / save, *extra]


def _yaml(workdir, section, **changes):
    """The training YAML with ``changes`` in ``section`` (a value of None removes nothing: it
    is written as null)."""
    experiment = yaml.safe_load(yaml.safe_dump(TRAIN))
    experiment[section].update(changes)
    path = workdir / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment))
    return path


def with_yaml(section, **changes):
    return lambda w, g: _flags(g, w, config=_yaml(w, section, **changes))


def with_flags(*extra):
    return lambda w, g: _flags(g, w, *extra)


def _copy(source, workdir, name):
    shutil.copytree(source, workdir / name)
    return workdir / name


def _binary_yaml(w, g):
    path = w / "experiment.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    return _flags(g, w, config=path)


def _text_yaml(text):
    def make(w, g):
        path = w / "experiment.yaml"
        path.write_text(text)
        return _flags(g, w, config=path)

    return make


def _run_copy(edit):
    """A copy of the finished run, broken by ``edit(run)``, resumed into itself."""
    def make(w, g):
        run = _copy(g.run, w, "run")
        edit(run)
        return _flags(g, w, "--load", run, save="run")

    return make


def _write(relative, content):
    def edit(run):
        path = run / relative
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return edit


def _truncate(relative, keep=100):
    def edit(run):
        path = run / relative
        path.write_bytes(path.read_bytes()[:keep])

    return edit


def _remove(relative):
    return lambda run: (run / relative).unlink()


def _base_copy(w, g, *, without_description=False):
    base = _copy(g.base, w, "base")
    if without_description:
        (base / "model" / "model_description.json").unlink()
    return base


def _hf_flags(g, w, hf, *extra):
    return ["--pretrained-checkpoint", hf, "--data-path", g.data, "--train-iters", 2,
            "--save", w / "save", "--lora-rank", 4, "--seq-length", 32, *extra]


def _hf_copy(edit=None):
    """A copy of the Hugging Face model directory, broken by ``edit(copy)``."""
    def make(w, g, *extra):
        hf = _copy(g.hf, w, "hf")
        if edit is not None:
            edit(hf)
        return _hf_flags(g, w, hf, *extra)

    return make


def _sft(*rows, byte=False, extra=()):
    """--sft on a JSONL of ``rows`` (one per line): from the Hugging Face model (a chat
    template), or with ``byte`` the byte tokenizer (none)."""
    def make(w, g):
        path = w / "chat.jsonl"
        path.write_text("".join(row + "\n" for row in rows))
        common = ["--sft", "--data-path", path, "--train-iters", 2, "--save", w / "save", *extra]
        if byte:
            return ["--config", g.train_config, *common]
        return ["--pretrained-checkpoint", g.hf, "--lora-rank", 4, "--seq-length", 32, *common]

    return make


_CHAT = json.dumps({"messages": [{"role": "user", "content": "the lazy dog"},
                                 {"role": "assistant", "content": "jumps"}]})


def _edit_config(**changes):
    def edit(hf):
        import json

        config = json.loads((hf / "config.json").read_text())
        config.update(changes)
        (hf / "config.json").write_text(json.dumps(config))

    return edit


def _first_shard(hf) -> Path:
    import json

    index = json.loads((hf / "model.safetensors.index.json").read_text())
    return hf / sorted(set(index["weight_map"].values()))[0]


def _rewrite_first_shard(change):
    def edit(hf):
        from safetensors.torch import load_file, save_file

        shard = _first_shard(hf)
        tensors = load_file(shard)
        change(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})

    return edit


def _narrow_first_tensor(tensors):
    name = sorted(k for k in tensors if tensors[k].dim() == 2)[0]
    tensors[name] = tensors[name][:, :-1].contiguous()


def _drop_first_tensor(tensors):
    del tensors[sorted(tensors)[0]]


def _pickle_only(hf):
    for path in list(hf.glob("*.safetensors")) + [hf / "model.safetensors.index.json"]:
        path.unlink()
    (hf / "pytorch_model.bin").write_bytes(b"not loaded")


def _file(w, name="notes.txt"):
    (w / name).write_text("the user's own file\n")
    return w / name


ROWS = [
    # the YAML file
    BadInput("yaml_missing_file", "finetune",
             lambda w, g: _flags(g, w, config=w / "nope.yaml"), "nope.yaml: the file does not exist"),
    BadInput("yaml_binary_file", "finetune", _binary_yaml,
             "experiment.yaml: the file is not a YAML text file"),
    BadInput("yaml_not_yaml", "finetune", _text_yaml("megatron_config: [unclosed\n"),
             "experiment.yaml: the file is not valid YAML"),
    BadInput("yaml_typo_in_megatron_config", "finetune",
             with_yaml("megatron_config", num_layer=2), "did you mean 'num_layers'"),
    BadInput("yaml_lr_not_a_number", "finetune", with_yaml("training", lr="fast"),
             "training.lr must be a number, got 'fast'"),
    BadInput("yaml_clip_grad_null", "finetune", with_yaml("training", clip_grad=None),
             "training.clip_grad must be a number, got None"),
    BadInput("yaml_train_iters_fraction", "finetune",
             with_yaml("training", train_iters=2.5),
             "training.train_iters must be an integer, got 2.5"),
    BadInput("yaml_progress_bar_not_bool", "finetune",
             with_yaml("training", progress_bar="sometimes"),
             "training.progress_bar must be true or false, got 'sometimes'"),
    BadInput("yaml_unknown_training_key", "finetune",
             with_yaml("training", learning_rate=1e-3),
             "training.learning_rate is not a known key"),
    BadInput("yaml_overwrite_is_a_flag_only", "finetune",
             with_yaml("training", overwrite=True), "training.overwrite is not a known key"),
    BadInput("yaml_vocab_size_overflows", "finetune",
             with_yaml("megatron_config", vocab_size=10**26),
             "megatron_config.vocab_size must be at most 2147483647"),
    BadInput("yaml_vocab_size_in_e_notation", "finetune",
             _text_yaml(yaml.safe_dump(TRAIN).replace("vocab_size: 512", "vocab_size: 1e26")),
             "megatron_config.vocab_size must be an integer, got 1e+26"),
    BadInput("yaml_invalid_regex_target", "finetune",
             with_yaml("lora", target_modules=["re:linear_(qkv"]),
             "'re:linear_(qkv' is not a valid regular expression"),
    BadInput("yaml_excludes_every_target", "finetune",
             with_yaml("lora", exclude_modules=["linear_qkv", "linear_proj", "linear_fc1",
                                                       "linear_fc2"]),
             "the adapter would adapt nothing"),
    BadInput("yaml_unproven_layout_moe_pp2", "finetune",
             with_yaml("megatron_config", num_moe_experts=4,
                       pipeline_model_parallel_size=2),
             "refuse a mixture-of-experts model with pipeline_model_parallel_size > 1"),
    BadInput("yaml_unproven_layout_vpp", "finetune",
             with_yaml("megatron_config", virtual_pipeline_model_parallel_size=2),
             "refuse virtual_pipeline_model_parallel_size"),
    # flags
    BadInput("flag_rank_too_large", "finetune", with_flags("--lora-rank", 10**9),
             "LoRA r=1000000000 is larger than min(in_features, out_features)"),
    BadInput("flag_lr_negative", "finetune", with_flags("--lr", -1),
             "--lr -1.0 / --min-lr 0.0 are invalid"),
    BadInput("flag_warmup_beyond_iters", "finetune", with_flags("--lr-warmup-iters", 10),
             "--lr-warmup-iters 10 is invalid: expected 0 .. --train-iters (2)"),
    BadInput("flag_tp_does_not_divide_world", "finetune",
             with_flags("--tensor-model-parallel-size", 2), "does not divide the world size 1"),
    BadInput("flag_global_batch_not_a_multiple", "finetune",
             with_flags("--global-batch-size", 3), "--global-batch-size 3 is not a multiple"),
    BadInput("flag_vocab_below_tokenizer", "finetune", with_flags("--vocab-size", 128),
             "has 257 tokens, more than the model's vocab_size 128"),
    BadInput("flag_missing_data", "finetune",
             lambda w, g: ["--config", g.train_config, "--data-path", w / "nope", "--save",
                           w / "save", "--train-iters", 2], "nope.bin, "),
    # --save: never over another run, the base or the user's files
    BadInput("save_holds_another_run", "finetune",
             lambda w, g: _copy(g.run, w, "run") and _flags(g, w, save="run"),
             "holds another run (at iteration 2); resume it with --load"),
    BadInput("save_is_the_pretrained_checkpoint", "finetune",
             lambda w, g: _flags(g, w, "--pretrained-checkpoint", _base_copy(w, g), save="base"),
             "overlaps --pretrained-checkpoint"),
    BadInput("save_is_inside_the_pretrained_checkpoint", "finetune",
             lambda w, g: _flags(g, w, "--pretrained-checkpoint", _base_copy(w, g),
                                 save="base/lora"), "overlaps --pretrained-checkpoint"),
    BadInput("save_is_a_file", "finetune",
             lambda w, g: _file(w) and _flags(g, w, save="notes.txt"), "is a file, not a directory"),
    BadInput("save_under_a_file", "finetune",
             lambda w, g: _file(w) and _flags(g, w, save="notes.txt/run"),
             "cannot be made: "),
    BadInput("save_holds_the_users_files", "finetune",
             lambda w, g: _file(w) and ["--config", g.train_config, "--data-path", g.data,
                                        "--train-iters", 2, "--save", w],
             "holds files that are not a run of these scripts (notes.txt)"),
    # --load: a damaged or foreign checkpoint
    BadInput("load_not_a_checkpoint", "finetune",
             lambda w, g: _file(w) and _flags(g, w, "--load", w), "is not a checkpoint directory"),
    BadInput("load_latest_points_at_missing_iteration", "finetune",
             _run_copy(_write("latest_checkpointed_iteration.txt", "9\n")),
             "points at iteration 9, but"),
    BadInput("load_latest_is_not_a_number", "finetune",
             _run_copy(_write("latest_checkpointed_iteration.txt", "two\n")),
             "holds 'two', not an iteration number"),
    BadInput("load_truncated_rank_state", "finetune",
             _run_copy(_truncate("iter_0000002/rank_00000.safetensors")),
             "rank_00000.safetensors cannot be read"),
    BadInput("load_missing_rank_state", "finetune",
             _run_copy(_remove("iter_0000002/rank_00000.safetensors")),
             "rank_00000.safetensors is missing"),
    BadInput("load_damaged_trainer_state", "finetune",
             _run_copy(_write("iter_0000002/trainer_state.json", "{\"iteration\": ")),
             "trainer_state.json is damaged"),
    BadInput("load_truncated_adapter", "finetune",
             _run_copy(_truncate("iter_0000002/adapter/adapter_model.safetensors")),
             "adapter_model.safetensors is truncated"),
    BadInput("load_lora_run_into_full_training", "pretrain",
             lambda w, g: _copy(g.run, w, "run") and _flags(g, w, "--load", w / "run", save="run"),
             "a LoRA training checkpoint cannot resume a full run"),
    # --pretrained-checkpoint: another model, or a longer sequence than it was trained on
    BadInput("base_is_not_a_checkpoint", "finetune",
             lambda w, g: _file(w) and _flags(g, w, "--pretrained-checkpoint", w),
             "holds no megatron dist-checkpoint"),
    BadInput("base_of_another_hidden_size", "finetune",
             lambda w, g: _flags(g, w, "--pretrained-checkpoint", _base_copy(w, g),
                                 "--hidden-size", 128),
             "holds another model (hidden_size: checkpoint 64, this run 128)"),
    BadInput("base_without_description_of_another_size", "finetune",
             lambda w, g: _flags(g, w, "--pretrained-checkpoint",
                                 _base_copy(w, g, without_description=True), "--hidden-size", 128),
             "does not fit this model"),
    BadInput("base_trained_on_shorter_sequences", "finetune",
             lambda w, g: _flags(g, w, "--pretrained-checkpoint", _base_copy(w, g),
                                 "--seq-length", 64),
             "--seq-length 64 is longer than the base was trained with (32"),
    BadInput("lora_load_with_another_rank", "finetune",
             lambda w, g: _flags(g, w, "--lora-load", g.run / "adapter", "--lora-rank", 8),
             "holds an adapter with r=4, the flags ask for r=8"),
    BadInput("lora_load_with_other_targets", "finetune",
             lambda w, g: _flags(g, w, "--lora-load", g.run / "adapter",
                                 "--lora-target-modules", "linear_qkv"),
             "adapts 8 modules; the flags target ['linear_qkv']"),
    BadInput("lora_load_not_an_adapter", "finetune",
             lambda w, g: _file(w) and _flags(g, w, "--lora-load", w), "--lora-load: "),
    # a Hugging Face --pretrained-checkpoint (docs/hf.md)
    BadInput("hf_unsupported_model_type", "finetune", _hf_copy(_edit_config(model_type="gpt2")),
             "model_type 'gpt2' is not supported; supported: llama, mistral"),
    BadInput("hf_config_not_json", "finetune",
             _hf_copy(lambda hf: (hf / "config.json").write_text("{not json")),
             "config.json is not valid JSON"),
    BadInput("hf_config_missing", "finetune",
             _hf_copy(lambda hf: (hf / "config.json").unlink()),
             "is no Hugging Face model directory (no config.json)"),
    BadInput("hf_shard_missing", "finetune", _hf_copy(lambda hf: _first_shard(hf).unlink()),
             "is missing (named by model.safetensors.index.json)"),
    BadInput("hf_tensor_missing", "finetune", _hf_copy(_rewrite_first_shard(_drop_first_tensor)),
             "cannot be read"),
    BadInput("hf_tensor_of_the_wrong_shape", "finetune",
             _hf_copy(_rewrite_first_shard(_narrow_first_tensor)),
             "but config.json's model needs"),
    BadInput("hf_only_pickle_weights", "finetune", _hf_copy(_pickle_only),
             "pytorch_model.bin, pickle files, which are never loaded here"),
    BadInput("hf_flag_contradicts_config", "finetune",
             lambda w, g: _hf_copy()(w, g, "--hidden-size", 128),
             "hidden_size 128 contradicts"),
    BadInput("hf_sliding_window_would_act", "finetune", _hf_copy(_edit_config(sliding_window=16)),
             "sliding_window 16 is not supported: it would act at a sequence length of 32"),
    BadInput("hf_rope_type_megatron_lacks", "finetune",
             _hf_copy(_edit_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                    "factor": 4.0})),
             "rope_type 'yarn' is not supported"),
    BadInput("hf_tokenizer_model_missing", "finetune",
             lambda w, g: _hf_copy()(w, g, "--tokenizer-model", w / "nothing"),
             "is not a directory"),
    BadInput("hf_tokenizer_larger_than_the_model", "finetune",
             lambda w, g: _hf_copy()(w, g, "--tokenizer-model", g.big_tokenizer),
             "more than the model's vocab_size 1001"),
    # instruction data (--sft, docs/sft.md): every bad row names its file and line
    BadInput("sft_row_not_json", "finetune", _sft(_CHAT, "{not json"),
             "chat.jsonl:2: not valid JSON"),
    BadInput("sft_row_without_answer", "finetune",
             _sft(_CHAT, json.dumps({"prompt": "the lazy dog", "response": ""})),
             "chat.jsonl:2: no assistant content"),
    BadInput("sft_unknown_role", "finetune",
             _sft(json.dumps({"messages": [{"role": "robot", "content": "hi"},
                                           {"role": "assistant", "content": "jumps"}]})),
             "chat.jsonl:1: message 0 has role 'robot'; valid roles: system, user, assistant"),
    BadInput("sft_messages_without_chat_template", "finetune", _sft(_CHAT, byte=True),
             "chat.jsonl:1: a 'messages' conversation needs a tokenizer with a chat template"),
    BadInput("sft_too_long_refused", "finetune",
             _sft(_CHAT, json.dumps({"prompt": "the lazy dog " * 20, "response": "jumps"}),
                  extra=("--sft-no-truncation",)),
             "chat.jsonl:2: the conversation is longer than --seq-length 32"),
    BadInput("sft_indexed_dataset_given", "finetune",
             lambda w, g: ["--config", g.train_config, "--sft", "--data-path", g.data,
                           "--train-iters", 2, "--save", w / "save"],
             "(--sft reads JSONL files, not indexed-dataset prefixes)"),
    BadInput("sft_blend_without_weights", "finetune",
             lambda w, g: _sft(_CHAT)(w, g) + ["--data-path", w / "chat.jsonl", w / "chat.jsonl"],
             "--data-path takes one file, or weight-file pairs (W1 F1 W2 F2 ...); the weight "),
    BadInput("sft_packing_without_sft", "finetune", with_flags("--sft-sequence-packing"),
             "are for instruction data: add --sft"),
]
