"""Train a study's runs one after another, evaluate each once it is finished, and stop cleanly.

``experiments/study.py`` and ``experiments/round2.py`` share this loop: each run is trained (or
resumed) in ``WORKDIR/runs/GROUP/seedS``, evaluated by the caller's ``evaluate(run, run_dir)``,
and timed, with an ETA after every run. A SIGTERM/SIGINT during training makes the trainer save
and return early; the study then stops too (the half-trained model must not be evaluated, nor
the next run started) and says how to continue.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable

import jax
import numpy as np

import configs  # experiments/configs.py (the caller put experiments/ on sys.path)

from runway_jax.model import count_parameters
from runway_jax.training import train_and_evaluate


class Stopped(Exception):
    """Training was interrupted by a signal; the run saved its step and resumes on the next call."""

    def __init__(self, run_name: str, signal_name: str, step: int):
        super().__init__(f"{run_name}: stopped by {signal_name} at step {step} (saved); "
                         "run the same command again to continue")
        self.exit_code = 128 + signal.Signals[signal_name]  # as shells report it (SIGTERM: 143)


def run_dir(workdir: str, run: configs.Run) -> str:
    return os.path.join(workdir, "runs", run.group, f"seed{run.seed}")


def train_in_order(runs, base, workdir: str, evaluate: Callable, log=print) -> tuple[dict, dict]:
    """``({run.name: evaluate(run, run_dir)}, {run.name: seconds})`` over ``runs`` in order.

    Raises :class:`Stopped` when a signal interrupted a run's training."""
    start, worked = time.time(), []  # seconds of the runs that trained or evaluated (not cached)
    results, seconds = {}, {}
    for index, run in enumerate(runs):
        run_start = time.time()
        config = configs.run_config(base, run)
        directory = run_dir(workdir, run)
        label = f"[{index + 1}/{len(runs)} {run.name}]"
        log(f"{label} {count_parameters(config.model):,} parameters, {config.steps} steps")
        trained = train_and_evaluate(config, directory, devices=jax.devices()[:1],
                                     log=lambda line, label=label: log(f"{label} {line}"))
        if trained["stopped_by"]:
            raise Stopped(run.name, trained["stopped_by"], trained["final_step"])
        results[run.name] = evaluate(run, directory)
        seconds[run.name] = time.time() - run_start
        if seconds[run.name] > 10:
            worked.append(seconds[run.name])
        # The ETA assumes the remaining runs all need work, at the mean of those that did.
        eta = np.mean(worked) * (len(runs) - index - 1) if worked else 0.0
        log(f"{label} done in {seconds[run.name]:.0f} s; elapsed {(time.time() - start) / 60:.1f} "
            f"min, eta {eta / 60:.1f} min")
    return results, seconds
