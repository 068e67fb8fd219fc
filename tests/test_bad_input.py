"""Every row of the bad-input table (tests/bad_inputs.py): one line on stderr naming the bad
value or file, the row's exit code, and not one file under the row's directory written,
changed or removed (sha256 of every file before and after)."""

from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path

import pytest
import yaml

import bad_inputs_cli
import bad_inputs_files
import bad_inputs_hostile
import bad_inputs_numbers
import bad_inputs_rundir
import bad_inputs_scripts
from gpt_checks import TARGETS, TINY_GPT

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # script_setup: the scripts' warning filters
ROWS = (bad_inputs_cli.ROWS + bad_inputs_scripts.ROWS + bad_inputs_files.ROWS
        + bad_inputs_numbers.ROWS + bad_inputs_rundir.ROWS + bad_inputs_hostile.ROWS)


class Given:
    """The valid inputs rows copy and break; the scripts' ones are made on first use."""

    def __init__(self, saved_adapters, tmp_path_factory):
        self._adapters, self._factory, self._made = saved_adapters[0], tmp_path_factory, {}
        self.adapter = self._adapters / "random"
        self.peft = self._adapters / "peft"
        self.experiment = self._adapters / "experiment.yaml"
        if not self.experiment.exists():
            self.experiment.write_text(yaml.safe_dump({
                "megatron_config": dict(TINY_GPT, tensor_model_parallel_size=2,
                                        sequence_parallel=True),
                "lora": {"target_modules": TARGETS}}))

    def __getattr__(self, name):  # data, train_config, base, run
        if name.startswith("_"):
            raise AttributeError(name)
        if not self._made:
            self._made.update(bad_inputs_scripts.make_given(self._factory.mktemp("given")))
        try:
            return self._made[name]
        except KeyError:
            raise AttributeError(name) from None


@pytest.fixture(scope="module")
def given(saved_adapters, tmp_path_factory):
    return Given(saved_adapters, tmp_path_factory)


def _hashes(directory: Path) -> dict:
    """Every file's sha256 and every directory under ``directory`` (an empty one made counts)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "directory" for p in sorted(directory.rglob("*"))}


def _run(program: str, argv) -> int:
    try:
        if program == "cli":
            from megatron_lora.cli import main

            return main(argv)
        # as the scripts run it: under their warning filters from the first import on (a
        # fresh process's stderr, not one that depends on which row showed megatron's
        # import-time notices first)
        with warnings.catch_warnings():
            from script_setup import filter_known_warnings

            filter_known_warnings()
            from megatron_lora.training import main

            return main(argv, mode=program)
    except SystemExit as exit_:  # argparse's own errors
        return exit_.code


def test_the_table_has_forty_rows_with_distinct_names():
    assert len(ROWS) >= 40, len(ROWS)
    assert len({row.name for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input_is_one_line_and_changes_nothing(row, given, tmp_path, capsys):
    workdir = tmp_path / "work"
    workdir.mkdir()
    argv = [str(a) for a in row.make(workdir, given)]
    before = _hashes(workdir)
    shared_before = _hashes(given.adapter.parent)
    capsys.readouterr()
    code = _run(row.program, argv)
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == row.code, (code, err)
    assert len(lines) == 1, err
    assert row.expected in lines[0], lines[0]
    assert _hashes(workdir) == before, "a file under the row's directory was written or changed"
    assert _hashes(given.adapter.parent) == shared_before
