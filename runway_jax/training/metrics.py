"""Where training metrics go: ``metrics.jsonl`` (one JSON object per line) and TensorBoard
event files in ``tensorboard/``; written by process 0 only."""

from __future__ import annotations

import json
import os

import jax


class MetricsLog:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: dict) -> None:
        """``record`` has a ``step``; every other numeric field becomes a TensorBoard scalar."""
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
