"""Passkey retrieval accuracy over a prompt-length x key-depth grid.

    python eval/passkey.py --workdir=DIR [--lengths=1,2,4] [--depths=0,0.25,0.5,0.75,1]
                           [--trials=4] [--seed=0] [--compare=OTHER_WORKDIR ...]

``--lengths`` are multiples of the training sequence length. Scores both exact greedy decoding
and the rank of the true key's likelihood among 9 random distractors (chance 0.1). Seeds and
prompts are reproducible. Writes DIR/eval/passkey.json and DIR/eval/passkey.png (heatmaps).
"""

import sys

from runway_jax.evaluation import flags


def evaluate(workdir, multiples, depths, trials, seed):
    from runway_jax.evaluation import passkey
    from runway_jax.evaluation.workdirs import load_trained

    model, config, tokenizer, step = load_trained(workdir)
    lengths = [int(m * config.data.seq_len) for m in multiples]
    print(f"{workdir}: step {step}, lengths {lengths}, depths {depths}", flush=True)
    results = passkey.passkey_grid(model, tokenizer, lengths, depths, trials=trials,
                                   seed=seed, progress=lambda line: print(line, flush=True))
    report = {"workdir": workdir, "step": step, "rewire": config.model.rewire,
              "training_length": config.data.seq_len, **results}
    return report, report  # the heatmap draws the report itself


def main(argv=None) -> int:
    parser = flags.parser(__doc__)
    parser.add_argument("--lengths", default="1,2,4",
                        help="prompt lengths as multiples of the training length, comma-separated")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                        help="where the key sits in the filler, comma-separated (0: start, 1: end)")
    parser.add_argument("--trials", default="4", help="prompts (random keys) per length x depth cell")
    parser.add_argument("--seed", default="0", help="seed of the keys and distractors (>= 0)")
    args = parser.parse_args(argv)
    try:
        depths = flags.fractions("--depths", args.depths)
        trials = flags.integer("--trials", args.trials)
        seed = flags.integer("--seed", args.seed, low=0)
        multiples = flags.positive_floats("--lengths", args.lengths)
        flags.at_least_one_token("--lengths", multiples, flags.trained_workdirs(args))
        flags.writable_output(args.workdir)
    except flags.FlagError as error:
        return flags.fail(error)
    from runway_jax.evaluation import passkey  # JAX from here on: the flags are sound
    from runway_jax.evaluation.reports import run_evaluation

    return run_evaluation("passkey", args.workdir, args.compare,
                          lambda workdir: evaluate(workdir, multiples, depths, trials, seed),
                          lambda curves, report, path: passkey.plot(curves, path))


if __name__ == "__main__":
    sys.exit(main())
