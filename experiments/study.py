"""The study: does rewiring help? Trains every run of ``experiments/configs.py``, evaluates it,
and writes the figures and tables that ``docs/results.md`` cites.

    python experiments/study.py                    # the full study: 25 runs, about 55 min on 2 CPU cores
    python experiments/study.py --quick            # the same pipeline in a few minutes (smoke test)

Runs go to ``--workdir`` (default ``runs/study``, or ``runs/study_quick``); every run resumes
where it stopped and a finished run is evaluated once (``RUN/eval/study.json``), so an
interrupted study continues where it left off. Results: ``--out`` (default ``docs/results``, or
``WORKDIR/results`` with --quick) gets ``results.json`` (every number), ``tables.md`` (means,
spread and seed counts) and the PNG figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import configs  # noqa: E402  (experiments/configs.py)
import report  # noqa: E402  (experiments/report.py)
import runner  # noqa: E402  (experiments/runner.py)

from runway_jax.data import documents  # noqa: E402
from runway_jax.data.benchmark_formats import load_tasks  # noqa: E402
from runway_jax.evaluation import passkey, perplexity, runway_analysis, zero_shot  # noqa: E402
from runway_jax.evaluation.perplexity import windows  # noqa: E402
from runway_jax.evaluation.workdirs import load_trained  # noqa: E402
from runway_jax.files import write_json  # noqa: E402
from runway_jax.model import count_parameters  # noqa: E402
from runway_jax.training.loop import config_dict  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def evaluate(run, workdir, study, log):
    """Every evaluation ``run`` asks for, as one JSON-ready dict (cached in WORKDIR/eval)."""
    path = os.path.join(workdir, "eval", "study.json")
    if os.path.exists(path):
        with open(path) as handle:
            cached = json.load(handle)
        if cached.get("evaluations") == list(run.evaluations):
            return cached
    model, config, tokenizer, step = load_trained(workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        validation = [json.loads(line) for line in handle if "validation_loss" in line][-1]
    result = {"run": run.name, "group": run.group, "seed": run.seed, "step": step,
              "parameters": count_parameters(config.model), "evaluations": list(run.evaluations),
              "validation_loss": validation["validation_loss"],
              "validation_perplexity": validation["validation_perplexity"]}
    token_documents = [tokenizer.encode(text) for text in documents(config.data, "validation")]
    if "perplexity" in run.evaluations:
        lengths = [config.data.seq_len * m for m in study.length_multiples]
        by_length = perplexity.perplexity_by_length(model, token_documents, lengths,
                                                    max_windows=study.perplexity_windows)
        result["perplexity"] = {str(n): r["perplexity"] for n, r in by_length.items()}
        longest = by_length[max(by_length)]["position_loss"]
        result["position_loss"] = np.round(longest, 4).tolist()
        log("  perplexity by length: " + ", ".join(f"{n}: {r['perplexity']:.2f}" for n, r in by_length.items()))
    if "passkey" in run.evaluations:
        grid = passkey.passkey_grid(model, tokenizer, study.passkey_lengths, study.passkey_depths,
                                    trials=study.passkey_trials)
        result["passkey"] = grid
        log(f"  passkey rank accuracy {np.mean(grid['rank_accuracy']):.3f} "
            f"(chance {grid['chance_rank_accuracy']:.2f}), exact {np.mean(grid['exact_accuracy']):.3f}")
    if "zero_shot" in run.evaluations:
        tasks = {}
        for name in study.zero_shot_tasks:
            tasks.update(load_tasks(name))
        result["zero_shot"] = zero_shot.evaluate_tasks(model, tokenizer, tasks, max_length=config.data.seq_len,
                                                      limit=study.zero_shot_limit)
        log("  zero-shot acc " + ", ".join(f"{t}: {m['acc']:.3f}" for t, m in result["zero_shot"].items()))
    if "analysis" in run.evaluations:
        tokens = windows(token_documents, config.data.seq_len - 1, study.analysis_windows)
        layers = runway_analysis.attention_maps(model, tokens)
        result["early_token_mass"] = runway_analysis.early_token_mass(layers, early_tokens=4)
        result["dependence_by_distance"] = np.round(
            runway_analysis.dependence_by_distance(model, tokens, probes=4), 6).tolist()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, result, indent=1)
    return result


def run_recall(study, workdir, log):
    """eval/recall.py trains its own rewired and baseline models; run it as a program."""
    command = [sys.executable, os.path.join(ROOT, "eval", "recall.py"), f"--workdir={workdir}",
               *study.recall_flags]
    log("recall: " + " ".join(command[1:]))
    process = subprocess.run(command, capture_output=True, text=True)
    lines = (process.stdout + process.stderr).strip().splitlines()
    for line in lines:
        if "accuracy" in line or line.startswith(("rewired:", "baseline:", "error")):
            log(f"  {line}")
    if process.returncode:
        raise RuntimeError(f"eval/recall.py failed (exit {process.returncode}): {lines[-1] if lines else ''}")
    with open(os.path.join(workdir, "eval", "recall.json")) as handle:
        return json.load(handle)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny version of everything, in minutes")
    parser.add_argument("--workdir", default=None, help="where runs are trained (default runs/study[_quick])")
    parser.add_argument("--out", default=None, help="results (default docs/results, or WORKDIR/results)")
    parser.add_argument("--skip_recall", action="store_true")
    args = parser.parse_args(argv)
    study = configs.study(quick=args.quick)
    workdir = args.workdir or os.path.join("runs", "study_quick" if args.quick else "study")
    out = args.out or (os.path.join(workdir, "results") if args.quick else os.path.join(ROOT, "docs", "results"))
    os.makedirs(out, exist_ok=True)

    def log(line):
        print(line, flush=True)

    start = time.time()
    try:
        evaluated, _ = runner.train_in_order(
            study.runs, study.base, workdir, lambda run, run_dir: evaluate(run, run_dir, study, log), log)
    except runner.Stopped as stopped:
        log(str(stopped))
        return stopped.exit_code
    results = [evaluated[run.name] for run in study.runs]
    recall = None if args.skip_recall else run_recall(study, os.path.join(workdir, "recall"), log)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    summary = {"command": " ".join(["python", "experiments/study.py", *(argv if argv is not None else sys.argv[1:])]),
               "commit": commit, "quick": args.quick, "minutes": (time.time() - start) / 60,
               "base_config": config_dict(study.base), "study": _settings(study), "runs": results,
               "recall": recall}
    write_json(os.path.join(out, "results.json"), summary, indent=1)
    tables = report.write(summary, out)
    log(tables)
    log(f"wrote {out}/results.json, tables.md and figures in {(time.time() - start) / 60:.1f} min")
    return 0


def _settings(study):
    fields = dataclasses.asdict(study)
    fields.pop("base")
    fields["runs"] = [{"name": run.name, "model": {k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in run.model.items()}} for run in study.runs]
    return fields


if __name__ == "__main__":
    sys.exit(main())
