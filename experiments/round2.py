"""The study, round 2: rewired-minus-baseline differences with paired bootstrap intervals, so that
each verdict carries its uncertainty (docs/results.md, "Round 2").

    python experiments/round2.py                       # every part below, resumable
    python experiments/round2.py --parts=precision     # one part
    python experiments/round2.py --quick               # the same pipeline at toy scale (tested)

Parts (the runs of each are listed by :func:`parts`):

- ``precision``: ``rewired``, ``baseline`` and ``baseline_matched_heads`` at seeds 0, 1, 2; the
  perplexity over EVERY non-overlapping window of the held-out plays at 1x, 2x, 4x and 8x the
  training length (round 1 used 24 windows), compared with paired bootstrap intervals over the
  windows alone and over seeds and windows (:mod:`runway_jax.evaluation.bootstrap`).
- ``beta``: the rewired model at beta 0.25, 0.5 and 2 (beta 1 is ``rewired``), seeds 0, 1, 2,
  evaluated alike and each compared with beta 1, seed by seed.
- ``retrieval``: rewired and baseline trained with retrieval rows mixed into the text, scored on
  passkey retrieval (length x depth, 1x-8x) and associative recall (1x-4x): see
  ``experiments/round2_retrieval.py``.

Runs are trained in ``WORKDIR/runs/GROUP/seedS`` with the configurations of
``experiments/configs.py`` (the layout of ``experiments/study.py``: the same ``--workdir`` reuses
round 1's runs, which these repeat exactly), and resume where they stopped; a finished run is
evaluated once (``RUN/eval/round2.json``). ``--out`` (default ``docs/results/round2``, or
``WORKDIR/round2`` with --quick) gets ``results.json`` (every interval), ``window_losses.npz``
(each run's loss per window, to recompute any interval), ``tables.md`` and the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import configs  # noqa: E402  (experiments/configs.py)
import round2_report  # noqa: E402  (experiments/round2_report.py)
import round2_retrieval  # noqa: E402  (experiments/round2_retrieval.py)
import runner  # noqa: E402  (experiments/runner.py)

from runway_jax.data import documents  # noqa: E402
from runway_jax.evaluation import bootstrap, perplexity  # noqa: E402
from runway_jax.evaluation.workdirs import load_trained  # noqa: E402
from runway_jax.files import atomic_write, write_json  # noqa: E402
from runway_jax.model import count_parameters  # noqa: E402
from runway_jax.training.loop import config_dict  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("precision", "beta", "retrieval")
BETAS = (0.25, 0.5, 2.0)
QUICK_WINDOWS = 64  # per length with --quick; the study itself scores every window


def parts(quick: bool = False) -> dict:
    """``{part: [configs.Run, ...]}``: every run of each part (a run may serve several parts)."""
    seeds = (0, 1) if quick else (0, 1, 2)
    width = configs.study(quick).base.model.features // configs.study(quick).base.model.num_heads
    heads = configs.study(quick).base.model.num_heads
    perplexity_only = ("perplexity",)
    main = [configs.Run(group, seed, fields, perplexity_only) for seed in seeds
            for group, fields in (("rewired", {"rewire": True}), ("baseline", {"rewire": False}),
                                  ("baseline_matched_heads", {"rewire": False, "num_heads": heads - 1,
                                                              "head_dim": width}))]
    betas = (0.5,) if quick else BETAS
    beta = [configs.Run(f"rewired_beta_{value:g}", seed, {"rewire": True, "beta": value},
                        perplexity_only) for value in betas for seed in seeds]
    return {"precision": main, "beta": [run for run in main if run.group == "rewired"] + beta,
            "retrieval": round2_retrieval.runs(quick)}


COMPARISONS = {  # part: (candidate group, reference group) pairs, differences candidate - reference
    "precision": (("rewired", "baseline"), ("rewired", "baseline_matched_heads")),
    "beta": tuple((f"rewired_beta_{value:g}", "rewired") for value in BETAS),
}


def evaluate(run, workdir, lengths, log, max_windows=None) -> dict:
    """Perplexity over every window at each length (``max_windows=None``), cached in
    ``RUN/eval/round2.json``."""
    path = os.path.join(workdir, "eval", "round2.json")
    if os.path.exists(path):
        with open(path) as handle:
            cached = json.load(handle)
        if cached.get("lengths") == list(lengths) and cached.get("max_windows") == max_windows:
            return cached
    model, config, tokenizer, step = load_trained(workdir)
    token_documents = [tokenizer.encode(text) for text in documents(config.data, "validation")]
    by_length = perplexity.perplexity_by_length(
        model, token_documents, lengths, max_windows=max_windows, batch_size=32,
        progress=lambda line: log(f"  {line}"))
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        validation = [json.loads(line) for line in handle if "validation_loss" in line][-1]
    result = {"run": run.name, "group": run.group, "seed": run.seed, "step": step,
              "parameters": count_parameters(config.model), "lengths": list(lengths),
              "max_windows": max_windows,
              "validation_perplexity": validation["validation_perplexity"],
              "perplexity": {str(n): r["perplexity"] for n, r in by_length.items()},
              "windows": {str(n): r["windows"] for n, r in by_length.items()},
              "window_loss": {str(n): np.round(r["window_loss"], 6).tolist()
                              for n, r in by_length.items()}}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, result, indent=None)
    return result


def compare(evaluated: dict, candidate: str, reference: str, lengths) -> dict:
    """``{L: {"items": interval, "seeds_and_items": interval, "verdict": ...}}`` of the perplexity
    difference candidate - reference, paired by seed (the seeds both groups have) and window."""
    seeds = sorted(set(evaluated[candidate]) & set(evaluated[reference]))
    out = {}
    for length in map(str, lengths):
        a = np.array([evaluated[candidate][s]["window_loss"][length] for s in seeds])
        b = np.array([evaluated[reference][s]["window_loss"][length] for s in seeds])
        intervals = {kind: bootstrap.paired_difference(a, b, resample=kind)
                     for kind in ("items", "seeds_and_items")}
        intervals["per_seed"] = [float(np.exp(x.mean()) - np.exp(y.mean())) for x, y in zip(a, b)]
        intervals["verdict"] = bootstrap.verdict(intervals["seeds_and_items"])
        out[length] = intervals
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
    parser.add_argument("--quick", action="store_true", help="a tiny version of everything, in minutes")
    parser.add_argument("--workdir", default=None, help="where runs are trained (default runs/study[_quick])")
    parser.add_argument("--out", default=None, help="results (default docs/results/round2, or WORKDIR/round2)")
    args = parser.parse_args(argv)
    chosen = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown or not chosen:
        parser.error(f"--parts={args.parts!r}: choose from {', '.join(PARTS)}")
    study = configs.study(quick=args.quick)
    workdir = args.workdir or os.path.join("runs", "study_quick" if args.quick else "study")
    out = args.out or (os.path.join(workdir, "round2") if args.quick
                       else os.path.join(ROOT, "docs", "results", "round2"))
    os.makedirs(out, exist_ok=True)
    lengths = [study.base.data.seq_len * m for m in study.length_multiples]

    def log(line):
        print(line, flush=True)

    all_runs = parts(args.quick)
    runs = list({run.name: run for part in chosen for run in all_runs[part]}.values())
    start = time.time()
    max_windows = QUICK_WINDOWS if args.quick else None

    def evaluate_run(run, run_dir):
        if "retrieval" in run.evaluations:
            return round2_retrieval.evaluate(run, run_dir, args.quick, log)
        return evaluate(run, run_dir, lengths, log, max_windows)

    try:
        results, seconds = runner.train_in_order(runs, study.base, workdir, evaluate_run, log)
    except runner.Stopped as stopped:
        log(str(stopped))
        return stopped.exit_code
    evaluated = {}  # group -> seed -> evaluation
    for run in runs:
        evaluated.setdefault(run.group, {})[run.seed] = results[run.name]
    text_runs = [run for run in runs if "retrieval" not in run.evaluations]
    comparisons = {}
    for part in chosen:
        for candidate, reference in COMPARISONS.get(part, ()):
            if candidate in evaluated and reference in evaluated:
                comparisons[f"{candidate} - {reference}"] = compare(evaluated, candidate, reference,
                                                                   lengths)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    command = " ".join(["python", "experiments/round2.py", *(argv if argv is not None else sys.argv[1:])])
    summary = {"command": command, "commit": commit, "quick": args.quick, "parts": chosen,
               "minutes": (time.time() - start) / 60, "seconds_per_run": seconds,
               "base_config": config_dict(study.base), "lengths": lengths,
               "runs": [{key: value for key, value in evaluated[run.group][run.seed].items()
                         if key != "window_loss"} for run in text_runs],
               "comparisons": comparisons}
    if "retrieval" in chosen:
        retrieval = {group: evaluated[group] for group in round2_retrieval.GROUPS}
        summary["retrieval"] = {
            "settings": round2_retrieval.plain_settings(round2_retrieval.settings(args.quick)),
            "runs": [evaluated[run.group][run.seed] for run in runs if "retrieval" in run.evaluations],
            "comparison": round2_retrieval.compare(retrieval)}
    write_json(os.path.join(out, "results.json"), summary, indent=1)
    losses = {f"{run.group}/seed{run.seed}/{n}": np.asarray(evaluated[run.group][run.seed]["window_loss"][str(n)],
                                                          np.float32)
              for run in text_runs for n in lengths}
    with atomic_write(os.path.join(out, "window_losses.npz"), "wb", encoding=None) as handle:
        np.savez_compressed(handle, **losses)
    tables = round2_report.write(summary, out)
    log(tables)
    log(f"wrote {out}/results.json, window_losses.npz, tables.md and figures in "
        f"{(time.time() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
