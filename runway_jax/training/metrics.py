"""Where training metrics go: ``metrics.jsonl`` (one JSON object per line) and TensorBoard
event files in ``tensorboard/``; written by process 0 only.

A resumed run replays the steps after its checkpoint, so :class:`MetricsLog` first drops the
records past the restored step (rewriting the file atomically): every step has one record, even
after any number of kills.
"""

from __future__ import annotations

import json
import os

from runway_jax.files import write_text


class MetricsLog:
    def __init__(self, workdir: str, *, start_step: int = 0, enabled: bool = True):
        """``start_step``: the step training resumes at; later records are dropped."""
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.writer = None
        self.records = []
        if not self.enabled:
            return
        self.records = [record for record in read_records(self.path) if record.get("step", 0) <= start_step]
        if os.path.isfile(self.path):
            write_text(self.path, "".join(json.dumps(record) + "\n" for record in self.records))
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def validation_at(self, step: int) -> dict | None:
        """The validation record of ``step`` already in the file, if any."""
        found = [r for r in self.records if r.get("step") == step and "validation_loss" in r]
        return found[-1] if found else None

    def write(self, record: dict) -> None:
        """``record`` has a ``step``; every other numeric field becomes a TensorBoard scalar."""
        if not self.enabled:
            return
        with open(self.path, "a") as handle:  # appending one line: a kill tears at most that line
            handle.write(json.dumps(record) + "\n")
        self.records.append(record)
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_records(path: str) -> list[dict]:
    """The records of a metrics.jsonl; a line torn by a kill mid-write is skipped."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records
