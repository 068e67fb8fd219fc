"""Bad inputs that would put a NaN into a run or mix two runs (rows of tests/bad_inputs.py's
table): non-finite settings, non-finite or doubled factors in an adapter or a PEFT file, a
resume with settings other than the run's, and an indexed dataset whose .idx does not describe
its .bin or whose tokens fall outside the vocabulary."""

from __future__ import annotations

import hashlib
import json
import shutil

from bad_inputs import BadInput
from bad_inputs_cli import PEFT_KEY, _edited_tensors, _peft_config, _peft_tensors
from bad_inputs_scripts import TRAIN, _flags, _run_copy, _write, with_flags, with_yaml

NAN = float("nan")
A_FACTOR = "decoder.layers.1.self_attention.linear_qkv.lora_A.weight"


def _poison(key):
    """Put a NaN into the tensor ``key`` (the file stays a valid safetensors file)."""
    def edit(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = NAN
    return edit


def _adapter_with_nan(source, workdir):
    """A copy of an adapter directory with a NaN in one factor and a matching sha256: what a
    diverged run's save would hold, not a damaged copy."""
    adapter = _edited_tensors(source, workdir, "nan_adapter", _poison(A_FACTOR))
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["weights_sha256"] = hashlib.sha256(
        (adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    config_path.write_text(json.dumps(config))
    return adapter


def _duplicate_unprefixed(key):
    """The factor ``key`` a second time, without PEFT's base_model.model. prefix."""
    def edit(tensors):
        tensors[key[len("base_model.model."):]] = tensors[key].clone() * 2
    return edit


def _resume(*extra):
    """The finished run, resumed into itself with ``extra`` flags."""
    def make(w, g):
        return _run_copy(lambda run: None)(w, g) + list(extra)
    return make


def _other_data_in_record(run):
    """The run's record says its .idx had other content when it saved (as if the corpus was
    re-made in place since)."""
    path = run / "iter_0000002" / "trainer_state.json"
    info = json.loads(path.read_text())
    content = info["run"]["data_path"]["content"]
    idx = next(key for key in content if key.endswith(".idx"))
    content[idx] = "12 bytes, sha256 " + "0" * 64
    path.write_text(json.dumps(info))


def _data_copy(w, g, edit):
    """A copy of the run's indexed dataset under the row's directory, broken by ``edit(bin,
    idx)``; the run's flags with it as --data-path."""
    prefix = w / "data" / "corpus"
    prefix.parent.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copyfile(f"{g.data}{suffix}", f"{prefix}{suffix}")
    edit(prefix.with_suffix(".bin"), prefix.with_suffix(".idx"))
    return _flags(g, w) + ["--data-path", prefix]


def _token_past_vocab(bin_path, idx_path):
    data = bytearray(bin_path.read_bytes())  # the byte tokenizer's ids are uint16
    data[200:202] = (TRAIN["megatron_config"]["vocab_size"] + 100).to_bytes(2, "little")
    bin_path.write_bytes(bytes(data))


def _truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def _other_index(g):
    def edit(bin_path, idx_path):
        pretrain = g.data.parent / "pretrain_text_document.idx"
        shutil.copyfile(pretrain, idx_path)
    return edit


ROWS = [
    # every float setting is finite (flags and YAML alike)
    BadInput("numbers_lr_inf", "finetune", with_flags("--lr", "inf"),
             "--lr inf is invalid: expected a finite number"),
    BadInput("numbers_min_lr_nan", "finetune", with_flags("--min-lr", "nan"),
             "--min-lr nan is invalid: expected a finite number"),
    BadInput("numbers_weight_decay_nan", "finetune", with_flags("--weight-decay", "nan"),
             "--weight-decay nan is invalid: expected a finite number"),
    BadInput("numbers_clip_grad_inf", "finetune", with_flags("--clip-grad", "inf"),
             "--clip-grad inf is invalid: expected a finite number"),
    BadInput("numbers_adam_beta2_nan", "finetune", with_flags("--adam-beta2", "nan"),
             "--adam-beta2 nan is invalid: expected a finite number"),
    BadInput("numbers_adam_eps_zero", "finetune", with_flags("--adam-eps", "0"),
             "--adam-eps 0.0 is invalid: expected > 0"),
    BadInput("numbers_lr_overflows_adam", "finetune", with_flags("--lr", "1e38"),
             "--lr 1e+38 is invalid: AdamW's step lr / (1 - --adam-beta1) overflows float32"),
    BadInput("numbers_lora_alpha_inf", "finetune", with_flags("--lora-alpha", "inf"),
             "LoraConfig.lora_alpha=inf is invalid"),
    BadInput("numbers_lora_dropout_nan", "finetune", with_flags("--lora-dropout", "nan"),
             "LoraConfig.lora_dropout=nan is invalid"),
    BadInput("numbers_yaml_lr_nan", "finetune", with_yaml("training", lr=NAN),
             "training.lr must be a finite number, got nan"),
    BadInput("numbers_yaml_hidden_dropout_inf", "finetune",
             with_yaml("megatron_config", hidden_dropout=float("inf")),
             "megatron_config.hidden_dropout must be a finite number, got inf"),
    # loaded factors are finite, or the load is refused naming the module
    BadInput("numbers_lora_load_nan_adapter", "finetune",
             lambda w, g: _flags(g, w, "--lora-load", _adapter_with_nan(g.run / "adapter", w)),
             "the factors of decoder.layers.1.self_attention.linear_qkv hold NaN or inf"),
    BadInput("numbers_cli_inspect_nan_adapter", "cli",
             lambda w, g: ["inspect", _adapter_with_nan(g.adapter, w)],
             "the factors of decoder.layers.1.self_attention.linear_qkv hold NaN or inf"),
    BadInput("numbers_cli_export_peft_nan_adapter", "cli",
             lambda w, g: ["export-peft", _adapter_with_nan(g.adapter, w), w / "out"],
             "hold NaN or inf"),
    BadInput("numbers_cli_import_peft_nan_factor", "cli",
             _peft_tensors(_poison(PEFT_KEY.format(layer=2, module="mlp.down_proj", side="B"))),
             "the factors of base_model.model.model.layers.2.mlp.down_proj hold NaN or inf"),
    BadInput("numbers_cli_import_peft_alpha_inf", "cli", _peft_config(lora_alpha=float("inf")),
             "lora_alpha is inf; expected a number > 0"),
    BadInput("numbers_cli_import_peft_duplicate_factor_key", "cli",
             _peft_tensors(_duplicate_unprefixed(
                 PEFT_KEY.format(layer=1, module="self_attn.o_proj", side="A"))),
             "are both the lora_A factor of model.layers.1.self_attn.o_proj; keep one of them"),
    # a resume is the run it resumes
    BadInput("numbers_resume_other_lora_alpha", "finetune", _resume("--lora-alpha", 64),
             "--lora-alpha: the run's 8.0, this run's 64.0"),
    BadInput("numbers_resume_other_targets", "finetune",
             _resume("--lora-target-modules", "linear_qkv"),
             "--lora-target-modules: the run's [\"linear_fc1\", \"linear_fc2\", \"linear_proj\", "
             "\"linear_qkv\"], this run's [\"linear_qkv\"]"),
    BadInput("numbers_resume_other_data_path", "finetune",
             lambda w, g: _resume("--data-path", g.data.parent / "pretrain_text_document")(w, g),
             "pretrain_text_document\"]"),
    BadInput("numbers_resume_data_changed_since_saved", "finetune",
             _run_copy(_other_data_in_record), "finetune_text_document.idx changed since the run "
             "saved (then 12 bytes"),
    BadInput("numbers_resume_other_seq_length", "finetune", _resume("--seq-length", 16),
             "--seq-length: the run's 32, this run's 16"),
    BadInput("numbers_resume_other_seed", "finetune", _resume("--seed", 3),
             "--seed: the run's 7, this run's 3"),
    BadInput("numbers_resume_other_batch", "finetune", _resume("--global-batch-size", 4),
             "--global-batch-size: the run's 2, this run's 4"),
    BadInput("numbers_resume_other_schedule", "finetune", _resume("--lr-decay-style", "linear"),
             "--lr-decay-style: the run's \"cosine\", this run's \"linear\""),
    BadInput("numbers_resume_latest_is_superscript_two", "finetune",
             _run_copy(_write("latest_checkpointed_iteration.txt", "\u00b2\n")),
             "holds '\u00b2', not an iteration number"),
    # an indexed dataset must be a pair and fit the vocabulary: refused before --save is made
    BadInput("numbers_data_token_past_vocab", "finetune",
             lambda w, g: _data_copy(w, g, _token_past_vocab),
             "corpus.bin holds token id 612, outside the model's vocabulary 0..511"),
    BadInput("numbers_data_idx_truncated", "finetune",
             lambda w, g: _data_copy(w, g, lambda b, i: _truncate(i, 5000)),
             "corpus.idx is 5000 bytes, but its header"),
    BadInput("numbers_data_idx_past_its_bin", "finetune",
             lambda w, g: _data_copy(w, g, lambda b, i: _truncate(b, 1000)),
             "corpus.idx does not describe"),
    BadInput("numbers_data_idx_of_another_bin", "finetune",
             lambda w, g: _data_copy(w, g, _other_index(g)), "corpus.idx does not describe"),
]
