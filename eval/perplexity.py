"""Perplexity on held-out text at 1x to 16x the training length, and loss per position.

    python eval/perplexity.py --workdir=DIR [--lengths=1,2,4,8,16] [--max_windows=16]
                              [--compare=OTHER_WORKDIR ...]

``--lengths`` are multiples of the training sequence length. Writes DIR/eval/perplexity.json
and DIR/eval/perplexity.png (other workdirs of --compare drawn on the same plot, e.g. the
baseline next to the rewired model).
"""

import argparse
import json
import os
import sys

from runway_jax.data import DataError, documents
from runway_jax.evaluation import perplexity
from runway_jax.evaluation.workdirs import load_trained
from runway_jax.training.checkpoint import CheckpointError
from runway_jax.training.config import ConfigError


def evaluate(workdir, multiples, max_windows):
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
    try:
        multiples = [float(m) for m in args.lengths.split(",")]
        report, results = evaluate(args.workdir, multiples, args.max_windows)
        curves = {f"{os.path.basename(os.path.normpath(args.workdir))} (rewire={report['rewire']})": results}
        for other in args.compare:
            other_report, other_results = evaluate(other, multiples, args.max_windows)
            curves[f"{os.path.basename(os.path.normpath(other))} (rewire={other_report['rewire']})"] = other_results
            report.setdefault("compare", []).append(other_report)
    except (ConfigError, CheckpointError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = os.path.join(args.workdir, "eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "perplexity.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    perplexity.plot(curves, report["training_length"], os.path.join(out, "perplexity.png"))
    print(f"wrote {out}/perplexity.json and perplexity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
