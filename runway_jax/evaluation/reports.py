"""What every evaluation program shares: evaluate a workdir and the --compare ones, and write
``WORKDIR/eval/NAME.json`` and ``NAME.png``; bad input is a one-line error with exit code 2."""

from __future__ import annotations

import json
import os
import sys

from runway_jax.data import DataError
from runway_jax.training.checkpoint import CheckpointError
from runway_jax.training.config import ConfigError


def run_evaluation(name: str, workdir: str, compare, evaluate, plot) -> int:
    """``evaluate(workdir) -> (report, curve)``; ``plot(curves, report, path)`` draws the curves of
    every model, labelled by workdir and rewiring. Returns the process exit code."""
    try:
        report, curve = evaluate(workdir)
        curves = {_label(workdir, report): curve}
        for other in compare:
            other_report, other_curve = evaluate(other)
            curves[_label(other, other_report)] = other_curve
            report.setdefault("compare", []).append(other_report)
    except (ConfigError, CheckpointError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    plot(curves, report, os.path.join(out, f"{name}.png"))
    print(f"wrote {out}/{name}.json and {name}.png")
    return 0


def _label(workdir, report):
    return f"{os.path.basename(os.path.normpath(workdir))} (rewire={report['rewire']})"
