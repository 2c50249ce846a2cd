"""Train a runway-rewired (or, with --rewire=false, a standard) language model.

    python train/main.py [--preset=NAME] [--workdir=DIR] [--KEY=VALUE ...]

With no arguments: the default preset (a tiny model, a few minutes on a laptop CPU) on the
embedded Shakespeare corpus, printing the validation perplexity. A second run in the same
workdir resumes from its latest checkpoint. `--help` lists every flag with its default.
The work is `runway_jax.training.train_and_evaluate`; this file only parses and reports.
"""

import argparse
import sys

from runway_jax.data import DataError
from runway_jax.training import train_and_evaluate
from runway_jax.training.checkpoint import CheckpointError
from runway_jax.training.cli import parse_flags
from runway_jax.training.config import TRAIN_PRESETS, ConfigError
from runway_jax.training.distributed import initialize_distributed
from runway_jax.training.loop import NonFiniteLoss


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="default")
    first.add_argument("--workdir", default="workdir")
    known, rest = first.parse_known_args(argv)
    try:
        config = parse_flags(rest, known.preset, description=(
            "Train a rewired (or, with --rewire=false, a standard) language model.\n"
            f"--preset=NAME  starting configuration, one of {', '.join(sorted(TRAIN_PRESETS))} "
            f"(default: {first.get_default('preset')}); the flags below override it and show its values.\n"
            f"--workdir=DIR  checkpoints, logs and metrics (default: {first.get_default('workdir')}); "
            "an existing workdir resumes."))
        initialize_distributed(config)
        result = train_and_evaluate(config, known.workdir)
    except (ConfigError, DataError, CheckpointError, NonFiniteLoss) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result["validation"]:
        print(f"validation perplexity {result['validation']['validation_perplexity']:.2f} "
              f"at step {result['final_step']} (workdir {known.workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
