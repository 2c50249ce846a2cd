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

import argparse
import dataclasses
import json
import os
import sys
import time

import jax

from runway_jax.data import DataError
from runway_jax.evaluation import recall
from runway_jax.evaluation.workdirs import load_trained
from runway_jax.training import train_and_evaluate
from runway_jax.training.checkpoint import CheckpointError
from runway_jax.training.cli import parse_flags
from runway_jax.training.config import ConfigError

DEFAULT_FLAGS = ["--steps=1500", "--batch_size=32", "--lr=3e-3", "--warmup_steps=50",
                 "--eval_batches=4"]


def _integers(flag, text, low, high):
    try:
        values = [int(value) for value in text.split(",")]
    except ValueError:
        raise ConfigError(f"--{flag}={text!r} must be a comma list of integers.") from None
    if not values or any(not low <= value <= high for value in values):
        raise ConfigError(f"--{flag}={text!r}: every value must be in [{low}, {high}].")
    return values


def run(args, training_flags, log=print) -> dict:
    pairs = _integers("pairs", args.pairs, 1, recall.NUM_KEYS)
    seeds = _integers("seeds", args.seeds, 0, 2**31 - 1)
    (queries,) = _integers("queries", str(args.queries), 1, 10_000)
    if args.eval_batches < 1:
        raise ConfigError(f"--eval_batches={args.eval_batches} must be >= 1.")
    base = parse_flags(DEFAULT_FLAGS + training_flags, preset=args.preset)
    every = max(1, base.steps // 5)
    base = base.replace(log_every=every, eval_every=base.steps, checkpoint_every=base.steps)
    runs = [(rewire, p, seed) for p in pairs for seed in seeds for rewire in (True, False)]
    results = {"rewired": {}, "baseline": {}}
    start = time.time()
    for index, (rewire, num_pairs, seed) in enumerate(runs):
        name = "rewired" if rewire else "baseline"
        config = recall.recall_config(base, num_pairs=num_pairs, num_queries=queries, rewire=rewire, seed=seed)
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
        "workdir": args.workdir, "queries": queries, "seeds": seeds, "steps": base.steps,
        "model": {k: v for k, v in model_config.items() if k != "rewire"},
        "training_flags": training_flags,
        "accuracy": {name: {str(p): {**recall.summarize([s["accuracy"] for s in scores]), "runs": scores}
                            for p, scores in by_pairs.items()} for name, by_pairs in results.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--pairs", default="4,8,16,32")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--seeds", default="0", help="comma list, e.g. 0,1,2")
    parser.add_argument("--eval_batches", type=int, default=8)
    parser.add_argument("--preset", default="tiny")
    args, training_flags = parser.parse_known_args(argv)
    try:
        report = run(args, training_flags)
    except (ConfigError, CheckpointError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = os.path.join(args.workdir, "eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "recall.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    curves = {name: {int(p): summary for p, summary in by_pairs.items()}
              for name, by_pairs in report["accuracy"].items()}
    recall.plot(curves, os.path.join(out, "recall.png"))
    for name, by_pairs in curves.items():
        print(f"{name}: " + "  ".join(f"pairs={p} acc={s['mean']:.3f}" for p, s in sorted(by_pairs.items())))
    print(f"wrote {out}/recall.json and recall.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
