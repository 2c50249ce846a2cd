"""What every evaluation program shares: evaluate a workdir and the --compare ones, and write
``WORKDIR/eval/NAME.json`` and ``NAME.png`` atomically; bad input is a one-line error with exit
code 2. The programs check their flags and workdirs (:mod:`runway_jax.evaluation.flags`) before
they call :func:`run_evaluation`."""

from __future__ import annotations

import os
import sys

from runway_jax.data import DataError
from runway_jax.files import write_json
from runway_jax.training.checkpoint import CheckpointError
from runway_jax.training.config import ConfigError


def run_evaluation(name: str, workdir: str, compare, evaluate, plot) -> int:
    """``evaluate(workdir) -> (report, curve)``; ``plot(curves, report, path)`` draws the curves of
    every model, labelled by workdir and rewiring. Returns the process exit code."""
    try:
        report, curve = evaluate(workdir)
        curves = {_label(workdir, report, {}): curve}
        for other in compare:
            other_report, other_curve = evaluate(other)
            curves[_label(other, other_report, curves)] = other_curve
            report.setdefault("compare", []).append(other_report)
    except (ConfigError, CheckpointError, DataError, ValueError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    out = os.path.join(workdir, "eval")
    try:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, f"{name}.json"), report)
        plot(curves, report, os.path.join(out, f"{name}.png"))
    except OSError as error:  # checked up front, but the disk can fill or vanish since
        print(f"error: cannot write the results to {out} ({error.strerror or error}).", file=sys.stderr)
        return 2
    print(f"wrote {out}/{name}.json and {name}.png")
    return 0


def _label(workdir, report, taken):
    """``NAME (rewire=...)`` by the workdir's last part; the whole path when that is taken."""
    label = f"{os.path.basename(os.path.normpath(workdir))} (rewire={report['rewire']})"
    return label if label not in taken else f"{os.path.normpath(workdir)} (rewire={report['rewire']})"
