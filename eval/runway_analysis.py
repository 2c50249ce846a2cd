"""Inside the runway head: attention and rho heat maps, early-token mass, dependence by distance.

    python eval/runway_analysis.py --workdir=DIR [--length=N] [--sequences=8] [--early_tokens=4]
                                   [--probes=4] [--compare=OTHER_WORKDIR ...]

Held-out windows of ``--length`` tokens (default: the training length). Writes
DIR/eval/runway_analysis.json and .png: per rewired layer the mean runway-head attention A and
rho (METHOD eqs. (1)-(2)) of DIR's model; for every model the attention mass on the first
``--early_tokens`` tokens per layer (next to what uniform attention would give) and the Jacobian
norm ``||d h_i / d x_j||`` by distance ``i - j`` (rewired vs baseline with --compare).
"""

import sys
import time

import numpy as np

from runway_jax.evaluation import flags


def evaluate(workdir, args):
    from runway_jax.data import documents
    from runway_jax.evaluation import runway_analysis
    from runway_jax.evaluation.perplexity import windows
    from runway_jax.evaluation.workdirs import load_trained

    model, config, tokenizer, step = load_trained(workdir)
    length = args.length or config.data.seq_len
    token_documents = [tokenizer.encode(text) for text in documents(config.data, "validation")]
    tokens = windows(token_documents, length - 1, args.sequences)  # windows of `length` tokens
    if len(tokens) == 0:
        raise ValueError(f"no held-out document has {length} tokens; lower --length.")
    print(f"{workdir}: step {step}, rewire={config.model.rewire}, {len(tokens)} windows of {length} tokens",
          flush=True)
    start = time.time()
    layers = runway_analysis.attention_maps(model, tokens)
    early = runway_analysis.early_token_mass(layers, args.early_tokens)
    maps = runway_analysis.mean_maps(layers)
    print(f"  attention maps of {len(layers)} layers in {time.time() - start:.1f}s; "
          f"Jacobians of {len(tokens)} windows ...", flush=True)
    start = time.time()
    distance = runway_analysis.dependence_by_distance(model, tokens, probes=args.probes)
    print(f"  dependence by distance in {time.time() - start:.1f}s", flush=True)
    report = {
        "workdir": workdir, "step": step, "rewire": config.model.rewire, "length": length,
        "sequences": len(tokens), "early_tokens": args.early_tokens, "probes": args.probes,
        "early_token_mass": early,
        "dependence_by_distance": np.round(distance, 6).tolist(),
        "layers": [{"layer": index, "rewired": bool(layer_maps),
                    **{f"{name}_mean_by_distance": _by_distance(image) for name, image in layer_maps.items()},
                    **{name: np.round(image, 5).tolist() for name, image in layer_maps.items()}}
                   for index, layer_maps in enumerate(maps)],
    }
    return report, {"maps": maps, "early": early, "distance": distance}


def _by_distance(image):
    """Mean of a [T, T] map over each diagonal i - j = distance (j <= i)."""
    i, j = np.tril_indices(image.shape[0])
    totals = np.bincount(i - j, weights=image[i, j])
    return np.round(totals / np.bincount(i - j), 6).tolist()


def main(argv=None) -> int:
    parser = flags.parser(__doc__)
    parser.add_argument("--length", default=None,
                        help="tokens per held-out window, >= 2 (default: the training length)")
    parser.add_argument("--sequences", default="8", help="held-out windows analysed")
    parser.add_argument("--early_tokens", default="4",
                        help="k: the attention mass on the first k tokens is measured (queries i >= k)")
    parser.add_argument("--probes", default="4", help="Gaussian probes per Jacobian row")
    args = parser.parse_args(argv)
    try:
        args.sequences = flags.integer("--sequences", args.sequences)
        args.probes = flags.integer("--probes", args.probes)
        args.early_tokens = flags.integer("--early_tokens", args.early_tokens)
        args.length = None if args.length is None else flags.integer("--length", args.length, low=2)
        for workdir, saved in flags.trained_workdirs(args).items():
            length = args.length or saved["data"]["seq_len"]
            if args.early_tokens >= length:
                raise flags.FlagError(f"--early_tokens={args.early_tokens} must be below the window length "
                                      f"{length} of {workdir} (queries i >= k are measured).")
        flags.writable_output(args.workdir)
    except flags.FlagError as error:
        return flags.fail(error)
    from runway_jax.evaluation import runway_analysis  # JAX from here on: the flags are sound
    from runway_jax.evaluation.reports import run_evaluation

    return run_evaluation("runway_analysis", args.workdir, args.compare,
                          lambda workdir: evaluate(workdir, args),
                          lambda curves, report, path: runway_analysis.plot(curves, path))


if __name__ == "__main__":
    sys.exit(main())
