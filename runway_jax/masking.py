"""Masks, position biases, the masked softmax and the quarantine of non-finite inputs shared by
every attention implementation."""

import jax
import jax.numpy as jnp

# A large negative finite logit: exp() of it is 0, and unlike -inf it never makes NaN (not even in
# rows where every key is masked, e.g. padding).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def visibility_mask(query_positions, key_positions, query_segments=None, key_segments=None):
    """``[B or 1, Tq, Tk]`` bool: key j is visible to query i (causal and same segment, eq. (5))."""
    mask = (key_positions[None, :] <= query_positions[:, None])[None]
    if query_segments is not None:
        mask = mask & (query_segments[:, :, None] == key_segments[:, None, :])
    return mask


def attention_mask(length: int, segment_ids=None):
    """``[B or 1, T, T]`` bool causal same-segment mask of a whole sequence."""
    positions = jnp.arange(length)
    return visibility_mask(positions, positions, segment_ids, segment_ids)


def alibi_bias(query_positions, key_positions, slopes):
    """``[..., Tq, Tk]`` ALiBi bias ``-slope * (i - j)`` for slopes of shape ``[...]``."""
    distance = (query_positions[:, None] - key_positions[None, :]).astype(jnp.float32)
    return -jnp.asarray(slopes, jnp.float32)[..., None, None] * distance


def masked_softmax(logits, mask, axis=-1):
    """Float32 softmax over ``axis`` (an int or a tuple) restricted to ``mask``; fully masked rows
    give zeros."""
    logits = jnp.where(mask, logits.astype(jnp.float32), MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=axis)
    return jnp.where(mask, probs, 0.0)


# --------------------------------------------------------------------------------------------
# Non-finite inputs (METHOD (6) item 3). A masked position is excluded by a select, but inside a
# product over positions (P @ V, A @ w, dS @ K in the backward pass) a masked zero still meets
# the masked value: 0 * NaN = NaN reaches rows that cannot see it. Per-row selects inside those
# products would cost a [rows, keys, d] array. Instead every implementation computes on inputs
# whose NaN/Inf are replaced by 0 and then sets the rows that can see a non-finite input to NaN:
# rows that cannot see one are exactly the clean run's, forward and backward.
# --------------------------------------------------------------------------------------------


def finite_or_zero(x):
    """``x`` with every NaN and Inf replaced by 0 (a select: the gradient there is exactly 0)."""
    return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def nonfinite_positions(*arrays):
    """``[B, T, ...]`` bool: some entry of one of ``arrays`` (same shape) at this position and
    head is NaN or Inf; the last axis (the head width) is reduced."""
    finite = jnp.isfinite(arrays[0]).all(-1)
    for array in arrays[1:]:
        finite = finite & jnp.isfinite(array).all(-1)
    return ~finite


def seen_by_rows(bad, segment_ids=None):
    """``[B, T, ...]`` bool: row i can see (causal and same segment, eq. (5)) a position
    ``j <= i`` where ``bad`` ``[B, T, ...]`` holds. ``O(T log T)``, never ``T x T``."""
    if segment_ids is None:
        return jnp.cumsum(bad, axis=1, dtype=jnp.int32) > 0
    # Gather each segment's positions together (a stable sort keeps them ascending), count the
    # bad positions cumulatively, subtract the count before the segment starts, and unsort.
    order = jnp.argsort(segment_ids, axis=1, stable=True)
    expand = lambda index: index.reshape(index.shape + (1,) * (bad.ndim - 2))
    sorted_bad = jnp.take_along_axis(bad, expand(order), axis=1).astype(jnp.int32)
    sorted_segments = jnp.take_along_axis(segment_ids, order, axis=1)
    starts = jnp.concatenate([jnp.ones_like(sorted_segments[:, :1], bool),
                              sorted_segments[:, 1:] != sorted_segments[:, :-1]], axis=1)
    count = jnp.cumsum(sorted_bad, axis=1)
    # The count before each segment's start is non-decreasing along the sorted axis, so a running
    # maximum carries it over the whole segment.
    before = jnp.where(expand(starts), count - sorted_bad, 0)
    sorted_seen = count - jax.lax.cummax(before, axis=1) > 0
    return jnp.take_along_axis(sorted_seen, expand(jnp.argsort(order, axis=1)), axis=1)


def quarantine_nonfinite(query, key, value, runway_query=None, runway_key=None, *,
                         segment_ids=None, runway_reaches_output=True):
    """Inputs with NaN/Inf replaced by 0, and the ``[B, T, H]`` bool of output rows that see a
    non-finite input (give those to :func:`poison_rows`).

    Which rows see what (eqs. (1)-(3), (5)): a query reaches only its own row and head; a key or
    value at j every row ``i >= j`` of its segment in the heads of its key/value group; a runway
    query or key at j (through A and g) every head of those rows, unless ``runway_reaches_output``
    is False (``beta = 0``). ``runway_query``/``runway_key`` may be None (causal attention).
    """
    heads, kv_heads = query.shape[2], key.shape[2]
    bad = [nonfinite_positions(key, value)]  # [B, T, K]
    if runway_query is not None and runway_reaches_output:
        bad.append(nonfinite_positions(runway_query, runway_key)[..., None])  # [B, T, 1]
    seen = seen_by_rows(jnp.concatenate(bad, axis=2), segment_ids)
    poisoned = jnp.repeat(seen[..., :kv_heads], heads // kv_heads, axis=2)  # head h: kv h // G
    if seen.shape[2] > kv_heads:
        poisoned = poisoned | seen[..., kv_heads:]
    poisoned = poisoned | nonfinite_positions(query)
    runway = () if runway_query is None else (finite_or_zero(runway_query),
                                              finite_or_zero(runway_key))
    return (finite_or_zero(query), finite_or_zero(key), finite_or_zero(value), *runway), poisoned


def poison_rows(out, poisoned):
    """``out`` ``[B, T, H, d]`` with the rows ``poisoned`` ``[B, T, H]`` set to NaN: they saw a
    non-finite input. A select, so they pass no gradient back (a loss over them is NaN)."""
    return jnp.where(poisoned[..., None], jnp.asarray(jnp.nan, out.dtype), out)
