"""A key/value cache for any model's attention, with the runway head's ``w`` and ``z`` (METHOD (4)).

One :class:`AttentionCache` per layer is a small pytree: the attending heads' keys and values, the
runway head's queries and keys at every cached position (the bilinear g of eq. (2) reads the
runway queries of the runway tokens, so they are cached too), and each row's length. A layer
written against :mod:`runway_jax.attention` decodes with two calls:

    cache = init_cache(batch, max_length, kv_heads=K, head_width=d, dtype=jnp.bfloat16)
    out, cache = prefill(cache, q, k, v, rq, rk, lengths=prompt_lengths, beta=1.0)  # the prompt
    out, cache = decode_step(cache, q1, k1, v1, rq1, rk1, beta=1.0)  # each new token

``prefill`` runs the prompt in one parallel pass (the same call as training) and stores it;
``decode_step`` appends the new positions at each row's own length and attends over the cache
with ``key_value_seq_lengths`` (METHOD (7): its queries are the last positions of each row), so
rows of different lengths decode together. Both call the library's ``rewired_attention`` (or
``causal_attention`` for a cache without a runway head) with the options given, so decoding is
exactly the attention of the full forward pass (invariant 8).

Prompts are right-padded: row b's tokens are at positions ``0 .. lengths[b] - 1``; what follows is
padding that no real position sees (causality) and that the next step overwrites.

Shape letters: B batch, S cache length, T new positions, H query heads, K key/value heads, d head
width.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from runway_jax import attention


class AttentionCache(NamedTuple):
    key: jax.Array  # [B, S, K, d]
    value: jax.Array  # [B, S, K, d]
    runway_query: Optional[jax.Array]  # [B, S, d], None without a runway head
    runway_key: Optional[jax.Array]  # [B, S, d] float32
    lengths: jax.Array  # int32 [B]: positions 0 .. lengths[b] - 1 of row b are filled

    @property
    def max_length(self) -> int:
        return self.key.shape[1]

    @property
    def rewired(self) -> bool:
        return self.runway_key is not None


def init_cache(batch: int, max_length: int, *, kv_heads: int, head_width: int,
               dtype=jnp.float32, rewired: bool = True) -> AttentionCache:
    """An empty cache of ``max_length`` positions in ``dtype`` (the layer's compute dtype, so the
    cached entries are exactly those the full pass computes with)."""
    runway = jnp.zeros((batch, max_length, head_width), dtype) if rewired else None
    return AttentionCache(
        key=jnp.zeros((batch, max_length, kv_heads, head_width), dtype),
        value=jnp.zeros((batch, max_length, kv_heads, head_width), dtype),
        runway_query=runway,
        runway_key=runway,
        lengths=jnp.zeros((batch,), jnp.int32),
    )


def prefill(cache: AttentionCache, query, key, value, runway_query=None, runway_key=None, *,
            lengths=None, **options):
    """Attend over a right-padded prompt in one parallel pass and store it from position 0.

    Args:
      cache: an empty cache (its contents are replaced).
      query: ``[B, P, H, d]``; key, value: ``[B, P, K, d]``; runway_query, runway_key:
        ``[B, P, d]`` (only for a rewired cache), ``P <= max_length``.
      lengths: int ``[B]`` real prompt lengths ``1 <= lengths[b] <= P`` (default ``P``); output
        rows at and after ``lengths[b]`` are those of padding tokens.
      options: keywords of ``rewired_attention`` / ``causal_attention`` (``beta``, ``scale``,
        ``local_window_size``, ``logits_soft_cap``, ``implementation``, ...).

    Returns ``(output [B, P, H, d], cache)``.
    """
    batch, prompt_length = key.shape[:2]
    _check_fits(cache, key, runway_key, 0, prompt_length, "prefill")
    lengths = (jnp.full((batch,), prompt_length, jnp.int32) if lengths is None
               else jnp.asarray(lengths, jnp.int32))
    if lengths.shape != (batch,):
        raise ValueError(f"prefill: lengths.shape={lengths.shape} must be [B] = ({batch},).")
    output = _attend(query, key, value, runway_query, runway_key, **options)
    cache = _write(cache, key, value, runway_query, runway_key, jnp.zeros_like(lengths))
    return output, cache._replace(lengths=lengths)


def decode_step(cache: AttentionCache, query, key, value, runway_query=None, runway_key=None,
                **options):
    """Append ``T`` new positions to every row at its own length, then attend over the cache.

    Args as :func:`prefill` with ``P`` replaced by the ``T`` new positions (``T = 1`` to decode a
    token; more for a chunk). Returns ``(output [B, T, H, d], cache)``; the output rows equal
    those of the full forward pass over each row's ``lengths[b] + T`` positions. Keep
    ``lengths + T <= max_length``: under ``jit`` a longer write cannot be refused and would
    overwrite the last positions.
    """
    _check_fits(cache, key, runway_key, None, key.shape[1], "decode_step")
    cache = _write(cache, key, value, runway_query, runway_key, cache.lengths)
    cache = cache._replace(lengths=cache.lengths + key.shape[1])
    output = _attend(query, cache.key, cache.value, cache.runway_query, cache.runway_key,
                     key_value_seq_lengths=cache.lengths, **options)
    return output, cache


def _attend(query, key, value, runway_query, runway_key, **options):
    if runway_key is None:
        for option in ("beta", "runway_coefficient", "runway_span", "runway_alibi_slope"):
            options.pop(option, None)
        return attention.causal_attention(query, key, value, **options)
    return attention.rewired_attention(query, key, value, runway_query, runway_key, **options)


def _write(cache, key, value, runway_query, runway_key, starts):
    """The new positions of every row written at ``starts[b]``."""

    def put(buffer, new):
        return jax.vmap(lambda row, update, start: jax.lax.dynamic_update_slice_in_dim(
            row, update.astype(row.dtype), start, axis=0))(buffer, new, starts)

    cache = cache._replace(key=put(cache.key, key), value=put(cache.value, value))
    if cache.rewired:
        cache = cache._replace(runway_query=put(cache.runway_query, runway_query),
                               runway_key=put(cache.runway_key, runway_key))
    return cache


def _check_fits(cache, key, runway_key, start, count, name):
    """Shape errors in one line (a position past ``max_length`` cannot be checked when traced)."""
    if key.shape[0] != cache.key.shape[0] or key.shape[2:] != cache.key.shape[2:]:
        raise ValueError(f"{name}: key.shape={key.shape} does not fit the cache's "
                         f"{cache.key.shape} (batch, K, d must match).")
    if (runway_key is None) == cache.rewired:
        raise ValueError(f"{name}: the cache was made with rewired={cache.rewired}; pass runway_query "
                         "and runway_key exactly when it is rewired.")
    if start is not None and start + count > cache.max_length:
        raise ValueError(f"{name}: {count} positions do not fit a cache of max_length="
                         f"{cache.max_length}; make the cache longer.")
