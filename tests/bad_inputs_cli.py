"""Bad inputs of the ``megatron-lora`` command line (rows of tests/bad_inputs.py's table).

Each row copies the valid adapter (TP=2 + SP tiny GPT, r=4), its PEFT export or the
experiment YAML into its workdir, breaks the copy, and names an output directory that must
still not exist afterwards.
"""

from __future__ import annotations

import json
import shutil

import yaml

from bad_inputs import BadInput

PEFT_KEY = "base_model.model.model.layers.{layer}.{module}.lora_{side}.weight"


def _copy(source, workdir, name):
    target = workdir / name
    shutil.copytree(source, target)
    return target


def _edited_json(source, workdir, name, edit):
    """A copy of an adapter directory with its adapter_config.json edited (the weights'
    sha256 does not cover the JSON, so only the tensor check can notice)."""
    target = _copy(source, workdir, name)
    path = target / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return target


def _edited_tensors(source, workdir, name, edit):
    from safetensors.torch import load_file, save_file

    target = _copy(source, workdir, name)
    path = target / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return target


def _retensored_adapter(edit):
    """export-peft of the adapter with edited tensors and a matching sha256 (what a buggy
    writer, not a damaged copy, would leave)."""
    def make(w, g):
        import hashlib

        adapter = _edited_tensors(g.adapter, w, "edited", edit)
        config_path = adapter / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["weights_sha256"] = hashlib.sha256(
            (adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
        config_path.write_text(json.dumps(config))
        return ["export-peft", adapter, w / "out"]
    return make


def _base_weight_in_adapter(tensors):
    tensors["decoder.layers.0.mlp.linear_fc1.weight"] = \
        tensors["decoder.layers.0.mlp.linear_fc1.lora_A.weight"].clone()


def _ranks_differ(tensors):
    key = "decoder.layers.2.mlp.linear_fc2.lora_B.weight"
    tensors[key] = tensors[key][:, :2].contiguous()


def _lora(**fields):
    def edit(config):
        config["lora_config"].update(fields)
    return edit


def _base(**fields):
    def edit(config):
        config["base_model"].update(fields)
    return edit


def _export(edit, name="edited"):
    """export-peft of the adapter with its JSON edited."""
    return lambda w, g: ["export-peft", _edited_json(g.adapter, w, name, edit), w / "out"]


def _peft_config(**fields):
    def make(w, g):
        peft = _edited_json(g.peft, w, "peft", lambda config: config.update(fields))
        return ["import-peft", peft, w / "out", "--like", g.adapter]
    return make


def _peft_tensors(edit):
    def make(w, g):
        return ["import-peft", _edited_tensors(g.peft, w, "peft", edit), w / "out",
                "--like", g.adapter]
    return make


def _other_model(**settings):
    """import-peft with the experiment YAML of another model."""
    def make(w, g):
        data = yaml.safe_load(g.experiment.read_text())
        data["megatron_config"].update(settings)
        config = w / "other.yaml"
        config.write_text(yaml.safe_dump(data))
        return ["import-peft", g.peft, w / "out", "--config", config]
    return make


def _drop_modules(config):
    config["modules"].remove("decoder.layers.0.mlp.linear_fc1")


def _add_module(config):
    config["modules"].append("decoder.layers.7.mlp.linear_fc1")


def _garbage_config(w, g):
    adapter = _copy(g.adapter, w, "garbage")
    (adapter / "adapter_config.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    return ["inspect", adapter]


def _truncated_weights(w, g):
    adapter = _copy(g.adapter, w, "truncated")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return ["export-peft", adapter, w / "out"]


def _existing_output(command):
    def make(w, g):
        out = w / "out"
        out.mkdir()
        (out / "results.txt").write_text("a user's file")
        source = g.adapter if command == "export-peft" else g.peft
        return [command, source, out] + ([] if command == "export-peft" else ["--like", g.adapter])
    return make


def _output_is_file(w, g):
    (w / "out").write_text("a user's file")
    return ["export-peft", g.adapter, w / "out"]


def _foreign_overwrite(w, g):
    out = _copy(g.peft, w, "out")
    (out / "README.md").write_text("a model card")
    return ["export-peft", g.adapter, out, "--overwrite"]


def _into_itself(w, g):
    adapter = _copy(g.adapter, w, "adapter")
    return ["export-peft", adapter, adapter, "--overwrite"]


def _pickle_only(w, g):
    peft = _copy(g.peft, w, "peft")
    (peft / "adapter_model.safetensors").rename(peft / "adapter_model.bin")
    return ["import-peft", peft, w / "out", "--like", g.adapter]


def _peft_not_safetensors(w, g):
    peft = _copy(g.peft, w, "peft")
    (peft / "adapter_model.safetensors").write_bytes(b"PK\x03\x04 not a tensor file")
    return ["inspect", peft]


def _drop(*keys):
    def edit(tensors):
        for key in keys:
            del tensors[key]
    return edit


def _add_base_weight(tensors):
    tensors["base_model.model.model.layers.0.self_attn.q_proj.weight"] = \
        tensors[PEFT_KEY.format(layer=0, module="self_attn.q_proj", side="A")].clone()


def _targets_without_lm_head(config):
    config["target_modules"].remove("lm_head")


def _hf_base(workdir, name="base", **sizes):
    """A tiny random transformers Llama saved with safetensors, of the adapter's base shape
    (TINY_GPT) unless ``sizes`` say otherwise."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = dict(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, intermediate_size=96, tie_word_embeddings=False)
    config.update(sizes)
    path = workdir / name
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(path)
    return path


def _export_hf_other_base(w, g):
    return ["export-hf", g.adapter, w / "out", "--base", _hf_base(w, hidden_size=32)]


def _export_hf_pickled_base(w, g):
    base = w / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (base / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a pickle")
    return ["export-hf", g.adapter, w / "out", "--base", base]


def _export_hf_existing_output(w, g):
    out = w / "out"
    out.mkdir()
    (out / "results.txt").write_text("a user's file")
    return ["export-hf", g.adapter, out]


def _export_hf_foreign_overwrite(w, g):
    out = w / "out"
    out.mkdir()
    (out / "results.txt").write_text("a user's file")
    return ["export-hf", g.adapter, out, "--base", _hf_base(w), "--overwrite"]


def _export_hf_into_itself(w, g):
    adapter = _copy(g.adapter, w, "adapter")
    return ["export-hf", adapter, adapter, "--overwrite"]


def _export_hf_into_its_base(w, g):
    base = _hf_base(w)
    return ["export-hf", g.adapter, base / "merged", "--base", base]


ROWS = [
    BadInput("cli_inspect_missing_dir", "cli",
             lambda w, g: ["inspect", w / "nope"], "nope"),
    # adapter_config.json edited: the tensors are the truth
    BadInput("cli_inspect_r_edited", "cli",
             lambda w, g: ["inspect", _edited_json(g.adapter, w, "edited", _lora(r=8))],
             "edited/adapter_config.json: lora_config.r is 8, but the tensors say 4"),
    BadInput("cli_export_r_edited", "cli", _export(_lora(r=2)), "lora_config.r is 2, but the tensors say 4"),
    BadInput("cli_export_module_unlisted", "cli", _export(_drop_modules),
             "modules does not match the tensors: tensors not listed: "
             "decoder.layers.0.mlp.linear_fc1"),
    BadInput("cli_inspect_module_listed_without_tensors", "cli",
             lambda w, g: ["inspect", _edited_json(g.adapter, w, "edited", _add_module)],
             "listed without tensors: decoder.layers.7.mlp.linear_fc1"),
    BadInput("cli_export_num_layers_larger", "cli", _export(_base(num_layers=8)),
             "base_model.num_layers is 8, but the tensors hold 4 layers"),
    BadInput("cli_export_num_layers_smaller", "cli", _export(_base(num_layers=2)),
             "base_model.num_layers is 2, but the tensors hold layer 3"),
    BadInput("cli_export_hidden_size_edited", "cli", _export(_base(hidden_size=128)),
             "base_model.hidden_size is 128, but the tensors say 64"),
    BadInput("cli_export_ffn_edited", "cli", _export(_base(ffn_hidden_size=48)),
             "base_model.ffn_hidden_size is 48, but the tensors say 96"),
    BadInput("cli_export_heads_do_not_fit", "cli", _export(_base(num_query_groups=3)),
             "base_model.num_attention_heads 8 is not a multiple of base_model.num_query_groups 3"),
    BadInput("cli_export_query_groups_edited", "cli", _export(_base(num_query_groups=2)),
             "(8 attention heads, 2 query groups, 8 channels each) give 96 qkv rows"),
    BadInput("cli_export_vocab_edited", "cli", _export(_base(vocab_size=256)),
             "base_model.vocab_size is 256, but the tensors say 128"),
    BadInput("cli_export_base_model_not_an_object", "cli",
             _export(lambda config: config.update(base_model="tiny-gpt")),
             "base_model is 'tiny-gpt'; expected an object"),
    BadInput("cli_export_invalid_regex_target", "cli", _export(_lora(target_modules=["re:(fc1"])),
             "'re:(fc1' is not a valid regular expression"),
    BadInput("cli_inspect_bad_lora_alpha", "cli",
             lambda w, g: ["inspect", _edited_json(g.adapter, w, "edited", _lora(lora_alpha=-1))],
             "LoraConfig.lora_alpha=-1 is invalid"),
    BadInput("cli_inspect_binary_config", "cli", _garbage_config,
             "garbage/adapter_config.json is not valid JSON"),
    BadInput("cli_export_truncated_weights", "cli", _truncated_weights,
             "truncated/adapter_model.safetensors is truncated, corrupt or from another save"),
    # outputs: nothing a user made is replaced by surprise
    BadInput("cli_export_existing_output", "cli", _existing_output("export-peft"),
             "out already exists and is not empty; choose a new output directory or pass "
             "--overwrite"),
    BadInput("cli_import_existing_output", "cli", _existing_output("import-peft"),
             "out already exists and is not empty"),
    BadInput("cli_export_output_is_a_file", "cli", _output_is_file, "out exists and is not a directory"),
    BadInput("cli_export_overwrite_keeps_foreign_files", "cli", _foreign_overwrite,
             "refusing to replace"),
    BadInput("cli_export_into_its_own_input", "cli", _into_itself, "adapter is the input directory"),
    # PEFT adapters: the config against the tensors, the tensors against the model
    BadInput("cli_import_peft_r_edited", "cli", _peft_config(r=8),
             "peft/adapter_config.json: r gives lm_head rank 8, but "
             "base_model.model.lm_head.lora_A.weight has shape [4, 64]"),
    BadInput("cli_import_peft_rank_pattern_wrong", "cli",
             _peft_config(rank_pattern={"model.layers.1.self_attn.q_proj": 2}),
             "rank_pattern gives model.layers.1.self_attn.q_proj rank 2"),
    BadInput("cli_import_peft_target_modules_miss_a_module", "cli",
             lambda w, g: ["import-peft", _edited_json(g.peft, w, "peft", _targets_without_lm_head),
                           w / "out", "--like", g.adapter],
             "does not select lm_head, which has factors in the file"),
    BadInput("cli_import_peft_bad_lora_alpha", "cli", _peft_config(lora_alpha="eight"),
             "lora_alpha is 'eight'"),
    BadInput("cli_import_peft_bad_target_regex", "cli", _peft_config(target_modules="(q_proj"),
             "target_modules '(q_proj' is not a valid regular expression"),
    BadInput("cli_import_peft_missing_tensor", "cli", _peft_tensors(_drop(
        PEFT_KEY.format(layer=2, module="self_attn.v_proj", side="A"),
        PEFT_KEY.format(layer=2, module="self_attn.v_proj", side="B"))),
        "missing key base_model.model.model.layers.2.self_attn.v_proj.lora_A.weight"),
    BadInput("cli_import_peft_missing_partner", "cli", _peft_tensors(_drop(
        PEFT_KEY.format(layer=1, module="mlp.up_proj", side="B"))),
        "missing key base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"),
    BadInput("cli_import_peft_base_weight_key", "cli", _peft_tensors(_add_base_weight),
             "unexpected PEFT key 'base_model.model.model.layers.0.self_attn.q_proj.weight'"),
    BadInput("cli_import_peft_pickle_only", "cli", _pickle_only, "adapter_model.bin, a pickle file"),
    BadInput("cli_inspect_peft_not_safetensors", "cli", _peft_not_safetensors,
             "peft/adapter_model.safetensors cannot be read as safetensors"),
    BadInput("cli_import_other_hidden_size", "cli", _other_model(hidden_size=128),
             "other.yaml: hidden_size is 128 there, but"),
    BadInput("cli_import_other_query_groups", "cli", _other_model(num_query_groups=2),
             "other.yaml: query groups × head_dim is 16 there, but "
             "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight has shape [32, 4]"),
    BadInput("cli_import_fewer_layers", "cli", _other_model(num_layers=2),
             "other.yaml: num_layers is 2 there, but the adapter has layer 3"),
    BadInput("cli_import_query_groups_do_not_fit_tp", "cli", _other_model(num_query_groups=3),
             "other.yaml: megatron_config: num_query_groups (3) is not divisible"),
    BadInput("cli_import_like_a_peft_adapter", "cli",
             lambda w, g: ["import-peft", g.peft, w / "out", "--like", g.peft],
             "peft/adapter_config.json is not a megatron_lora adapter config"),
    BadInput("cli_export_base_weight_key", "cli", _retensored_adapter(_base_weight_in_adapter),
             "unexpected key 'decoder.layers.0.mlp.linear_fc1.weight'"),
    BadInput("cli_export_factor_ranks_differ", "cli", _retensored_adapter(_ranks_differ),
             "decoder.layers.2.mlp.linear_fc2: lora_A is [4, 96] and lora_B is [64, 2]"),
    BadInput("cli_import_missing_config", "cli",
             lambda w, g: ["import-peft", g.peft, w / "out", "--config", w / "absent.yaml"],
             "absent.yaml: the file does not exist"),
    # export-hf: the base must be the adapter's, the output a new place
    BadInput("cli_export_hf_other_base", "cli", _export_hf_other_base,
             "random is an adapter of another base: its base_model.hidden_size is 64, but"),
    BadInput("cli_export_hf_no_base_known", "cli",
             lambda w, g: ["export-hf", g.adapter, w / "out"],
             "no base model is known (its base_model has no name_or_path); pass --base HF_DIR"),
    BadInput("cli_export_hf_pickled_base", "cli", _export_hf_pickled_base,
             "base holds its weights as pytorch_model.bin, which is never loaded here"),
    BadInput("cli_export_hf_existing_output", "cli", _export_hf_existing_output,
             "out already exists and is not empty; choose a new output directory or pass "
             "--overwrite"),
    BadInput("cli_export_hf_overwrite_keeps_foreign_files", "cli", _export_hf_foreign_overwrite,
             "refusing to replace"),
    BadInput("cli_export_hf_into_its_own_input", "cli", _export_hf_into_itself,
             "adapter is the adapter"),
    BadInput("cli_export_hf_into_its_base", "cli", _export_hf_into_its_base,
             "merged is inside the base"),
]
