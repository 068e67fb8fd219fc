"""Bad inputs of the ``megatron-lora`` command line (rows of tests/bad_inputs.py's table)."""

from __future__ import annotations

import shutil

from bad_inputs import BadInput


def _copy(source, workdir, name):
    target = workdir / name
    shutil.copytree(source, target)
    return target


ROWS = [
    BadInput("inspect_missing_dir", "cli",
             lambda w, g: ["inspect", w / "nope"], "nope"),
]
