"""Bad inputs about where outputs go (rows of tests/bad_inputs.py's table): an output path that
is a symbolic link is refused with one line, never followed into the place it points at nor
replaced (megatron_lora.atomic); the link and what it points at stay as they were.
"""

from __future__ import annotations

from bad_inputs import BadInput
from bad_inputs_cli import _copy, _hf_base

LINK = "is a symbolic link"


def _link(workdir, to):
    link = workdir / "out"
    link.symlink_to(to)
    return link


def _link_to_empty_directory(workdir):
    (workdir / "real").mkdir()
    return _link(workdir, workdir / "real")


ROWS = [
    BadInput("files_export_peft_onto_symlink", "cli",
             lambda w, g: ["export-peft", g.adapter, _link_to_empty_directory(w)], LINK),
    # the case that replaced the link and left a hidden .out.saving-* behind
    BadInput("files_export_peft_overwrite_symlink_to_a_previous_export", "cli",
             lambda w, g: ["export-peft", g.adapter, _link(w, _copy(g.peft, w, "previous")),
                           "--overwrite"], LINK),
    BadInput("files_export_peft_onto_dangling_symlink", "cli",
             lambda w, g: ["export-peft", g.adapter, _link(w, w / "nowhere")], LINK),
    BadInput("files_export_hf_onto_symlink", "cli",
             lambda w, g: ["export-hf", g.adapter, _link_to_empty_directory(w),
                           "--base", _hf_base(w)], LINK),
    BadInput("files_export_hf_overwrite_onto_dangling_symlink", "cli",
             lambda w, g: ["export-hf", g.adapter, _link(w, w / "nowhere"), "--base", _hf_base(w),
                           "--overwrite"], LINK),
    BadInput("files_import_peft_into_symlink", "cli",
             lambda w, g: ["import-peft", g.peft, _link_to_empty_directory(w), "--like",
                           g.adapter], LINK),
    BadInput("files_import_peft_overwrite_symlink_to_a_previous_import", "cli",
             lambda w, g: ["import-peft", g.peft, _link(w, _copy(g.adapter, w, "previous")),
                           "--like", g.adapter, "--overwrite"], LINK),
]
