"""Passkey retrieval accuracy over a prompt-length x key-depth grid.

    python eval/passkey.py --workdir=DIR [--lengths=1,2,4] [--depths=0,0.25,0.5,0.75,1]
                           [--trials=4] [--seed=0] [--compare=OTHER_WORKDIR ...]

``--lengths`` are multiples of the training sequence length. Scores both exact greedy decoding
and the rank of the true key's likelihood among 9 random distractors (chance 0.1). Seeds and
prompts are reproducible. Writes DIR/eval/passkey.json and DIR/eval/passkey.png (heatmaps).
"""

import argparse
import json
import os
import sys

from runway_jax.data import DataError
from runway_jax.evaluation import passkey
from runway_jax.evaluation.workdirs import load_trained
from runway_jax.training.checkpoint import CheckpointError
from runway_jax.training.config import ConfigError


def evaluate(workdir, args):
    model, config, tokenizer, step = load_trained(workdir)
    lengths = [int(float(m) * config.data.seq_len) for m in args.lengths.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    print(f"{workdir}: step {step}, lengths {lengths}, depths {depths}", flush=True)
    results = passkey.passkey_grid(model, tokenizer, lengths, depths, trials=args.trials,
                                   seed=args.seed, progress=lambda line: print(line, flush=True))
    return {"workdir": workdir, "step": step, "rewire": config.model.rewire, **results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--lengths", default="1,2,4")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", nargs="*", default=[])
    args = parser.parse_args(argv)
    try:
        report = evaluate(args.workdir, args)
        curves = {f"{os.path.basename(os.path.normpath(args.workdir))} (rewire={report['rewire']})": report}
        for other in args.compare:
            other_report = evaluate(other, args)
            curves[f"{os.path.basename(os.path.normpath(other))} (rewire={other_report['rewire']})"] = other_report
            report.setdefault("compare", []).append(other_report)
    except (ConfigError, CheckpointError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = os.path.join(args.workdir, "eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "passkey.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    passkey.plot(curves, os.path.join(out, "passkey.png"))
    print(f"wrote {out}/passkey.json and passkey.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
