"""Paired bootstrap intervals for rewired-minus-baseline differences, and the verdict they allow.

A comparison has ``S`` seed pairs (rewired seed s and baseline seed s share the initialization
stream and the data order) and ``W`` evaluation items (windows of held-out text, retrieval
prompts) that every model is scored on. ``values`` are per-item means, ``[S, W]`` per model. The
statistic is ``transform(mean)`` of each model, e.g. ``np.exp`` of the mean loss (perplexity; all
windows of one length have the same number of tokens, so the mean of window means is the token
mean) or the identity for an accuracy. Resampling keeps the pairing: one draw of items (and of
seed pairs) is applied to both models.

Two intervals answer two questions:

- ``resample="items"`` holds the trained models fixed and asks how much the difference depends on
  which text they were scored on (evaluation noise only);
- ``resample="seeds_and_items"`` also redraws the seed pairs (a two-level bootstrap), so the
  interval includes training noise. With 3 seeds it is coarse (10 distinct multisets of seeds),
  and it is the one a verdict uses.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 4000
CONFIDENCE = 0.95
VERDICTS = ("better", "worse", "not decided")  # the candidate (first) against the reference


def _weights(rng, resamples, size):
    """``[resamples, size]`` multinomial counts / size: the weights of one bootstrap draw each."""
    draws = rng.integers(0, size, size=(resamples, size))
    counts = np.zeros((resamples, size))
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1.0)
    return counts / size


def paired_difference(rewired, baseline, *, transform=np.exp, resample="seeds_and_items",
                      resamples=RESAMPLES, confidence=CONFIDENCE, seed=0) -> dict:
    """The statistic's difference ``rewired - baseline`` and relative difference
    ``rewired / baseline - 1`` with percentile bootstrap intervals.

    ``rewired``, ``baseline``: ``[S, W]`` per-item means (or ``[W]`` for one seed pair), paired by
    row (seed) and column (item). Returns floats ``difference``, ``low``, ``high``, ``relative``,
    ``relative_low``, ``relative_high`` (None where a draw of the reference is 0) and the counts
    ``seeds``, ``items``, ``resamples``.
    """
    rewired, baseline = np.atleast_2d(np.asarray(rewired, np.float64)), np.atleast_2d(
        np.asarray(baseline, np.float64))
    if rewired.shape != baseline.shape:
        raise ValueError(f"paired_difference: rewired {rewired.shape} and baseline "
                         f"{baseline.shape} must pair the same seeds and items.")
    if resample not in ("items", "seeds_and_items"):
        raise ValueError(f"resample={resample!r} is not 'items' or 'seeds_and_items'.")
    seeds, items = rewired.shape
    rng = np.random.default_rng(seed)
    item_weights = _weights(rng, resamples, items)  # [R, W]
    if resample == "items" or seeds == 1:
        seed_weights = np.full((resamples, seeds), 1.0 / seeds)
    else:
        seed_weights = _weights(rng, resamples, seeds)  # [R, S]

    def statistic(values, item_w, seed_w):
        per_seed = item_w @ values.T  # [R, S]: each seed's mean over the drawn items
        return transform(np.sum(seed_w * per_seed, axis=-1))

    point = (transform(rewired.mean()), transform(baseline.mean()))
    drawn = (statistic(rewired, item_weights, seed_weights),
             statistic(baseline, item_weights, seed_weights))
    tails = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    low, high = np.percentile(drawn[0] - drawn[1], tails)
    if np.all(drawn[1] != 0):
        relative = float(point[0] / point[1] - 1)
        relative_low, relative_high = (float(v) for v in np.percentile(drawn[0] / drawn[1] - 1, tails))
    else:  # e.g. an accuracy of 0 for the reference: no relative difference
        relative = relative_low = relative_high = None
    return {"difference": float(point[0] - point[1]), "low": float(low), "high": float(high),
            "relative": relative, "relative_low": relative_low,
            "relative_high": relative_high, "rewired": float(point[0]),
            "baseline": float(point[1]), "seeds": int(seeds), "items": int(items),
            "resamples": int(resamples), "resample": resample}


def verdict(interval: dict, *, lower_is_better: bool = True) -> str:
    """``"better"`` if the whole interval of the difference (candidate - reference, e.g. rewired
    - baseline) favours the candidate, ``"worse"`` if it all favours the reference, else ``"not
    decided"``."""
    low, high = interval["low"], interval["high"]
    if lower_is_better:
        low, high = -high, -low
    if low > 0:
        return VERDICTS[0]
    if high < 0:
        return VERDICTS[1]
    return VERDICTS[2]
