"""Passkey retrieval over a grid of prompt lengths x key depths.

Each prompt (``runway_jax.data.synthetic.passkey``) hides a random number at a relative depth in
filler text and asks for it at the end. Two scores per cell:

* exact: greedy decoding of as many tokens as the key has reproduces the key exactly;
* rank: the true key's log-likelihood beats ``distractors`` other random keys (rank 0).

Each prompt is read once, in one parallel prefill of the decoding cache (``runway_jax.decoding``,
exact to the full forward pass); the greedy answer and all candidates' likelihoods are decoded
from that cache, so a trial costs one prompt pass however many candidates there are. Prompts are
right-padded to a multiple of ``PROMPT_BUCKET`` tokens, which no real position sees.
"""

from __future__ import annotations

import functools

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from runway_jax import decoding
from runway_jax.data import synthetic
from runway_jax.evaluation import plots


PROMPT_BUCKET = 64  # prompts are right-padded to a multiple of this: few compiled shapes


@functools.partial(jax.jit, static_argnums=(0,))
def _score(graphdef, state, prompt, prompt_length, candidates, candidate_lengths):
    """One parallel prefill of the prompt (right-padded, ``prompt_length`` real tokens), then from
    its cache: the greedy continuation of ``A`` tokens, and each candidate's summed log-probability
    of its first ``candidate_lengths[c]`` tokens (``candidates`` ``[C, A]``) after the prompt."""
    model = nnx.merge(graphdef, state)
    answer_length = candidates.shape[1]
    cache = decoding.init_cache(model, 1, prompt.shape[0] + answer_length)
    logits, cache = decoding.prefill(model, cache, prompt[None], prompt_length[None])
    greedy, step_logits, step_cache = [], logits, cache
    for _ in range(answer_length):
        token = jnp.argmax(step_logits, axis=-1)
        greedy.append(token[0])
        step_logits, step_cache = decoding.decode_step(model, step_cache, token)
    count = candidates.shape[0]
    cache = jax.tree.map(lambda leaf: jnp.repeat(leaf, count, axis=0), cache)
    log_probs = jax.nn.log_softmax(jnp.repeat(logits, count, axis=0), axis=-1)
    total = jnp.zeros((count,), jnp.float32)
    for slot in range(answer_length):
        token = candidates[:, slot]
        scored = jnp.take_along_axis(log_probs, token[:, None], axis=1)[:, 0]
        total += jnp.where(slot < candidate_lengths, scored, 0.0)
        if slot + 1 < answer_length:
            step_logits, cache = decoding.decode_step(model, cache, token)
            log_probs = jax.nn.log_softmax(step_logits, axis=-1)
    return jnp.stack(greedy), total


@nnx.jit
def _log_probs(model, tokens):
    return jax.nn.log_softmax(model(tokens), axis=-1)


def _score_by_forward_passes(model, prompt, candidates, answer_length):
    """``_score`` for a model without a decoding cache: one forward pass of every candidate after
    the prompt, and one per greedy token (right padding: causal, so it changes nothing)."""
    rows = np.zeros((len(candidates), len(prompt) + answer_length), np.int32)
    rows[:, :len(prompt)] = prompt
    for row, candidate in enumerate(candidates):
        rows[row, len(prompt):len(prompt) + len(candidate)] = candidate
    log_probs = np.asarray(_log_probs(model, jnp.asarray(rows)))
    scores = np.array([sum(log_probs[row, len(prompt) - 1 + i, token] for i, token in enumerate(candidate))
                       for row, candidate in enumerate(candidates)])
    greedy = rows[:1].copy()
    for slot in range(answer_length):
        step = np.asarray(_log_probs(model, jnp.asarray(greedy)))
        greedy[0, len(prompt) + slot] = int(np.argmax(step[0, len(prompt) + slot - 1]))
    return greedy[0, len(prompt):], scores


def score_answers(model, prompt, candidates):
    """``(greedy, scores)``: the model's greedy continuation of ``prompt`` (token ids) for as many
    tokens as the longest candidate, and each candidate's log-probability after the prompt. A
    model with ``init_cache`` (``TransformerLM``) reads the prompt once; any other model called
    as ``model(tokens)`` is scored by full forward passes."""
    answer_length = max(len(c) for c in candidates)
    if not hasattr(model, "init_cache"):
        return _score_by_forward_passes(model, prompt, candidates, answer_length)
    padded = -(-len(prompt) // PROMPT_BUCKET) * PROMPT_BUCKET
    tokens = np.zeros(padded, np.int32)
    tokens[:len(prompt)] = prompt
    table = np.zeros((len(candidates), answer_length), np.int32)
    for row, candidate in enumerate(candidates):
        table[row, :len(candidate)] = candidate
    graphdef, state = nnx.split(model)
    greedy, scores = _score(graphdef, state, jnp.asarray(tokens), jnp.int32(len(prompt)),
                            jnp.asarray(table), jnp.asarray([len(c) for c in candidates], jnp.int32))
    return np.asarray(greedy), np.asarray(scores)


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
        greedy, scores = score_answers(model, prompt, encoded)
        ranked.append(bool(np.argmax(scores) == 0))
        exact.append(tokenizer.decode(greedy[:len(encoded[0])].tolist()) == key)
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
