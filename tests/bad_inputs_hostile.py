"""Hostile files (rows of the table in tests/bad_inputs.py): dist-checkpoints whose pickles would
run code, patterns that would not finish, YAML alias bombs, nesting too deep to parse.

A payload here would create a file inside the row's directory; the table's check that no file
under it was written or changed is the proof that it never ran.
"""

from __future__ import annotations

import io
import json
import pathlib
import pickle

import torch
import yaml

from bad_inputs import BadInput
from bad_inputs_cli import _copy, _edited_json, _peft_config
from bad_inputs_scripts import (TRAIN, _base_copy, _flags, _hf_copy, _run_copy, _sft, _text_yaml,
                                _write)

MARKER = "payload_ran"  # the file a payload creates in the row's directory


class Payload:
    """Unpickling it creates ``path`` (pathlib.Path.touch): code from the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def _base_with(edit):
    """--pretrained-checkpoint of a copy of the base whose model/ is broken by edit(model, w)."""
    def make(w, g):
        base = _base_copy(w, g)
        edit(base / "model", w)
        return _flags(g, w, "--pretrained-checkpoint", base)

    return make


def payload_metadata(model, w):
    """.metadata that is nothing but the payload."""
    (model / ".metadata").write_bytes(pickle.dumps(Payload(w / MARKER)))


def payload_inside_metadata(model, w):
    """torch's real Metadata, with the payload in one of its fields."""
    metadata = pickle.loads((model / ".metadata").read_bytes())  # our own, trusted, file
    metadata.planner_data = {"note": Payload(w / MARKER)}
    (model / ".metadata").write_bytes(pickle.dumps(metadata))


def payload_common(model, w):
    """megatron's common.pt holding the payload (torch.save's archive)."""
    torch.save({"args": Payload(w / MARKER)}, model / "common.pt")


def payload_sharded_object(model, w):
    """A layer's _extra_state (a byte item torch's planner loads with weights_only=False) moved
    to a payload appended to its .distcp file; .metadata points at it."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = pickle.loads((model / ".metadata").read_bytes())
    index, info = next((i, s) for i, s in metadata.storage_data.items()
                       if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    buffer = io.BytesIO()
    torch.save(Payload(w / MARKER), buffer)
    data_file = model / info.relative_path
    info.offset, info.length = data_file.stat().st_size, len(buffer.getvalue())
    with data_file.open("ab") as handle:
        handle.write(buffer.getvalue())
    (model / ".metadata").write_bytes(pickle.dumps(metadata))


def _run_with_payload(w, g):
    """--load of a copy of the full-training (pretrain) run whose latest model/.metadata runs
    code."""
    run = _copy(g.base, w, "run")
    payload_metadata(run / "iter_0000002" / "model", w)
    # the data it was pretrained on: a resume must match the run it resumes
    return _flags(g, w, "--load", run, "--data-path", g.data.parent / "pretrain_text_document",
                  save="run")


def _export_hf_with_payload(w, g):
    base = _base_copy(w, g)
    payload_common(base / "model", w)
    return ["export-hf", base, w / "out"]


def _deep(levels: int):
    return "[" * levels + "]" * levels


def _deep_adapter_config(w, g):
    adapter = _copy(g.adapter, w, "deep")
    config = json.loads((adapter / "adapter_config.json").read_text())
    text = json.dumps(config)
    (adapter / "adapter_config.json").write_text(text[:-1] + ', "x": ' + _deep(100_000) + "}")
    return ["inspect", adapter]


def _long_number_adapter_config(w, g):
    """A number of 5,000 digits: json.loads raises ValueError (not JSONDecodeError) for it."""
    adapter = _copy(g.adapter, w, "long")
    text = (adapter / "adapter_config.json").read_text().rstrip()
    (adapter / "adapter_config.json").write_text(text[:-1] + ', "x": ' + "9" * 5000 + "}")
    return ["inspect", adapter]


def _overwrite_from_a_payload_run(w, g):
    """--load of a run whose .metadata runs code, --save of another run with --overwrite: the
    run --save holds must be untouched when the --load is refused."""
    run = _copy(g.base, w, "run")
    payload_metadata(run / "iter_0000002" / "model", w)
    _copy(g.base, w, "other")
    return _flags(g, w, "--load", run, "--data-path", g.data.parent / "pretrain_text_document",
                  "--overwrite", save="other")


def _deep_peft_config(w, g):
    peft = _copy(g.peft, w, "peft")
    text = (peft / "adapter_config.json").read_text().rstrip()
    (peft / "adapter_config.json").write_text(text[:-1] + ', "x": ' + _deep(5000) + "}")
    return ["import-peft", peft, w / "out", "--like", g.adapter]


def _deep_hf_config(hf):
    text = (hf / "config.json").read_text().rstrip()
    (hf / "config.json").write_text(text[:-1] + ', "x": ' + _deep(3000) + "}")


def _lora_load_deep(w, g):
    adapter = _copy(g.run / "adapter", w, "adapter")
    text = (adapter / "adapter_config.json").read_text().rstrip()
    (adapter / "adapter_config.json").write_text(text[:-1] + ', "x": ' + _deep(3000) + "}")
    return _flags(g, w, "--lora-load", adapter)


def _catastrophic_rank_pattern(w, g):
    adapter = _edited_json(g.adapter, w, "slow", lambda c: c["lora_config"].update(
        rank_pattern={SLOW_PATTERN: 2}))
    return ["inspect", adapter]


# does not finish within the time limit in the `regex` engine either (its prefilter answers
# (.*.*)*z at once: there is no z in a module name)
SLOW_PATTERN = "re:(.*){1,32000}[bc]"

# "billion laughs": ten lists of ten aliases of the one before, 10**10 items once expanded, as
# the value of a key whose error message would quote it
ALIAS_BOMB = "megatron_config: {num_layers: [&a [x, x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"&{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(9)) + "]}\n"

ROWS = [
    # no code from a dist-checkpoint's pickles
    BadInput("base_metadata_runs_code", "finetune", _base_with(payload_metadata),
             "model/.metadata refers to 'pathlib.Path.touch'"),
    BadInput("base_metadata_hides_code_in_a_field", "finetune",
             _base_with(payload_inside_metadata), "model/.metadata refers to 'pathlib.Path.touch'"),
    BadInput("base_common_pt_runs_code", "finetune", _base_with(payload_common),
             "model/common.pt refers to 'builtins.getattr'"),
    BadInput("base_sharded_object_runs_code", "finetune", _base_with(payload_sharded_object),
             "_extra_state"),
    BadInput("load_full_run_metadata_runs_code", "pretrain", _run_with_payload,
             "iter_0000002/model/.metadata refers to 'pathlib.Path.touch'"),
    BadInput("cli_export_hf_common_pt_runs_code", "cli", _export_hf_with_payload,
             "model/common.pt refers to 'builtins.getattr'"),
    # nothing hangs: patterns, aliases, nesting
    BadInput("cli_inspect_catastrophic_rank_pattern", "cli", _catastrophic_rank_pattern,
             "the pattern 're:(.*){1,32000}[bc]' did not finish matching"),
    BadInput("cli_import_peft_catastrophic_target_regex", "cli",
             _peft_config(target_modules="lm_head|" + SLOW_PATTERN[3:]),  # lm_head: sorted first
             "the pattern 'lm_head|(.*){1,32000}[bc]' did not finish matching"),
    BadInput("yaml_catastrophic_target_regex", "finetune",
             _text_yaml(yaml.safe_dump(dict(TRAIN, lora=dict(TRAIN["lora"],
                                                               target_modules=[SLOW_PATTERN])))),
             "did not finish matching"),
    BadInput("yaml_alias_bomb", "finetune", _text_yaml(ALIAS_BOMB),
             "aliases (*a) are not accepted"),
    BadInput("yaml_nested_too_deeply", "finetune", _text_yaml("a: " + _deep(10_000) + "\n"),
             "nested deeper than 64 levels"),
    BadInput("cli_inspect_adapter_config_nested_too_deeply", "cli", _deep_adapter_config,
             "adapter_config.json nests deeper than 64 levels"),
    BadInput("cli_import_peft_config_nested_too_deeply", "cli", _deep_peft_config,
             "adapter_config.json nests deeper than 64 levels"),
    BadInput("hf_config_nested_too_deeply", "finetune", _hf_copy(_deep_hf_config),
             "config.json nests deeper than 64 levels"),
    BadInput("lora_load_adapter_config_nested_too_deeply", "finetune", _lora_load_deep,
             "adapter_config.json nests deeper than 64 levels"),
    BadInput("load_trainer_state_nested_too_deeply", "finetune",
             _run_copy(_write("iter_0000002/trainer_state.json", _deep(3000))),
             "trainer_state.json nests deeper than 64 levels"),
    BadInput("sft_row_nested_too_deeply", "finetune",
             _sft('{"messages": ' + _deep(3000) + "}", byte=True),
             "chat.jsonl:1 nests deeper than 64 levels"),
    # PEFT configs: fields the import uses are checked, not crashed on
    BadInput("cli_import_peft_dropout_not_a_number", "cli", _peft_config(lora_dropout="abc"),
             "lora_dropout is 'abc'; expected a number in [0, 1)"),
    BadInput("cli_import_peft_alpha_pattern_not_a_number", "cli",
             _peft_config(alpha_pattern={"q_proj": "big"}),
             "alpha_pattern['q_proj'] is 'big'; expected a number > 0"),
    BadInput("cli_inspect_adapter_config_number_too_long", "cli", _long_number_adapter_config,
             "adapter_config.json is not valid JSON: Exceeds the limit (4300 digits)"),
    BadInput("overwrite_from_a_run_whose_metadata_runs_code", "pretrain",
             _overwrite_from_a_payload_run,
             "iter_0000002/model/.metadata refers to 'pathlib.Path.touch'"),
]
