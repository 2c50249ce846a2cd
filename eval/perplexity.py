"""Perplexity on held-out text at 1x to 16x the training length, and loss per position.

    python eval/perplexity.py --workdir=DIR [--lengths=1,2,4,8,16] [--max_windows=16]
                              [--compare=OTHER_WORKDIR ...]

``--lengths`` are multiples of the training sequence length. Writes DIR/eval/perplexity.json
and DIR/eval/perplexity.png (other workdirs of --compare drawn on the same plot, e.g. the
baseline next to the rewired model).
"""

import sys

from runway_jax.evaluation import flags


def evaluate(workdir, multiples, max_windows):
    from runway_jax.data import documents
    from runway_jax.evaluation import perplexity
    from runway_jax.evaluation.workdirs import load_trained

    model, config, tokenizer, step = load_trained(workdir)
    texts = documents(config.data, "validation")
    tokens = [tokenizer.encode(text) for text in texts]
    lengths = [int(m * config.data.seq_len) for m in multiples]
    print(f"{workdir}: step {step}, training length {config.data.seq_len}, lengths {lengths}", flush=True)
    results = perplexity.perplexity_by_length(model, tokens, lengths, max_windows=max_windows,
                                              progress=lambda line: print(line, flush=True))
    if not results:
        longest = max((len(t) for t in tokens), default=0)
        raise ValueError(f"--lengths: no held-out document of {workdir} has {min(lengths) + 1} tokens "
                         f"(the longest has {longest}); give smaller multiples.")
    return {"workdir": workdir, "step": step, "training_length": config.data.seq_len,
            "rewire": config.model.rewire, "lengths": {str(n): r for n, r in results.items()}}, results


def main(argv=None) -> int:
    parser = flags.parser(__doc__)
    parser.add_argument("--lengths", default="1,2,4,8,16",
                        help="evaluation lengths as multiples of the training length, comma-separated")
    parser.add_argument("--max_windows", default="16",
                        help="held-out windows scored per length (at most)")
    args = parser.parse_args(argv)
    try:
        max_windows = flags.integer("--max_windows", args.max_windows)
        multiples = flags.positive_floats("--lengths", args.lengths)
        flags.at_least_one_token("--lengths", multiples, flags.trained_workdirs(args))
        flags.writable_output(args.workdir)
    except flags.FlagError as error:
        return flags.fail(error)
    from runway_jax.evaluation import perplexity  # JAX from here on: the flags are sound
    from runway_jax.evaluation.reports import run_evaluation

    return run_evaluation(
        "perplexity", args.workdir, args.compare,
        lambda workdir: evaluate(workdir, multiples, max_windows),
        lambda curves, report, path: perplexity.plot(curves, report["training_length"], path))


if __name__ == "__main__":
    sys.exit(main())
