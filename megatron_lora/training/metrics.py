"""What a run reports: rank 0's printed lines, metrics.jsonl, TensorBoard, the loss curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import torch.distributed as dist

from ..atomic import staged_files, write_file_atomically
from .rundir import METRICS
from ..untrusted import loads_json


def print_on_rank0(*items) -> None:
    if dist.get_rank() == 0:
        print(*items, flush=True)


def _records_up_to(path: Path, iteration: int) -> List[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            record = loads_json(line, path, ValueError)
        except ValueError:  # a line cut short when the run was killed
            continue
        if isinstance(record, dict) and record.get("iteration", 0) <= iteration:
            records.append(record)
    return records


class MetricsLog:
    """Rank 0: metrics.jsonl, TensorBoard events and, at the end, loss_curve.png.

    A run resumed at iteration N continues the log of iterations up to N: the records a killed
    run wrote past N are dropped from metrics.jsonl (rewritten atomically) and hidden from
    TensorBoard (its ``purge_step``), since the resumed run writes those iterations again.
    """

    def __init__(self, directory: Optional[str], resumed_at: int = 0):
        self.directory = Path(directory) if directory and dist.get_rank() == 0 else None
        self.records: List[dict] = []
        self.writer = None
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / METRICS
        if resumed_at and path.is_file():
            self.records = _records_up_to(path, resumed_at)
        write_file_atomically(path, "".join(json.dumps(r) + "\n" for r in self.records))
        try:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is an optional extra

            self.writer = SummaryWriter(str(self.directory / "tensorboard"),
                                        purge_step=resumed_at + 1 if resumed_at else None)
        except ImportError:
            self.writer = None

    def log(self, record: dict) -> None:
        if self.directory is None:
            return
        self.records.append(record)
        with open(self.directory / METRICS, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["iteration"])

    def close(self) -> None:
        if self.directory is None:
            return
        if self.writer is not None:
            self.writer.close()
        train = [(r["iteration"], r["loss"]) for r in self.records if "loss" in r]
        valid = [(r["iteration"], r["valid_loss"]) for r in self.records if "valid_loss" in r]
        if train:
            _plot_loss_curve(self.directory / "loss_curve.png", train, valid)


def _plot_loss_curve(path: Path, train, valid) -> None:
    import matplotlib  # heavy, and only needed once at the end of a run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(*zip(*train), label="train loss")
    if valid:
        axes.plot(*zip(*valid), marker="o", label="held-out loss")
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss")
    axes.legend()
    figure.tight_layout()
    with staged_files(path) as (temporary,):
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
