"""Round 2's retrieval part (issue 14, item 2): retrieval that a small model can learn.

The rewired and the standard model train on the Shakespeare stream with a share of synthetic
retrieval rows mixed in (``DataConfig.synthetic_share``: half a pass key hidden in the plays'
own text, half multi-query associative recall with the queries filling the row), at a training
length long enough for the passkey prompt (512 bytes). Each is then scored on

- passkey retrieval over a length x depth grid, 1x to 8x the training length, the key hidden in
  held-out text (``passkey.passkey_grid(filler_text=...)``): the paper's "stronger retrieval"
  and its lost-in-the-middle limit;
- associative recall at 1x, 2x and 4x the training length (``recall.recall_by_length``: the same
  pairs asked from farther away).

The prompts and recall examples depend only on fixed seeds, so the two models of a seed pair
answer the same items and every comparison is a paired bootstrap over items and seeds
(:mod:`runway_jax.evaluation.bootstrap`, the identity as the statistic: accuracies).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

import configs  # experiments/configs.py (the caller put experiments/ on sys.path)

from runway_jax.data import documents
from runway_jax.evaluation import bootstrap, passkey, plots, recall
from runway_jax.evaluation.workdirs import load_trained
from runway_jax.files import write_json

GROUPS = ("retrieval_rewired", "retrieval_baseline")
CANDIDATE, REFERENCE = GROUPS
MIDDLE_DEPTHS, END_DEPTHS = (0.25, 0.5, 0.75), (0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Settings:
    data: dict  # DataConfig fields of the retrieval runs
    passkey_multiples: tuple[int, ...]
    depths: tuple[float, ...]
    trials: int
    recall_multiples: tuple[int, ...]
    recall_examples: int


def settings(quick: bool = False) -> Settings:
    # 512 bytes: the passkey prompt's fixed text is ~200 bytes, so 512 leaves room for filler.
    # batch 4 x 512 keeps round 1's 2,048 tokens per step (the same token budget).
    # Recall rows: 16 pairs, then queries up to the row (2 * 256 = 512 tokens + 1).
    seq_len, pairs = (256, 4) if quick else (512, 16)
    data = {"seq_len": seq_len, "batch_size": 2 if quick else 4, "synthetic_share": 0.2,
            "recall_pairs": pairs, "recall_queries": (seq_len + 1) // 2 - pairs}
    if quick:
        return Settings(data, passkey_multiples=(1, 2), depths=(0.0, 0.5, 1.0), trials=2,
                        recall_multiples=(1, 2), recall_examples=4)
    return Settings(data, passkey_multiples=(1, 2, 4, 8),
                    depths=(0.0, 0.25, 0.5, 0.75, 1.0), trials=10, recall_multiples=(1, 2, 4),
                    recall_examples=32)


def runs(quick: bool = False) -> list:
    seeds = (0, 1) if quick else (0, 1, 2)
    data = settings(quick).data
    return [configs.Run(group, seed, {"rewire": group == CANDIDATE}, ("retrieval",), data=data)
            for seed in seeds for group in GROUPS]


def evaluate(run, workdir: str, quick: bool, log) -> dict:
    """Passkey grid and recall by length, cached in ``RUN/eval/round2_retrieval.json``."""
    chosen = settings(quick)
    path = os.path.join(workdir, "eval", "round2_retrieval.json")
    if os.path.exists(path):
        with open(path) as handle:
            cached = json.load(handle)
        if cached.get("settings") == plain_settings(chosen):
            return cached
    model, config, tokenizer, step = load_trained(workdir)
    held_out = " ".join(documents(dataclasses.replace(config.data, synthetic_share=0.0), "validation"))
    length = config.data.seq_len
    grid = passkey.passkey_grid(model, tokenizer, [length * m for m in chosen.passkey_multiples],
                                chosen.depths, trials=chosen.trials, seed=1_000_003, filler_text=held_out,
                                progress=lambda line: log(f"  passkey {line}"))
    by_length = recall.recall_by_length(model, [length * m for m in chosen.recall_multiples],
                                        num_pairs=config.data.recall_pairs,
                                        examples=chosen.recall_examples)
    log("  recall accuracy " + ", ".join(f"{n}: {r['accuracy']:.3f}" for n, r in by_length.items()))
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        validation = [json.loads(line) for line in handle if "validation_loss" in line][-1]
    result = {"run": run.name, "group": run.group, "seed": run.seed, "step": step,
              "settings": plain_settings(chosen), "training_length": length,
              "validation_perplexity": validation["validation_perplexity"], "passkey": grid,
              "recall": {str(n): r for n, r in by_length.items()}}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, result, indent=None)
    return result


def plain_settings(chosen: Settings) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(chosen)))


def _identity(x):
    return x


def _interval(candidate, reference, lower_is_better=False) -> dict:
    """Both intervals and the verdict, ``[S, W]`` each (accuracies: higher is better)."""
    out = {kind: bootstrap.paired_difference(candidate, reference, transform=_identity, resample=kind)
           for kind in ("items", "seeds_and_items")}
    out["per_seed"] = [float(a.mean() - b.mean()) for a, b in zip(np.atleast_2d(candidate),
                                                                  np.atleast_2d(reference))]
    out["verdict"] = bootstrap.verdict(out["seeds_and_items"], lower_is_better=lower_is_better)
    return out


def _trials(evaluation: dict, measure: str) -> np.ndarray:
    """``[lengths, depths, trials]`` 0/1 outcomes of one run's passkey grid."""
    return np.asarray(evaluation["passkey"][f"{measure}_correct"], np.float64)


def compare(evaluated: dict) -> dict:
    """Every retrieval comparison of ``evaluated`` (group -> seed -> evaluation), paired by seed."""
    seeds = sorted(set(evaluated[CANDIDATE]) & set(evaluated[REFERENCE]))
    pair = {group: [evaluated[group][s] for s in seeds] for group in GROUPS}
    first = pair[CANDIDATE][0]["passkey"]
    depths = np.asarray(first["depths"])
    middle, ends = np.isin(depths, MIDDLE_DEPTHS), np.isin(depths, END_DEPTHS)
    out = {"seeds": seeds, "lengths": first["lengths"], "depths": first["depths"]}
    for measure in ("rank", "exact"):
        grids = {g: np.stack([_trials(e, measure) for e in pair[g]]) for g in GROUPS}  # [S, L, D, T]
        flat = {g: grids[g].reshape(len(seeds), -1) for g in GROUPS}
        result = {"grid": _interval(flat[CANDIDATE], flat[REFERENCE]), "by_length": {}}
        for i, length in enumerate(first["lengths"]):
            rows = {g: grids[g][:, i].reshape(len(seeds), -1) for g in GROUPS}
            result["by_length"][str(length)] = _interval(rows[CANDIDATE], rows[REFERENCE])
        # Lost in the middle: the accuracy at the ends minus the middle, per (length, trial) item;
        # each model's gap (vs 0), and rewired's gap minus the baseline's.
        gap = {g: (grids[g][:, :, ends].mean(2) - grids[g][:, :, middle].mean(2)).reshape(len(seeds), -1)
               for g in GROUPS}
        zero = np.zeros_like(gap[CANDIDATE])
        result["middle_gap"] = {g: _interval(gap[g], zero) for g in GROUPS}
        # A smaller gap is better.
        result["middle_gap"]["rewired - baseline"] = _interval(gap[CANDIDATE], gap[REFERENCE],
                                                               lower_is_better=True)
        out[f"passkey_{measure}"] = result
    out["recall"] = {}
    for length in pair[CANDIDATE][0]["recall"]:
        values = {g: np.array([e["recall"][length]["example_accuracy"] for e in pair[g]]) for g in GROUPS}
        out["recall"][length] = _interval(values[CANDIDATE], values[REFERENCE])
    return out


def pooled_grid(evaluations: list) -> dict:
    """One model's passkey grid with its seeds' trials pooled (for the heatmaps)."""
    first = evaluations[0]["passkey"]
    pooled = dict(first, trials=first["trials"] * len(evaluations))
    for measure in ("exact", "rank"):
        trials = np.concatenate([_trials(e, measure) for e in evaluations], axis=-1)
        pooled[f"{measure}_accuracy"] = trials.mean(-1).tolist()
    pooled["training_length"] = evaluations[0]["training_length"]
    return pooled


def plot_recall(evaluated: dict, path: str) -> None:
    """Associative recall accuracy against the evaluation length, seeds as points."""
    plt = plots.pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    training_length = None
    for group in GROUPS:
        evaluations = list(evaluated[group].values())
        training_length = evaluations[0]["training_length"]
        lengths = sorted(int(n) for n in evaluations[0]["recall"])
        by_seed = np.array([[e["recall"][str(n)]["accuracy"] for n in lengths] for e in evaluations])
        line, = axis.plot(lengths, by_seed.mean(0), marker="o", label=group.removeprefix("retrieval_"))
        for row in by_seed:
            axis.scatter(lengths, row, color=line.get_color(), alpha=0.4, s=12)
    axis.axhline(1.0 / recall.NUM_VALUES, color="gray", linestyle=":", label="chance (1/64)")
    axis.set(xlabel="sequence length (tokens)", ylabel="answer accuracy", ylim=(-0.02, 1.02),
             title="associative recall beyond the training length")
    plots.length_axis(axis, lengths, training_length)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    plots.save_png(figure, path)


def write_figures(evaluated: dict, out: str) -> None:
    passkey.plot({group.removeprefix("retrieval_"): pooled_grid(list(evaluated[group].values()))
                  for group in GROUPS}, os.path.join(out, "passkey_heatmaps.png"))
    plot_recall(evaluated, os.path.join(out, "recall_by_length.png"))


def table(comparison: dict) -> str:
    """Markdown: every retrieval difference rewired - baseline with both intervals."""
    def row(label, result):
        items, both = result["items"], result["seeds_and_items"]
        return (f"| {label} | {both['rewired']:.3f} vs {both['baseline']:.3f} | {both['difference']:+.3f} "
                f"| [{items['low']:+.3f}, {items['high']:+.3f}] | [{both['low']:+.3f}, {both['high']:+.3f}] "
                f"| {', '.join(f'{v:+.3f}' for v in result['per_seed'])} | {result['verdict']} |")

    lines = ["| comparison | rewired vs baseline | difference | over items | over seeds and items "
             "| per seed | verdict |", "|---|---|---|---|---|---|---|"]
    for measure in ("rank", "exact"):
        result = comparison[f"passkey_{measure}"]
        lines.append(row(f"passkey {measure}, whole grid", result["grid"]))
        lines += [row(f"passkey {measure} @ {n}", r) for n, r in result["by_length"].items()]
        lines.append(row(f"passkey {measure}: (ends - middle) gap, smaller is better",
                         result["middle_gap"]["rewired - baseline"]))
    lines += [row(f"recall @ {n}", r) for n, r in comparison["recall"].items()]
    gaps = ["", "Each model's lost-in-the-middle gap (accuracy at depths 0 and 1 minus depths 0.25-0.75; "
            "above 0: the middle is worse):", "",
            "| model | measure | gap | over seeds and items | verdict |", "|---|---|---|---|---|"]
    meaning = {"better": "gap (middle worse)", "worse": "middle better", "not decided": "not decided"}
    for measure in ("rank", "exact"):
        for group in GROUPS:
            result = comparison[f"passkey_{measure}"]["middle_gap"][group]
            both = result["seeds_and_items"]
            gaps.append(f"| {group.removeprefix('retrieval_')} | {measure} | {both['difference']:+.3f} "
                        f"| [{both['low']:+.3f}, {both['high']:+.3f}] | {meaning[result['verdict']]} |")
    return "\n".join(lines + gaps)
