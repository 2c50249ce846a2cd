"""Zero-shot multiple choice by log-likelihood, in lm-evaluation-harness's conventions.

Choice c of an example is scored by ``LL_c = sum_i log p(continuation token i | context, earlier
continuation tokens)``. Per task:

* ``acc``: the labelled choice has the largest ``LL_c``;
* ``acc_norm``: the labelled choice has the largest ``LL_c / len(choice)``, the choice's length in
  characters without the one-space delimiter before it (the harness's ``completion_len``), which
  removes the bias of the plain sum toward short choices;
* ``chance``: the mean of ``1 / number of choices``, what guessing scores.

Encoding follows the harness: context and continuation are tokenized together and split where the
context's own tokens end, so a BPE merge across the boundary is scored as it would be read. A
context starts a document at position 0, as documents do in training (no BOS token; an empty
context is the EOS token, which precedes every document in the training stream). Contexts are cut
from the left so that a row fits ``max_length`` tokens; a continuation is never cut.

Rows are sorted by length and scored ``batch_size`` at a time, right-padded in a padding segment
of their own to a power-of-two bucket, so a task compiles a handful of shapes, not one per example.
Shape letters: B batch (rows), T bucket length, V vocabulary.
"""

from __future__ import annotations

import time

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from runway_jax.data import DataError
from runway_jax.evaluation import plots

MIN_BUCKET = 16


@nnx.jit
def _row_log_likelihoods(model, tokens, positions, segments, targets, scored):
    """``[B]`` summed log-probabilities of ``targets`` where ``scored``; all inputs ``[B, T]``."""
    logits = model(tokens, positions=positions, segment_ids=segments)  # [B, T, V]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [B, T]
    return jnp.sum(jnp.where(scored, target_log_probs, 0.0), axis=-1)


def encode_request(tokenizer, context: str, continuation: str, max_length: int):
    """``(context_tokens, continuation_tokens)`` of one choice, the context cut from the left so
    that the model reads at most ``max_length`` tokens (one context token at least)."""
    whole = np.asarray(tokenizer.encode(context + continuation), np.int32)
    split = len(tokenizer.encode(context))
    context_tokens, continuation_tokens = whole[:split], whole[split:]
    if len(continuation_tokens) == 0:
        raise DataError(f"the continuation {continuation!r} after {context[-40:]!r} has no tokens; "
                        "every choice needs a non-empty continuation.")
    if len(context_tokens) == 0:
        context_tokens = np.array([tokenizer.eos_id], np.int32)
    keep = max(1, max_length + 1 - len(continuation_tokens))  # the last token is never read
    return context_tokens[-keep:], continuation_tokens


def score_requests(model, requests, *, batch_size: int = 16, progress=None) -> np.ndarray:
    """Summed log-likelihood of each ``(context_tokens, continuation_tokens)`` in ``requests``.

    ``progress(done, total)`` is called after every batch."""
    lengths = np.array([len(c) + len(x) - 1 for c, x in requests])
    order = np.argsort(-lengths, kind="stable")  # longest first: the first batch shows the worst case
    scores = np.zeros(len(requests))
    for start in range(0, len(requests), batch_size):
        chosen = order[start:start + batch_size]
        bucket = max(MIN_BUCKET, 1 << int(lengths[chosen[0]] - 1).bit_length())
        tokens, targets = (np.zeros((batch_size, bucket), np.int32) for _ in range(2))
        segments, positions = (np.zeros((batch_size, bucket), np.int32) for _ in range(2))
        scored = np.zeros((batch_size, bucket), bool)
        for row, index in enumerate(chosen):
            context, continuation = requests[index]
            sequence = np.concatenate([context, continuation])
            length = len(sequence) - 1
            tokens[row, :length], targets[row, :length] = sequence[:-1], sequence[1:]
            segments[row, :length], positions[row, :length] = 1, np.arange(length)
            scored[row, len(context) - 1:length] = True  # predictions of the continuation's tokens
        sums = _row_log_likelihoods(model, *(jnp.asarray(a) for a in (tokens, positions, segments, targets, scored)))
        scores[chosen] = np.asarray(sums)[:len(chosen)]
        if progress:
            progress(min(start + batch_size, len(requests)), len(requests))
    return scores


def choice_log_likelihoods(model, tokenizer, examples, *, max_length: int, batch_size: int = 16,
                           progress=None) -> list[np.ndarray]:
    """Per example, the log-likelihood of each of its choices."""
    if max_length < 1 or batch_size < 1:
        raise ValueError(f"max_length={max_length} and batch_size={batch_size} must be positive.")
    requests = [encode_request(tokenizer, context, continuation, max_length)
                for example in examples
                for context, continuation in zip(example["contexts"], example["continuations"])]
    scores = score_requests(model, requests, batch_size=batch_size, progress=progress)
    return np.split(scores, np.cumsum([len(example["continuations"]) for example in examples])[:-1])


def multiple_choice_metrics(examples, log_likelihoods) -> dict:
    """``acc``, ``acc_norm`` (with standard errors), ``n`` and ``chance`` of scored examples."""
    correct, correct_norm, chance = [], [], []
    for example, scores in zip(examples, log_likelihoods):
        lengths = np.array([max(1, len(_choice(c))) for c in example["continuations"]], float)
        correct.append(float(np.argmax(scores) == example["label"]))
        correct_norm.append(float(np.argmax(scores / lengths) == example["label"]))
        chance.append(1.0 / len(scores))
    return {"acc": float(np.mean(correct)), "acc_stderr": _stderr(correct),
            "acc_norm": float(np.mean(correct_norm)), "acc_norm_stderr": _stderr(correct_norm),
            "n": len(correct), "chance": float(np.mean(chance))}


def evaluate_tasks(model, tokenizer, tasks: dict, *, max_length: int, batch_size: int = 16,
                   limit: int | None = None, progress=None) -> dict:
    """``{task: metrics}`` over ``tasks`` (``{task: examples}``), the first ``limit`` examples of
    each; ``progress(line)`` gets a line with the rate and time left now and then."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be positive (or left out for every example).")
    results = {}
    for task, examples in tasks.items():
        examples = examples[:limit] if limit else examples
        report = _Progress(task, progress)
        scores = choice_log_likelihoods(model, tokenizer, examples, max_length=max_length,
                                        batch_size=batch_size, progress=report)
        results[task] = multiple_choice_metrics(examples, scores)
        if progress:
            progress(f"{task}: acc {results[task]['acc']:.3f}, acc_norm {results[task]['acc_norm']:.3f} "
                     f"over {results[task]['n']} examples (chance {results[task]['chance']:.3f})")
    return results


def plot(named_results: dict, path: str) -> None:
    """Grouped bars of acc and acc_norm per task (standard errors as whiskers), one bar per model,
    chance marked per task."""
    plt = plots.pyplot()
    names = list(named_results)
    tasks = list(named_results[names[0]])
    width = 0.8 / len(names)
    figure, axes = plt.subplots(1, 2, figsize=(max(9, 2.4 * len(tasks)), 4.2), squeeze=False)
    for axis, measure in zip(axes[0], ("acc", "acc_norm")):
        for number, name in enumerate(names):
            results = [named_results[name].get(task, {}) for task in tasks]
            axis.bar(np.arange(len(tasks)) - 0.4 + width * (number + 0.5),
                     [r.get(measure, np.nan) for r in results], width, label=name,
                     yerr=[r.get(f"{measure}_stderr", 0.0) for r in results], capsize=3)
        for column, task in enumerate(tasks):
            axis.hlines(named_results[names[0]][task]["chance"], column - 0.45, column + 0.45,
                        colors="black", linestyles="dashed", label="chance" if column == 0 else None)
        axis.set_xticks(range(len(tasks)), tasks)
        axis.set(ylim=(0, 1), ylabel=measure, title=f"zero-shot {measure}")
        axis.legend(fontsize=8)
    plots.save_png(figure, path)


# ----------------------------------------------------------------------------------------------


def _choice(continuation):
    """The choice's text without the harness's one-space target delimiter."""
    return continuation[1:] if continuation.startswith(" ") else continuation


def _stderr(values):
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


class _Progress:
    """Progress lines every few seconds (and at the end): done, rate and time left."""

    def __init__(self, task, sink, every_s: float = 5.0):
        self.task, self.sink, self.every_s = task, sink, every_s
        self.start = self.last = time.perf_counter()

    def __call__(self, done, total):
        now = time.perf_counter()
        if self.sink and (now - self.last >= self.every_s or done == total):
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            self.sink(f"{self.task}: [{done}/{total}] choices, {rate:.1f}/s, "
                      f"{(total - done) / rate:.0f} s left")
