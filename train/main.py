"""Train a runway-rewired (or, with --rewire=false, a standard) language model.

    python train/main.py [--preset=NAME] [--workdir=DIR] [--KEY=VALUE ...]

With no arguments: the default preset (a tiny model, a few minutes on a laptop CPU) on the
embedded Shakespeare corpus, printing the validation perplexity. A second run in the same
workdir resumes from its latest checkpoint (refused if the model, tokenizer, seq_len or data
source differ; safe changes such as more --steps are recorded in WORKDIR/history.jsonl); a run
already using the workdir is named and refused. `--help` lists every flag with its default.
The work is `runway_jax.training.train_and_evaluate`; this file only parses and reports.

Flags and the workdir are checked before JAX is imported, so a bad one is reported at once.

Exit codes: 0 trained to --steps; 2 bad input or a fault (one line on stderr: a flag, the
workdir, the data, a checkpoint, memory or disk, a non-finite loss); 130 stopped by SIGINT
(Ctrl-C) and 143 stopped by SIGTERM, after saving a checkpoint to resume from (130 also when
interrupted during start-up, before any training).
"""

import argparse
import contextlib
import signal
import sys

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal number, as shells report it


class _Interrupted(BaseException):
    """SIGINT or SIGTERM during start-up (before the training loop, which handles them itself)."""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="default")
    first.add_argument("--workdir", default="workdir")
    known, rest = first.parse_known_args(argv)
    # Signals only set a flag, checked between the start-up phases: a KeyboardInterrupt raised
    # inside an extension's import or a gc callback would become an ImportError or be lost.
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}

    def check_signals():
        if received:
            raise _Interrupted(signal.Signals(received[0]).name)

    try:
        from runway_jax.data import DataError
        from runway_jax.training.cli import parse_flags
        from runway_jax.training.config import TRAIN_PRESETS, ConfigError
        from runway_jax.training.distributed import pod_detected
        from runway_jax.training.workdir import WorkdirError, check_workdir, open_workdir

        check_signals()
        try:
            config = parse_flags(rest, known.preset, description=(
                "Train a rewired (or, with --rewire=false, a standard) language model.\n"
                f"--preset=NAME  starting configuration, one of {', '.join(sorted(TRAIN_PRESETS))} "
                f"(default: {first.get_default('preset')}); the flags below override it and show its values.\n"
                f"--workdir=DIR  checkpoints, logs and metrics (default: {first.get_default('workdir')}); "
                "an existing workdir resumes."))
            check_workdir(known.workdir)
            # One process: lock the workdir now, before JAX is imported (a multi-process run
            # locks it in train_and_evaluate, on process 0, once the processes know their index).
            single = not (config.distributed or pod_detected())
            with open_workdir(known.workdir) if single else contextlib.nullcontext():
                result = _train(config, known.workdir, check_signals)
        except (ConfigError, DataError, WorkdirError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    except (_Interrupted, KeyboardInterrupt) as stop:
        name = stop.args[0] if isinstance(stop, _Interrupted) else "SIGINT"
        print(f"stopped by {name} during start-up, before any training step; nothing was trained "
              f"or saved in {known.workdir} by this run.", file=sys.stderr)
        return EXIT_CODES[name]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if isinstance(result, str):
        print(f"error: {result}", file=sys.stderr)
        return 2
    _summary(result, known.workdir)
    return EXIT_CODES.get(result["stopped_by"], 0)


def _train(config, workdir, check_signals):
    """``train_and_evaluate``'s summary, or the one-line message of a fault it raised."""
    from runway_jax.training import train_and_evaluate
    from runway_jax.training.checkpoint import CheckpointError
    from runway_jax.training.distributed import initialize_distributed
    from runway_jax.training.loop import NonFiniteLoss, StoppedBeforeTraining

    check_signals()
    try:
        initialize_distributed(config)
        check_signals()
        return train_and_evaluate(config, workdir)
    except (CheckpointError, NonFiniteLoss) as error:
        return str(error)
    except StoppedBeforeTraining as stop:
        raise _Interrupted(stop.args[0]) from None


def _summary(result, workdir):
    step, validation = result["final_step"], result["validation"]
    stopped = f" (stopped by {result['stopped_by']}; rerun to resume)" if result["stopped_by"] else ""
    if validation and validation["step"] == step:
        print(f"validation perplexity {validation['validation_perplexity']:.2f} "
              f"at step {step}{stopped} (workdir {workdir})")
        return
    earlier = (f"; the last one, at step {validation['step']}, had perplexity "
               f"{validation['validation_perplexity']:.2f}" if validation else "")
    print(f"no validation at step {step}{stopped}{earlier} (workdir {workdir})")


if __name__ == "__main__":
    sys.exit(main())
