"""Bad inputs around the run directory (rows of the table in tests/bad_inputs.py): --save that
is empty, a dangling link, locked by a running run, or an input of the run; outputs onto their
own inputs; and checks that under --nproc-per-node are made before any worker starts (in
process here: the launcher refuses before it would start torchrun)."""

from __future__ import annotations

import fcntl
import os
import shutil

from bad_inputs import BadInput
from bad_inputs_scripts import _copy, _flags

# descriptors of the locks rows hold while the entry point runs (closed with the process)
_HELD = []


def _locked_save(w, g, *extra):
    """--save held by "another run": the lock taken here, by this test process."""
    save = w / "save"
    save.mkdir()
    fd = os.open(save / "run.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"pid 4242 on elsewhere\nnot-your-token\n")
    _HELD.append(fd)
    return _flags(g, w, *extra)


def _dangling_save(w, g):
    (w / "save").symlink_to(w / "nowhere")
    return _flags(g, w)


def _empty_save(w, g):
    return ["--config", g.train_config, "--data-path", g.data, "--train-iters", 2, "--save", ""]


def _run_with_binary_marker(w, g):
    """A copy of the finished run whose latest marker holds 4 KB of bytes that are not text."""
    run = _copy(g.run, w, "run")
    (run / "latest_checkpointed_iteration.txt").write_bytes(b"\xff\xfe" * 2048)
    return _flags(g, w, save="run")


def _run_with_long_marker(w, g):
    """--load of a run whose latest marker holds 5,000 digits (int() refuses it)."""
    run = _copy(g.run, w, "run")
    (run / "latest_checkpointed_iteration.txt").write_text("7" * 5000 + "\n")
    return _flags(g, w, "--load", run, save="run")


def _resume_copy(w, g, *extra):
    run = _copy(g.run, w, "run")
    return _flags(g, w, "--load", run, *extra, save="run")


def _data_inside_save(w, g):
    data = w / "save"
    data.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{g.data}{suffix}", data / f"corpus{suffix}")
    return ["--config", g.train_config, "--data-path", data / "corpus", "--train-iters", 2,
            "--save", data, "--overwrite"]


def _import_into_like(w, g):
    like = _copy(g.adapter, w, "like")
    return ["import-peft", g.peft, like, "--like", like, "--overwrite"]


def _export_into_base(w, g):
    base = w / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    return ["export-peft", g.adapter, base, "--base", base, "--overwrite"]


NPROC = ("--nproc-per-node", 2)

ROWS = [
    BadInput("save_empty_string", "finetune", _empty_save,
             "--save is empty (an unset shell variable?)"),
    BadInput("save_dangling_symlink", "finetune", _dangling_save,
             "save is a symbolic link to"),
    BadInput("save_locked_by_another_run", "finetune", _locked_save,
             "is in use by another run (pid 4242 on elsewhere)"),
    BadInput("save_locked_by_another_run_nproc", "finetune",
             lambda w, g: _locked_save(w, g, "--global-batch-size", 4, *NPROC),
             "is in use by another run (pid 4242 on elsewhere)"),
    BadInput("save_overwrite_of_the_run_it_resumes", "finetune",
             lambda w, g: _resume_copy(w, g, "--overwrite"),
             "--overwrite would clear --save"),
    BadInput("save_inside_the_run_it_loads", "finetune",
             lambda w, g: _copy(g.run, w, "run") and _flags(g, w, "--load", w / "run",
                                                           save="run/iter_0000002"),
             "overlaps --load"),
    BadInput("save_overwrite_holds_the_data", "finetune", _data_inside_save,
             "overlaps --data-path"),
    BadInput("save_overwrite_holds_the_lora_load", "finetune",
             lambda w, g: _copy(g.run, w, "run") and _flags(
                 g, w, "--lora-load", w / "run" / "adapter", "--overwrite", save="run"),
             "overlaps --lora-load"),
    BadInput("cli_import_peft_into_its_like", "cli", _import_into_like,
             "like is the --like adapter"),
    BadInput("cli_export_peft_into_its_base", "cli", _export_into_base,
             "base is the --base directory"),
    BadInput("nproc_unknown_tokenizer", "finetune",
             lambda w, g: _flags(g, w, "--tokenizer", "nope", "--global-batch-size", 4, *NPROC),
             "--tokenizer-type 'nope' is not supported"),
    BadInput("nproc_resume_at_another_tp_size", "finetune",
             lambda w, g: _resume_copy(w, g, "--tensor-model-parallel-size", 2, *NPROC),
             "exact resume needs the same layout"),
    BadInput("nproc_target_matches_nothing", "finetune",
             lambda w, g: _flags(g, w, "--lora-target-modules", "linear_nothing",
                                 "--global-batch-size", 4, *NPROC),
             "LoRA target(s) ['linear_nothing'] match no supported layer"),
    BadInput("nproc_global_batch_not_a_multiple", "finetune",
             lambda w, g: _flags(g, w, *NPROC),
             "--global-batch-size 2 is not a multiple of --micro-batch-size x data-parallel "
             "size = 4"),
    BadInput("save_holds_a_run_whose_marker_is_not_text", "finetune", _run_with_binary_marker,
             "holds another run (at iteration '\ufffd"),
    BadInput("load_marker_of_five_thousand_digits", "finetune", _run_with_long_marker,
             "latest_checkpointed_iteration.txt holds '7777"),
]
