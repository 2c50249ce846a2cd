"""Perplexity against evaluation length, and loss against position.

For each evaluation length L, non-overlapping windows of L + 1 tokens are cut from the held-out
documents, round-robin over documents (documents shorter than a window give none); the model sees L tokens and is
scored on the next-token loss at every position. The per-position curve shows whether loss keeps
falling with position or blows up past the training length (length extrapolation).
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
from flax import nnx


def windows(token_documents, length: int, max_windows: int) -> np.ndarray:
    """Up to ``max_windows`` windows ``[N, length + 1]``, round-robin over the documents (the
    first window of every document, then the second, ...), so that every length is measured on
    text from all documents."""
    rows = []
    for index in range(max(len(tokens) for tokens in token_documents) // (length + 1)):
        for tokens in token_documents:
            start = index * (length + 1)
            if start + length + 1 <= len(tokens):
                rows.append(np.asarray(tokens[start:start + length + 1], np.int32))
                if len(rows) == max_windows:
                    return np.stack(rows)
    return np.stack(rows) if rows else np.zeros((0, length + 1), np.int32)


@nnx.jit
def _position_losses(model, batch):
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])  # [N, L]


def perplexity_by_length(model, token_documents, lengths, *, max_windows: int = 16,
                         batch_size: int = 4, progress=None) -> dict:
    """``{L: {"loss", "perplexity", "windows", "position_loss": [L floats]}}`` for each L."""
    results = {}
    for number, length in enumerate(lengths, 1):
        rows = windows(token_documents, length, max_windows)
        if len(rows) == 0:
            continue
        losses = np.concatenate([np.asarray(jax.device_get(_position_losses(model, rows[i:i + batch_size])))
                                 for i in range(0, len(rows), batch_size)])
        mean = float(losses.mean())
        results[int(length)] = {"loss": mean, "perplexity": math.exp(min(mean, 50.0)),
                                "windows": int(len(rows)),
                                "position_loss": losses.mean(axis=0).tolist()}
        if progress:
            progress(f"[{number}/{len(lengths)}] length {length}: loss {mean:.4f}, "
                     f"perplexity {results[int(length)]['perplexity']:.2f} over {len(rows)} windows")
    return results


def plot(named_results: dict, training_length: int, path: str) -> None:
    """Perplexity vs length and smoothed loss vs position, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, results in named_results.items():
        lengths = sorted(results)
        left.plot(lengths, [results[n]["perplexity"] for n in lengths], marker="o", label=name)
        longest = results[lengths[-1]]["position_loss"]
        window = max(1, len(longest) // 64)
        smooth = np.convolve(longest, np.ones(window) / window, mode="valid")
        right.plot(np.arange(len(smooth)) + window // 2, smooth, label=f"{name} (T={lengths[-1]})")
    for axis in (left, right):
        axis.axvline(training_length, color="gray", linestyle="--", linewidth=1)
        axis.grid(True, alpha=0.3)
        axis.legend()
    left.set(xscale="log", yscale="log", xlabel="evaluation length (tokens)", ylabel="perplexity",
             title="perplexity vs length (dashed: training length)")
    right.set(xlabel="position", ylabel="next-token loss (nats)", title="loss vs position")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
