"""The table of bad inputs (tests/test_bad_input.py runs it): each row makes its files, runs one
entry point in-process, and the test asserts the one-line message, the exit code and that no
file was written or changed.

A row's ``make(workdir, given)`` builds what it needs under ``workdir`` (copies of the valid
inputs in ``given``, then broken) and returns the argv. ``given`` holds valid inputs shared by
every row, read-only:

    given.adapter      a consolidated adapter directory saved at TP=2 + SP (tiny GPT, r=4)
    given.peft         the same adapter exported to Hugging Face PEFT
    given.experiment   the experiment YAML of that tiny GPT
    given.train_config a training YAML for the scripts (TP=1, tiny), given.data its dataset prefix
    given.base         a pretrained base checkpoint of that training model (pretrain_gpt.py --save)
    given.run          a finished LoRA run directory (finetune_gpt.py --save) of that model

Rows live in per-area lists (CLI rows in bad_inputs_cli.py, the scripts' rows in
bad_inputs_scripts.py) so each area is kept beside its code's tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

PROGRAMS = ("cli", "finetune", "pretrain")


@dataclass(frozen=True)
class BadInput:
    name: str
    program: str  # one of PROGRAMS: megatron_lora.cli.main or megatron_lora.training.main
    make: Callable[[Path, object], List[str]]  # (workdir, given) -> argv
    expected: str  # a part of the one error line (it must name the bad value or file)
    code: int = 2

    def __post_init__(self):
        if self.program not in PROGRAMS:
            raise ValueError(f"BadInput {self.name}: program {self.program!r} is not one of "
                             f"{PROGRAMS}")
