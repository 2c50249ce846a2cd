"""Passkey retrieval over a grid of prompt lengths x key depths.

Each prompt (``runway_jax.data.synthetic.passkey``) hides a random number at a relative depth in
filler text and asks for it at the end. Two scores per cell:

* exact: greedy decoding of as many tokens as the key has reproduces the key exactly;
* rank: the true key's log-likelihood beats ``distractors`` other random keys (rank 0).

Prompts of one length are left-padded to a common size in a padding segment of their own (and
positions restart at the prompt), so one compiled shape serves a whole row of the grid and the
padding cannot change the result (METHOD (5)).
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from runway_jax.data import synthetic
from runway_jax.evaluation import plots


@nnx.jit
def _log_probs(model, tokens, positions, segments):
    logits = model(tokens, positions=positions, segment_ids=segments)
    return jax.nn.log_softmax(logits, axis=-1)


def _layout(prompt, answer_length, total):
    """Left-padded tokens/positions/segments of ``prompt`` followed by ``answer_length`` slots."""
    padding = total - len(prompt) - answer_length
    tokens = np.zeros(total, np.int32)
    tokens[padding:padding + len(prompt)] = prompt
    segments = np.r_[np.zeros(padding, np.int32), np.ones(total - padding, np.int32)]
    positions = np.r_[np.arange(padding), np.arange(total - padding)].astype(np.int32)
    return tokens, positions, segments, padding + len(prompt)


def _chars_per_token(tokenizer, text):
    sample = text[:20_000] if len(text) >= 2_000 else text * (2_000 // max(1, len(text)) + 1)
    return len(sample) / len(tokenizer.encode(sample))


def passkey_cell(model, tokenizer, length, depth, *, trials, seed, digits, distractors,
                 filler_text=None) -> dict:
    """One (length, depth) cell: ``exact`` and ``rank`` (one bool per trial) and the mean
    ``prompt_tokens``. The filler repeats ``synthetic.FILLER``, or is real text cut from
    ``filler_text`` (e.g. held-out documents) at a place drawn per trial."""
    overhead = len(tokenizer.encode(synthetic.passkey(0, 0, filler_chars=0, depth=0.0, digits=digits)[0]))
    filler = max(0, int((length - overhead) * _chars_per_token(tokenizer, filler_text or synthetic.FILLER)))
    rng = np.random.default_rng([seed, length, int(depth * 1000)])
    exact, ranked, sizes = [], [], []
    for trial in range(trials):
        # A different, reproducible key for every trial of every cell.
        index = (length * 10_000 + int(depth * 1000)) * 1_000 + trial
        prompt_text, key = synthetic.passkey(seed, index, filler_chars=filler, depth=depth, digits=digits,
                                             filler_text=filler_text)
        prompt = tokenizer.encode(prompt_text)
        sizes.append(len(prompt))
        # Distractors drawn like keys (no leading zero), so that only retrieval can rank the key first.
        candidates = [key] + [str(rng.integers(10 ** (digits - 1), 10 ** digits)) for _ in range(distractors)]
        encoded = [tokenizer.encode(c) for c in candidates]
        answer_length = max(len(e) for e in encoded)
        total = len(prompt) + answer_length
        # Rank: the summed log-probability of each candidate's tokens after the prompt.
        rows = [_layout(prompt, answer_length, total) for _ in candidates]
        tokens = np.stack([r[0] for r in rows])
        for row, answer in enumerate(encoded):
            tokens[row, rows[row][3]:rows[row][3] + len(answer)] = answer
        log_probs = np.asarray(_log_probs(model, jnp.asarray(tokens), jnp.asarray(np.stack([r[1] for r in rows])),
                                          jnp.asarray(np.stack([r[2] for r in rows]))))
        start = rows[0][3]
        scores = [sum(log_probs[row, start - 1 + i, token] for i, token in enumerate(answer))
                  for row, answer in enumerate(encoded)]
        ranked.append(bool(np.argmax(scores) == 0))
        # Exact: greedy decoding, one slot at a time, in the same fixed shape.
        greedy, positions, segments, start = _layout(prompt, len(encoded[0]), len(prompt) + len(encoded[0]))
        for slot in range(len(encoded[0])):
            step = np.asarray(_log_probs(model, jnp.asarray(greedy[None]), jnp.asarray(positions[None]),
                                         jnp.asarray(segments[None])))
            greedy[start + slot] = int(np.argmax(step[0, start + slot - 1]))
        exact.append(tokenizer.decode(greedy[start:]) == key)
    return {"exact": exact, "rank": ranked, "prompt_tokens": int(np.mean(sizes))}


def passkey_grid(model, tokenizer, lengths, depths, *, trials=4, seed=0, digits=5, distractors=9,
                 filler_text=None, progress=None) -> dict:
    """Accuracy over ``lengths`` (prompt tokens) x ``depths`` (0 = start, 1 = end), and each
    trial's outcome (``exact_correct``/``rank_correct`` ``[length][depth][trial]``; the prompts
    depend only on ``seed``, so two models' trials pair up for a paired comparison)."""
    exact = np.zeros((len(lengths), len(depths), trials), bool)
    ranked = np.zeros_like(exact)
    sizes = np.zeros(len(lengths), int)
    cells = len(lengths) * len(depths)
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            cell = passkey_cell(model, tokenizer, length, depth, trials=trials, seed=seed, digits=digits,
                                distractors=distractors, filler_text=filler_text)
            exact[i, j], ranked[i, j], sizes[i] = cell["exact"], cell["rank"], cell["prompt_tokens"]
            if progress:
                progress(f"[{i * len(depths) + j + 1}/{cells}] length {length} depth {depth:.2f}: "
                         f"exact {exact[i, j].mean():.2f}, rank {ranked[i, j].mean():.2f}")
    return {"lengths": [int(n) for n in lengths], "prompt_tokens": sizes.tolist(),
            "depths": [float(d) for d in depths], "exact_accuracy": exact.mean(-1).tolist(),
            "rank_accuracy": ranked.mean(-1).tolist(), "exact_correct": exact.astype(int).tolist(),
            "rank_correct": ranked.astype(int).tolist(), "trials": trials, "digits": digits,
            "distractors": distractors, "chance_rank_accuracy": 1.0 / (distractors + 1),
            "filler": "text" if filler_text else "synthetic"}


def plot(named_results: dict, path: str) -> None:
    """Heatmaps of exact and rank accuracy (length x depth), one row per model; each cell shows
    its count of right answers out of the trials, each title the chance level (a results dict
    with ``training_length`` also gets that length's tick labelled)."""
    plt = plots.pyplot()
    names = list(named_results)
    figure, axes = plt.subplots(len(names), 2, figsize=(11, 3.8 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        results = named_results[name]
        trials, training_length = results["trials"], results.get("training_length")
        digits = results.get("digits", 5)
        # Guessing: a random key of `digits` digits (no leading zero), or rank 0 of 1 + distractors.
        chances = {"exact_accuracy": 1.0 / (9 * 10 ** (digits - 1)),
                   "rank_accuracy": results["chance_rank_accuracy"]}
        for column, measure in enumerate(("exact_accuracy", "rank_accuracy")):
            axis = axes[row, column]
            grid = np.asarray(results[measure])
            image = axis.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
            for (i, j), value in np.ndenumerate(grid):
                axis.text(j, i, f"{round(value * trials)}/{trials}", ha="center", va="center",
                          color="w" if value < 0.6 else "k", fontsize=8)
            axis.set_xticks(range(len(results["depths"])), [f"{d:.2f}" for d in results["depths"]])
            axis.set_yticks(range(len(results["lengths"])),
                            [f"{n} (train)" if n == training_length else str(n) for n in results["lengths"]])
            chance = chances[measure]
            shown = f"1/{round(1 / chance):,}" if chance < 0.01 else f"{chance:.2f}"
            axis.set(xlabel="depth of the key (0: start, 1: end)", ylabel="prompt length (tokens)",
                     title=f"{name}: {measure.replace('_', ' ')}\n(chance {shown}; {trials} trials per cell)")
            bar = figure.colorbar(image, ax=axis)
            bar.set_label(f"share of {trials} trials right (red: chance)")
            bar.ax.axhline(chance, color="r", linewidth=2)  # chance level on the colour scale
    plots.save_png(figure, path)
