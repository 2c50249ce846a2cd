"""Multi-query associative recall: train rewired and baseline models, accuracy vs number of pairs.

    python eval/recall.py --workdir=DIR [--pairs=4,8,16,32] [--queries=8] [--seeds=0]
                          [--eval_batches=8] [--preset=tiny] [any train/main.py flag ...]

For every pair count and seed, one rewired model and one baseline (the same config with
``--rewire=false``) are trained on the synthetic task with the ordinary training loop in
DIR/runs/{rewired,baseline}/pairs{P}/seed{S} (finished runs are reused, interrupted ones resume),
then scored on held-out examples. Training flags such as --steps, --lr, --beta or
--runway_span apply to both models (defaults: 1500 steps, batch 32, lr 3e-3). Writes
DIR/eval/recall.json and DIR/eval/recall.png.
"""

import dataclasses
import json
import os
import sys
import time

from runway_jax.evaluation import flags

DEFAULT_FLAGS = ["--steps=1500", "--batch_size=32", "--lr=3e-3", "--warmup_steps=50",
                 "--eval_batches=4"]
MAX_PAIRS = 64  # runway_jax.evaluation.recall.NUM_KEYS (a test keeps them equal), known before JAX


def run(args, training_flags, log=print) -> dict:
    """Train and score every (pairs, seed, rewired or not) run; ``args`` holds checked values."""
    import jax

    from runway_jax.evaluation import recall
    from runway_jax.evaluation.workdirs import load_trained
    from runway_jax.training import train_and_evaluate
    from runway_jax.training.cli import parse_flags

    base = parse_flags(DEFAULT_FLAGS + training_flags, preset=args.preset)
    every = max(1, base.steps // 5)
    base = base.replace(log_every=every, eval_every=base.steps, checkpoint_every=base.steps)
    runs = [(rewire, p, seed) for p in args.pairs for seed in args.seeds for rewire in (True, False)]
    results = {"rewired": {}, "baseline": {}}
    start = time.time()
    for index, (rewire, num_pairs, seed) in enumerate(runs):
        name = "rewired" if rewire else "baseline"
        config = recall.recall_config(base, num_pairs=num_pairs, num_queries=args.queries, rewire=rewire, seed=seed)
        workdir = os.path.join(args.workdir, "runs", name, f"pairs{num_pairs}", f"seed{seed}")
        label = f"[{index + 1}/{len(runs)} {name} pairs={num_pairs} seed={seed}]"
        log(f"{label} training in {workdir}")
        train_and_evaluate(config, workdir, devices=jax.devices()[:1], log=lambda line: log(f"{label} {line}"))
        model, config, tokenizer, _ = load_trained(workdir)
        scores = recall.recall_accuracy(model, config, tokenizer, batches=args.eval_batches)
        results[name].setdefault(num_pairs, []).append(scores)
        elapsed = time.time() - start
        eta = elapsed / (index + 1) * (len(runs) - index - 1)
        log(f"{label} accuracy {scores['accuracy']:.3f} (all answers right: "
            f"{scores['sequence_accuracy']:.3f})  elapsed {elapsed:.0f}s  eta {eta:.0f}s")
    model_config = json.loads(json.dumps(dataclasses.asdict(base.model)))
    return {
        "workdir": args.workdir, "queries": args.queries, "seeds": args.seeds, "steps": base.steps,
        "model": {k: v for k, v in model_config.items() if k != "rewire"},
        "training_flags": training_flags,
        "accuracy": {name: {str(p): {**recall.summarize([s["accuracy"] for s in scores]), "runs": scores}
                            for p, scores in by_pairs.items()} for name, by_pairs in results.items()},
    }


def main(argv=None) -> int:
    parser = flags.parser(__doc__, compare=False,
                          workdir_help="where the models are trained (WORKDIR/runs/) and the results "
                                       "written (WORKDIR/eval/)",
                          epilog="Any other flag is a train/main.py flag (e.g. --steps=300 --beta=0.5), "
                                 "applied to both models; defaults: " + " ".join(DEFAULT_FLAGS) + ".")
    parser.add_argument("--pairs", default="4,8,16,32",
                        help=f"key-value pairs per example, comma-separated (1..{MAX_PAIRS}); one run each")
    parser.add_argument("--queries", default="8", help="keys asked again per example (scored answers)")
    parser.add_argument("--seeds", default="0", help="seeds, comma-separated (e.g. 0,1,2); one run each")
    parser.add_argument("--eval_batches", default="8", help="held-out batches scored per run")
    parser.add_argument("--preset", default="tiny", help="train/main.py preset the runs start from")
    args, training_flags = parser.parse_known_args(argv)
    try:
        args.pairs = flags.integers("--pairs", args.pairs, low=1, high=MAX_PAIRS)
        args.seeds = flags.integers("--seeds", args.seeds, low=0, high=2**31 - 1)
        args.queries = flags.integer("--queries", args.queries, high=10_000)
        args.eval_batches = flags.integer("--eval_batches", args.eval_batches)
        out = flags.writable_output(args.workdir)
    except flags.FlagError as error:
        return flags.fail(error)
    from runway_jax.data import DataError  # JAX from here on: the flags are sound
    from runway_jax.evaluation import recall
    from runway_jax.files import write_json
    from runway_jax.training.checkpoint import CheckpointError
    from runway_jax.training.config import ConfigError

    try:
        report = run(args, training_flags)
    except (ConfigError, CheckpointError, DataError, ValueError) as error:
        return flags.fail(error)
    curves = {name: {int(p): summary for p, summary in by_pairs.items()}
              for name, by_pairs in report["accuracy"].items()}
    try:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, "recall.json"), report)
        recall.plot(curves, os.path.join(out, "recall.png"))
    except OSError as error:
        return flags.fail(f"cannot write the results to {out} ({error.strerror or error}).")
    for name, by_pairs in curves.items():
        print(f"{name}: " + "  ".join(f"pairs={p} acc={s['mean']:.3f}" for p, s in sorted(by_pairs.items())))
    print(f"wrote {out}/recall.json and recall.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
