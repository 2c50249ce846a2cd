"""Multi-query associative recall: accuracy of trained models against the number of pairs.

An example (``runway_jax.data.synthetic.associative_recall``) lists ``num_pairs`` key-value pairs
and then asks ``num_queries`` of the keys again; the model must produce each key's value. This
module scores a trained model on held-out examples (a disjoint seed); the program
``eval/recall.py`` trains one rewired and one baseline model per pair count and seed with the
ordinary training loop, then calls :func:`recall_accuracy`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from runway_jax.data import make_dataset, synthetic
from runway_jax.evaluation import plots
from runway_jax.training.config import TrainConfig

NUM_KEYS = 64  # the key vocabulary of the synthetic task: at most this many pairs
NUM_VALUES = 64  # the value vocabulary (synthetic.associative_recall's default)


def recall_config(base: TrainConfig, *, num_pairs: int, num_queries: int, rewire: bool,
                  seed: int) -> TrainConfig:
    """``base`` trained on recall with ``num_pairs`` pairs: rows exactly one example long, the
    model rewired or not (everything else shared), ``seed`` for both initialization and data."""
    data = dataclasses.replace(base.data, source="recall", recall_pairs=num_pairs,
                               recall_queries=num_queries, seq_len=2 * (num_pairs + num_queries),
                               shuffle_seed=seed, validation_source=None)
    return base.replace(model=base.model.replace(rewire=rewire), data=data, seed=seed)


@nnx.jit
def _correct(model, batch):
    logits = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    correct = jnp.argmax(logits, axis=-1) == batch["targets"]
    return correct, batch["loss_mask"]


def recall_accuracy(model, config: TrainConfig, tokenizer, *, batches: int) -> dict:
    """Answer accuracy (argmax of the next-token logits at each query) and the share of examples
    with every answer right, over up to ``batches`` validation batches."""
    correct_answers = answers = perfect = examples = 0
    for index, batch in enumerate(make_dataset(config.data, "validation", tokenizer)):
        if index == batches:
            break
        correct, scored = jax.device_get(_correct(model, {k: jnp.asarray(v) for k, v in batch.items()}))
        scored = np.asarray(scored) > 0
        correct_answers += int((correct & scored).sum())
        answers += int(scored.sum())
        perfect += int(np.all(correct | ~scored, axis=1).sum())
        examples += correct.shape[0]
    return {"accuracy": correct_answers / answers, "sequence_accuracy": perfect / examples,
            "answers": answers, "examples": examples}


def recall_by_length(model, lengths, *, num_pairs: int, examples: int, seed: int = 1_000_001,
                     batch_size: int = 8) -> dict:
    """Recall at each sequence length in ``lengths`` (even, in tokens): ``num_pairs`` pairs, then
    queries up to the length, so that a longer sequence asks for the same pairs from farther
    away and at positions past those trained (the model saw rows of one length). Returns
    ``{length: {"accuracy", "example_accuracy": one per example}}``; the examples depend only on
    ``seed`` (kept apart from training's), so two models' examples pair up."""
    out = {}
    for length in lengths:
        if length % 2 or length // 2 <= num_pairs:
            raise ValueError(f"recall length {length} must be even and hold more than {num_pairs} pairs; "
                             "choose even lengths > 2 * num_pairs.")
        rows = [synthetic.associative_recall(seed, index, num_pairs=num_pairs,
                                             num_queries=length // 2 - num_pairs) for index in range(examples)]
        per_example = []
        for start in range(0, examples, batch_size):
            chunk = rows[start:start + batch_size]
            tokens = np.stack([row["tokens"] for row in chunk])
            batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                     "positions": np.broadcast_to(np.arange(length - 1, dtype=np.int32), tokens[:, 1:].shape),
                     "segment_ids": np.ones_like(tokens[:, 1:]),
                     "loss_mask": np.stack([row["loss_mask"][:-1] for row in chunk]).astype(np.float32)}
            correct, scored = jax.device_get(_correct(model, {k: jnp.asarray(v) for k, v in batch.items()}))
            scored = np.asarray(scored) > 0
            per_example += ((correct & scored).sum(1) / scored.sum(1)).tolist()
        out[int(length)] = {"accuracy": float(np.mean(per_example)), "example_accuracy": per_example,
                            "num_pairs": num_pairs}
    return out


def summarize(accuracies: list[float]) -> dict:
    """Mean, min and max over seeds."""
    return {"mean": float(np.mean(accuracies)), "min": float(np.min(accuracies)),
            "max": float(np.max(accuracies)), "seeds": len(accuracies)}


def plot(curves: dict, path: str, num_values: int = NUM_VALUES) -> None:
    """Accuracy against the number of pairs, one line per model (band: min..max over seeds), with
    two chance levels: guessing one of the ``num_values`` values, and one of the P values listed
    in the example (what a model that knows the format but cannot retrieve scores)."""
    plt = plots.pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for name, by_pairs in curves.items():
        pairs = sorted(by_pairs)
        axis.plot(pairs, [by_pairs[p]["mean"] for p in pairs], marker="o", label=name)
        axis.fill_between(pairs, [by_pairs[p]["min"] for p in pairs], [by_pairs[p]["max"] for p in pairs],
                          alpha=0.2)
    every = sorted({p for by_pairs in curves.values() for p in by_pairs})
    axis.plot(every, [1.0 / p for p in every], color="k", linestyle="--", linewidth=1,
              label="chance: 1 / pairs (a listed value)")
    axis.axhline(1.0 / num_values, color="gray", linestyle=":", linewidth=1,
                 label=f"chance: 1 / {num_values} (any value)")
    axis.set(xscale="log", xlabel="key-value pairs", ylabel="answer accuracy", ylim=(-0.02, 1.02),
             title="multi-query associative recall")
    axis.set_xticks(every, [str(p) for p in every])
    axis.xaxis.set_minor_locator(plt.matplotlib.ticker.NullLocator())
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    plots.save_png(figure, path)
