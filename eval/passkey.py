"""Passkey retrieval accuracy over a prompt-length x key-depth grid.

    python eval/passkey.py --workdir=DIR [--lengths=1,2,4] [--depths=0,0.25,0.5,0.75,1]
                           [--trials=4] [--seed=0] [--compare=OTHER_WORKDIR ...]

``--lengths`` are multiples of the training sequence length. Scores both exact greedy decoding
and the rank of the true key's likelihood among 9 random distractors (chance 0.1). Seeds and
prompts are reproducible. Writes DIR/eval/passkey.json and DIR/eval/passkey.png (heatmaps).
"""

import argparse
import sys

from runway_jax.evaluation import passkey
from runway_jax.evaluation.reports import run_evaluation
from runway_jax.evaluation.workdirs import load_trained


def evaluate(workdir, args):
    model, config, tokenizer, step = load_trained(workdir)
    lengths = [int(float(m) * config.data.seq_len) for m in args.lengths.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    print(f"{workdir}: step {step}, lengths {lengths}, depths {depths}", flush=True)
    results = passkey.passkey_grid(model, tokenizer, lengths, depths, trials=args.trials,
                                   seed=args.seed, progress=lambda line: print(line, flush=True))
    report = {"workdir": workdir, "step": step, "rewire": config.model.rewire, **results}
    return report, report  # the heatmap draws the report itself


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--lengths", default="1,2,4")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", nargs="*", default=[])
    args = parser.parse_args(argv)
    return run_evaluation("passkey", args.workdir, args.compare,
                          lambda workdir: evaluate(workdir, args),
                          lambda curves, report, path: passkey.plot(curves, path))


if __name__ == "__main__":
    sys.exit(main())
