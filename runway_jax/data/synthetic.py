"""Synthetic tasks, every example fully determined by ``(seed, index)``.

* Multi-query associative recall: ``k1 v1 k2 v2 ... kn vn`` then queries ``q a`` where each query
  q is one of the keys and the answer a its value; only the answers are scored.
* Passkey retrieval: a random number hidden at a chosen depth inside filler text, asked for at
  the end (the prompt is text; tokenize it with any tokenizer).
"""

from __future__ import annotations

import numpy as np

from runway_jax.data.errors import DataError

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def _rng(seed: int, index: int):
    return np.random.default_rng([seed, index])


def associative_recall(seed: int, index: int, *, num_pairs: int, num_queries: int,
                       num_keys: int = 64, num_values: int = 64, first_id: int = 0):
    """One recall example: ``tokens`` int32 ``[2 * (num_pairs + num_queries)]`` and ``loss_mask``
    bool (True where the *next-token target* is an answer, i.e. at every query token).

    Keys use ids ``first_id .. first_id + num_keys``, values the ``num_values`` ids after them.
    """
    if not 1 <= num_pairs <= num_keys:
        raise DataError(f"recall num_pairs={num_pairs} must be in [1, num_keys={num_keys}].")
    if num_queries < 1:
        raise DataError(f"recall num_queries={num_queries} must be >= 1.")
    rng = _rng(seed, index)
    keys = rng.choice(num_keys, size=num_pairs, replace=False) + first_id
    values = rng.integers(0, num_values, size=num_pairs) + first_id + num_keys
    asked = rng.integers(0, num_pairs, size=num_queries)
    context = np.stack([keys, values], 1).reshape(-1)
    queries = np.stack([keys[asked], values[asked]], 1).reshape(-1)
    tokens = np.concatenate([context, queries]).astype(np.int32)
    loss_mask = np.zeros(tokens.shape, bool)
    loss_mask[len(context)::2] = True  # each query token predicts its answer
    return {"tokens": tokens, "loss_mask": loss_mask}


def passkey(seed: int, index: int, *, filler_chars: int, depth: float, digits: int = 5,
            filler_text: str | None = None):
    """``(prompt, answer)``: a ``digits``-digit pass key stated at relative ``depth`` in [0, 1] of
    about ``filler_chars`` characters of filler, asked for at the end. The filler repeats
    :data:`FILLER`, or is ``filler_chars`` consecutive characters of ``filler_text`` (real text)
    from a place chosen by ``(seed, index)``."""
    if not 0.0 <= depth <= 1.0:
        raise DataError(f"passkey depth={depth} must be in [0, 1].")
    if digits < 1 or filler_chars < 0:
        raise DataError(f"passkey digits={digits} must be >= 1 and filler_chars={filler_chars} >= 0.")
    rng = _rng(seed, index)
    key = "".join(str(d) for d in [rng.integers(1, 10), *rng.integers(0, 10, size=digits - 1)])
    if filler_text:
        text = filler_text * (filler_chars // len(filler_text) + 1)  # short texts wrap around
        start = int(rng.integers(0, max(1, len(text) - filler_chars)))
        filler = text[start:start + filler_chars]
    else:
        filler = (FILLER * (filler_chars // len(FILLER) + 1))[:filler_chars]
    sentence_end = filler.rfind(". ", 0, int(depth * len(filler)))  # hide it between sentences
    cut = sentence_end + 2 if sentence_end >= 0 else 0
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    prompt = (
        "There is important information hidden inside a lot of irrelevant text. Find it and "
        "memorize it. " + filler[:cut] + needle + filler[cut:] + " What is the pass key? The pass key is "
    )
    return prompt, key
