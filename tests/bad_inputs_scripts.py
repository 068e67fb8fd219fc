"""Bad inputs of scripts/pretrain_gpt.py and scripts/finetune_gpt.py (rows of the table in
tests/bad_inputs.py), and the valid inputs they start from."""

from __future__ import annotations

from bad_inputs import BadInput


def make_given(directory):
    """{name: path} of the scripts' valid inputs (see tests/bad_inputs.py)."""
    raise NotImplementedError("the scripts' given inputs are added with their rows")


ROWS = []
