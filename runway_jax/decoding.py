"""Generation with a ``TransformerLM`` and its cache (METHOD (4), invariant 8).

Every layer's attention goes through :mod:`runway_jax.cache`, i.e. the library's
``rewired_attention`` with ``key_value_seq_lengths``: :func:`prefill` runs the prompts in one
parallel pass (the training forward) and :func:`decode_step` appends one token per row at the
row's own length. A rewired step costs ``O(S d)`` per layer for a cache of ``S`` positions, like
standard decoding (the runway head's row, rho by running sums of eq. (3b), then the rewired heads).

Prompts of a batch may have different lengths (``prompt_lengths``), padded on the right (the
default) or on the left; :func:`generate` stops a row at ``end_token``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from runway_jax.masking import MASK_VALUE

PADDING_SIDES = ("right", "left")


def init_cache(model, batch: int, length: int) -> list:
    """An empty cache of ``length`` positions for every layer of ``model`` (a TransformerLM)."""
    return model.init_cache(batch, length)


def prefill(model, cache, prompt, prompt_lengths=None):
    """Feed right-padded prompts ``[B, P]`` (row b's ``prompt_lengths[b]`` tokens first) in one
    pass: returns float32 logits ``[B, V]`` for each row's next token and the filled cache."""
    batch, length = prompt.shape
    if prompt_lengths is None:
        prompt_lengths = jnp.full((batch,), length, jnp.int32)
    logits, cache = model(prompt, cache=cache, prompt_lengths=prompt_lengths)
    last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    return last, cache


def decode_step(model, cache, tokens):
    """Append ``tokens`` ``[B]`` at each row's length: returns float32 logits ``[B, V]`` for the
    next token and the updated cache."""
    logits, cache = model(tokens[:, None], cache=cache)
    return logits[:, 0], cache


def generate(model, prompt, *, max_new_tokens: int, prompt_lengths=None,
             padding_side: str = "right", end_token: int | None = None, pad_token: int = 0,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             rng=None, cache_length: int | None = None):
    """Continue ``prompt`` ``[B, P]`` by up to ``max_new_tokens`` tokens per row: greedy when
    ``temperature`` is 0, else sampled (optionally restricted to the ``top_k`` tokens and/or the
    smallest set of tokens whose probability reaches ``top_p``).

    Args:
      prompt_lengths: optional int ``[B]``, each row's real prompt length (default ``P``).
      padding_side: where a shorter prompt's padding is, ``"right"`` or ``"left"``.
      end_token: a row stops after producing it (the loop ends when every row has).
      pad_token: fills each row after its end (and its prompt padding).

    Returns ``[B, P + max_new_tokens]``: each row's prompt and continuation, padded with
    ``pad_token`` on the same side as the prompt. One jit-compiled program: a parallel prefill,
    then cached decode steps (``cache_length``, default just enough).
    """
    if max_new_tokens < 1 or temperature < 0 or (top_k is not None and top_k < 1) or (
            top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1, temperature="
                         f"{temperature} >= 0, top_k={top_k} >= 1 and top_p={top_p} in (0, 1].")
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"generate: padding_side={padding_side!r}; use one of {PADDING_SIDES}.")
    batch, prompt_length = prompt.shape
    if prompt_lengths is not None:
        prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
        if prompt_lengths.shape != (batch,):
            raise ValueError(f"generate: prompt_lengths.shape={prompt_lengths.shape} must be [B] = ({batch},).")
        if _concrete(prompt_lengths) and not bool(
                jnp.all((prompt_lengths >= 1) & (prompt_lengths <= prompt_length))):
            raise ValueError(f"generate: every prompt length must be in [1, {prompt_length}], got "
                             f"{prompt_lengths.tolist()}.")
    length = prompt_length + max_new_tokens
    cache_length = cache_length or length
    if cache_length < length:
        raise ValueError(f"generate: cache_length={cache_length} is shorter than prompt + new tokens = {length}.")
    graphdef, state = nnx.split(model)
    rng = jax.random.key(0) if rng is None else rng
    if prompt_lengths is None:
        prompt_lengths = jnp.full((batch,), prompt_length, jnp.int32)
    return _generate(graphdef, state, prompt, prompt_lengths, rng, max_new_tokens,
                     float(temperature), top_k, top_p, cache_length, padding_side, end_token,
                     pad_token)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8, 9, 10, 11, 12))
def _generate(graphdef, state, prompt, prompt_lengths, rng, max_new_tokens, temperature, top_k,
              top_p, cache_length, padding_side, end_token, pad_token):
    model = nnx.merge(graphdef, state)
    batch, prompt_length = prompt.shape
    total = prompt_length + max_new_tokens
    if padding_side == "left":  # the cache wants every row to start at position 0
        prompt = _shift_rows(prompt, prompt_lengths - prompt_length)
    logits, cache = prefill(model, init_cache(model, batch, cache_length), prompt, prompt_lengths)
    real = jnp.arange(prompt_length) < prompt_lengths[:, None]
    tokens = jnp.full((batch, total), pad_token, prompt.dtype)
    tokens = tokens.at[:, :prompt_length].set(jnp.where(real, prompt, pad_token))
    rows = jnp.arange(batch)

    def unfinished(carry):
        step, _, _, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def extend(carry):
        step, cache, logits, key, tokens, done = carry
        key, sample_key = jax.random.split(key)
        token = _sample(logits, sample_key, temperature, top_k, top_p).astype(tokens.dtype)
        token = jnp.where(done, pad_token, token)
        tokens = tokens.at[rows, prompt_lengths + step].set(token)
        if end_token is not None:
            done = done | (token == end_token)
        logits, cache = decode_step(model, cache, token)
        return step + 1, cache, logits, key, tokens, done

    done = jnp.zeros((batch,), bool)
    step, _, _, _, tokens, done = jax.lax.while_loop(
        unfinished, extend, (jnp.int32(0), cache, logits, rng, tokens, done))
    if padding_side == "left":
        produced = _produced(tokens, prompt_lengths, step, end_token)
        tokens = _shift_rows(tokens, total - prompt_lengths - produced)
    return tokens


def _concrete(array) -> bool:
    try:
        np.asarray(array)
        return True
    except jax.errors.TracerArrayConversionError:
        return False


def _shift_rows(tokens, shifts):
    """Row b rolled right by ``shifts[b]`` (negative: left)."""
    return jax.vmap(lambda row, shift: jnp.roll(row, shift))(tokens, shifts)


def _produced(tokens, prompt_lengths, steps, end_token):
    """How many tokens each row generated (through its end token, if any)."""
    if end_token is None:
        return jnp.full(prompt_lengths.shape, steps)
    offsets = jnp.arange(tokens.shape[1])[None] - prompt_lengths[:, None]
    is_end = (tokens == end_token) & (offsets >= 0) & (offsets < steps)
    first_end = jnp.min(jnp.where(is_end, offsets, tokens.shape[1]), axis=1)
    return jnp.minimum(first_end + 1, steps)


def _sample(logits, key, temperature, top_k, top_p):
    """One token per row from float32 logits ``[B, V]``."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, MASK_VALUE)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
        # Keep a token if the probability mass before it is still below top_p (the first always).
        keep_sorted = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, MASK_VALUE)
    return jax.random.categorical(key, logits, axis=-1)
