"""Perplexity on held-out text at 1x to 16x the training length, and loss per position.

    python eval/perplexity.py --workdir=DIR [--lengths=1,2,4,8,16] [--max_windows=16]
                              [--compare=OTHER_WORKDIR ...]

``--lengths`` are multiples of the training sequence length. Writes DIR/eval/perplexity.json
and DIR/eval/perplexity.png (other workdirs of --compare drawn on the same plot, e.g. the
baseline next to the rewired model).
"""

import argparse
import sys

from runway_jax.data import documents
from runway_jax.evaluation import perplexity
from runway_jax.evaluation.reports import run_evaluation
from runway_jax.evaluation.workdirs import load_trained


def evaluate(workdir, lengths_flag, max_windows):
    multiples = [float(m) for m in lengths_flag.split(",")]  # a bad flag is a one-line error
    model, config, tokenizer, step = load_trained(workdir)
    texts = documents(config.data, "validation")
    tokens = [tokenizer.encode(text) for text in texts]
    lengths = [int(m * config.data.seq_len) for m in multiples]
    print(f"{workdir}: step {step}, training length {config.data.seq_len}, lengths {lengths}", flush=True)
    results = perplexity.perplexity_by_length(model, tokens, lengths, max_windows=max_windows,
                                              progress=lambda line: print(line, flush=True))
    return {"workdir": workdir, "step": step, "training_length": config.data.seq_len,
            "rewire": config.model.rewire, "lengths": {str(n): r for n, r in results.items()}}, results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--lengths", default="1,2,4,8,16", help="multiples of the training length")
    parser.add_argument("--max_windows", type=int, default=16)
    parser.add_argument("--compare", nargs="*", default=[])
    args = parser.parse_args(argv)
    return run_evaluation(
        "perplexity", args.workdir, args.compare,
        lambda workdir: evaluate(workdir, args.lengths, args.max_windows),
        lambda curves, report, path: perplexity.plot(curves, report["training_length"], path))


if __name__ == "__main__":
    sys.exit(main())
