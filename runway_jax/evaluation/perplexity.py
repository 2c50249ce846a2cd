"""Perplexity against evaluation length, and loss against position.

For each evaluation length L, non-overlapping windows of L + 1 tokens are cut from the held-out
documents, shared equally between documents and spread evenly over each (documents shorter than a
window give none); the model sees L tokens and is
scored on the next-token loss at every position. The per-position curve shows whether loss keeps
falling with position or blows up past the training length (length extrapolation).
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
from flax import nnx

from runway_jax.evaluation import plots


def windows(token_documents, length: int, max_windows: int) -> np.ndarray:
    """Up to ``max_windows`` non-overlapping windows ``[N, length + 1]``, shared round-robin
    between the documents (each document gives as many as the others, while it has room) and
    spread evenly over each document, so that every length is measured on text from all
    documents and from their whole extent, not only their openings (title pages, cast lists)."""
    capacity = [len(tokens) // (length + 1) for tokens in token_documents]
    counts = [0] * len(capacity)
    while sum(counts) < max_windows and any(c < n for c, n in zip(counts, capacity)):
        for index, room in enumerate(capacity):
            if counts[index] < room and sum(counts) < max_windows:
                counts[index] += 1
    rows = []
    for tokens, count, room in zip(token_documents, counts, capacity):
        # Evenly spaced window indices from the first to the last that fits.
        for window in np.linspace(0, room - 1, count).round().astype(int) if count else []:
            start = int(window) * (length + 1)
            rows.append(np.asarray(tokens[start:start + length + 1], np.int32))
    return np.stack(rows) if rows else np.zeros((0, length + 1), np.int32)


@nnx.jit
def _position_losses(model, batch):
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])  # [N, L]


def perplexity_by_length(model, token_documents, lengths, *, max_windows: int | None = 16,
                         batch_size: int = 4, progress=None) -> dict:
    """``{L: {"loss", "perplexity", "windows", "position_loss": [L floats], "window_loss":
    [N floats]}}`` for each L; ``window_loss`` is each window's mean loss (for paired
    bootstrap intervals, :mod:`runway_jax.evaluation.bootstrap`). ``max_windows=None``: every
    non-overlapping window."""
    results = {}
    for number, length in enumerate(lengths, 1):
        limit = sum(len(tokens) // (length + 1) for tokens in token_documents)
        rows = windows(token_documents, length, limit if max_windows is None else max_windows)
        if len(rows) == 0:
            continue
        losses = np.concatenate([np.asarray(jax.device_get(_position_losses(model, rows[i:i + batch_size])))
                                 for i in range(0, len(rows), batch_size)])
        mean = float(losses.mean())
        results[int(length)] = {"loss": mean, "perplexity": math.exp(min(mean, 50.0)),
                                "windows": int(len(rows)),
                                "position_loss": losses.mean(axis=0).tolist(),
                                "window_loss": losses.mean(axis=1).tolist()}
        if progress:
            progress(f"[{number}/{len(lengths)}] length {length}: loss {mean:.4f}, "
                     f"perplexity {results[int(length)]['perplexity']:.2f} over {len(rows)} windows")
    return results


def plot(named_results: dict, training_length: int, path: str) -> None:
    """Perplexity vs length (the lengths ticked, the training length marked) and smoothed loss vs
    position, one line per model."""
    plt = plots.pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, results in named_results.items():
        lengths = sorted(results)
        left.plot(lengths, [results[n]["perplexity"] for n in lengths], marker="o", label=name)
        longest = results[lengths[-1]]["position_loss"]
        window = max(1, len(longest) // 64)
        smooth = np.convolve(longest, np.ones(window) / window, mode="valid")
        right.plot(np.arange(len(smooth)) + window // 2, smooth, label=f"{name} (T={lengths[-1]})")
    plots.length_axis(left, [n for results in named_results.values() for n in results], training_length)
    left.set_yscale("log")
    plots.plain_log_axis(left, "y")
    plots.mark_training_length(right, training_length)
    for axis in (left, right):
        axis.grid(True, alpha=0.3)
        axis.legend()
    left.set(xlabel="evaluation length (tokens)", ylabel="perplexity", title="perplexity vs length")
    right.set(xlabel="position", ylabel="next-token loss (nats)", title="loss vs position")
    plots.save_png(figure, path)
