"""No NaN is saved and a resume is the run it resumes, with real runs of the scripts: a learning
rate that blows the factors up stops the job at the first non-finite loss, before the optimizer
step, on every rank; a resume may change only the settings docs/resume.md lists. (The one-line
refusals of bad settings, factors and data are rows of the bad-input table,
tests/bad_inputs_numbers.py.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bad_inputs_scripts import TRAIN

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(demo_data):
    return demo_data / "finetune_text_document"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "train.yaml"
    path.write_text(yaml.safe_dump(TRAIN))
    return path


def _finetune(config, data, save, *flags, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, str(ROOT / "scripts" / "finetune_gpt.py"), "--config", str(config),
               "--data-path", str(data), "--save", str(save), *map(str, flags)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


def _all_finite(directory: Path) -> bool:
    from safetensors.torch import load_file

    files = list(directory.rglob("*.safetensors"))
    assert files, directory
    return all(bool(tensor.isfinite().all()) for path in files
               for tensor in load_file(path).values() if tensor.is_floating_point())


def test_a_diverging_run_stops_before_the_step_on_every_rank(config, data, tmp_path):
    # lr 1e36: the first step moves every B factor by ~1e36 (finite), so iteration 2's forward
    # overflows and its loss is NaN; at TP=2 both ranks must see it and stop together
    save = tmp_path / "save"
    result = _finetune(config, data, save, "--nproc-per-node", 2,
                       "--tensor-model-parallel-size", 2, "--lr", "1e36", "--min-lr", 0,
                       "--train-iters", 4, "--save-interval", 1)
    assert result.returncode != 0, result.stdout[-2000:]
    stops = [line for line in result.stderr.splitlines()
             if "finetune_gpt.py: error: iteration 2: the loss is nan" in line]
    assert len(stops) == 1, result.stderr[-3000:]  # rank 0 says it, once
    assert "stopped before the optimizer step" in stops[0]
    # the last good checkpoint stays the latest, and nothing non-finite was written
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000001"]
    assert not (save / "adapter").exists()
    assert _all_finite(save / "iter_0000001")
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert max(r["iteration"] for r in records) == 1
    assert all(math.isfinite(value) for r in records for value in r.values())


def test_a_resume_may_change_only_the_listed_settings(config, data, tmp_path):
    save = tmp_path / "save"
    first = _finetune(config, data, save, "--train-iters", 2, "--save-interval", 1)
    assert first.returncode == 0, first.stderr[-2000:]
    # what may change (docs/resume.md): more iterations, other intervals and logging
    longer = _finetune(config, data, save, "--load", save, "--train-iters", 3,
                       "--save-interval", 3, "--eval-iters", 2, "--log-interval", 2,
                       "--no-progress-bar")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert f"resumed from {save} at iteration 2" in longer.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    # what may not: refused with both values, before anything is written
    before = {p: p.stat().st_mtime_ns for p in save.rglob("*")}
    other = _finetune(config, data, save, "--load", save, "--train-iters", 4,
                      "--weight-decay", 0.1)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        f"finetune_gpt.py: error: --load {save} resumes a run with other settings "
        f"(--weight-decay: the run's 0.0, this run's 0.1); a resume keeps every setting but "
        f"--train-iters, --save-interval, --eval-interval, --eval-iters, --log-interval, "
        f"--no-progress-bar, --save: match them, or start a new run from its adapter with "
        f"--lora-load"]
    assert {p: p.stat().st_mtime_ns for p in save.rglob("*")} == before
