"""Masks, position biases, the masked softmax and the quarantine of non-finite inputs shared by
every attention implementation."""

import jax
import jax.numpy as jnp

# A large negative finite logit: exp() of it is 0, and unlike -inf it never makes NaN (not even in
# rows where every key is masked, e.g. padding).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def query_positions(query_length: int, key_length: int, key_value_seq_lengths=None):
    """``[B or 1, Tq]`` int32 positions of the query rows among the keys, METHOD (7): the last
    ``Tq`` positions of ``key_length`` keys, or of ``key_value_seq_lengths[b]`` keys per row."""
    rows = jnp.arange(query_length, dtype=jnp.int32)
    if key_value_seq_lengths is None:
        return (key_length - query_length + rows)[None]
    return jnp.asarray(key_value_seq_lengths, jnp.int32)[:, None] - query_length + rows[None]


def at_positions(x, positions):
    """``x`` ``[B, Tk, ...]`` read at ``positions`` ``[B or 1, Tq]`` (clipped into range): the
    per-query-row value of a per-position array, e.g. a query row's segment id."""
    positions = jnp.clip(positions, 0, x.shape[1] - 1)
    positions = jnp.broadcast_to(positions, (x.shape[0], positions.shape[1]))
    index = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def visible_keys(positions, key_positions, *, query_segments=None, key_segments=None,
                 local_window_size=None, mask=None):
    """``[B or 1, Tq, Tk]`` bool ``V_ij`` of METHOD eq. (7a): key j is at or before query i,
    inside its window, in its segment, and allowed by ``mask``. ``positions`` ``[B or 1, Tq]``
    (negative: the row sees nothing), ``key_positions`` ``[Tk]``."""
    distance = positions[:, :, None] - key_positions[None, None, :]
    visible = distance >= 0
    if local_window_size is not None:
        visible = visible & (distance <= local_window_size)
    if query_segments is not None:
        visible = visible & (query_segments[:, :, None] == key_segments[:, None, :])
    if mask is not None:
        visible = visible & mask
    return visible


def attention_mask(length: int, segment_ids=None):
    """``[B or 1, T, T]`` bool causal same-segment mask of a whole sequence."""
    positions = jnp.arange(length)
    return visible_keys(positions[None], positions, query_segments=segment_ids,
                        key_segments=segment_ids)


def soft_cap(logits, cap):
    """``cap * tanh(logits / cap)`` (METHOD eqs. (7b), (7c)); ``cap=None`` leaves them as they are."""
    if cap is None:
        return logits
    return cap * jnp.tanh(logits / cap)


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


def seen_by_rows(bad, segment_ids=None, local_window_size=None):
    """``[B, T, ...]`` bool: row i can see (causal, same segment, eq. (5), and with
    ``local_window_size`` w inside its window, eq. (7a)) a position ``j <= i`` (``i - j <= w``)
    where ``bad`` ``[B, T, ...]`` holds. ``O(T log T)``, never ``T x T``."""
    window = local_window_size
    if segment_ids is None:
        count = jnp.cumsum(bad, axis=1, dtype=jnp.int32)
        if window is None:
            return count > 0
        # Bad positions in i - w .. i: the running count minus the count up to i - w - 1.
        widths = [(0, 0)] * count.ndim
        widths[1] = (window + 1, 0)
        return count - jnp.pad(count, widths)[:, : count.shape[1]] > 0
    # Gather each segment's positions together (a stable sort keeps them ascending), count the
    # bad positions cumulatively, subtract the count before the first position the row sees
    # (its segment's start, or the first position of its segment inside its window), and unsort.
    order = jnp.argsort(segment_ids, axis=1, stable=True)
    expand = lambda index: index.reshape(index.shape + (1,) * (bad.ndim - 2))
    sorted_bad = jnp.take_along_axis(bad, expand(order), axis=1).astype(jnp.int32)
    sorted_segments = jnp.take_along_axis(segment_ids, order, axis=1)
    starts = jnp.concatenate([jnp.ones_like(sorted_segments[:, :1], bool),
                              sorted_segments[:, 1:] != sorted_segments[:, :-1]], axis=1)
    count = jnp.cumsum(sorted_bad, axis=1)
    if window is None:
        # The count before each segment's start is non-decreasing along the sorted axis, so a
        # running maximum carries it over the whole segment.
        before = jnp.where(expand(starts), count - sorted_bad, 0)
        sorted_seen = count - jax.lax.cummax(before, axis=1) > 0
    else:
        index = jnp.broadcast_to(jnp.arange(order.shape[1], dtype=order.dtype), order.shape)
        segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
        first = _first_at_or_after(order, segment_start, index, order - window)
        before = jnp.take_along_axis(count - sorted_bad, expand(first), axis=1)
        sorted_seen = count - before > 0
    return jnp.take_along_axis(sorted_seen, expand(jnp.argsort(order, axis=1)), axis=1)


def _first_at_or_after(sorted_positions, low, high, target):
    """Per entry, the first index in ``low .. high`` (``[B, T]``, inclusive) whose sorted position
    is ``>= target`` (``high`` itself always is): a binary search, ``O(T log T)`` in all; the
    positions ascend inside each such range (one segment in sorted order)."""

    def halve(_, bounds):
        low, high = bounds
        middle = (low + high) // 2
        below = jnp.take_along_axis(sorted_positions, middle, axis=1) < target
        return jnp.where(below, middle + 1, low), jnp.where(below, high, middle)

    steps = max(1, sorted_positions.shape[1].bit_length())
    return jax.lax.fori_loop(0, steps, halve, (low, high))[0]


def rows_seeing(bad, visible):
    """``[B, Tq, X]`` bool: row i sees (``visible`` ``[B or 1, Tq, Tk]``) a key position where
    ``bad`` ``[B, Tk, X]`` holds. For any visibility (masks, windows, fewer queries than keys);
    the cost is one ``Tq x Tk`` product, small beside attention's."""
    visible = jnp.broadcast_to(visible, (bad.shape[0],) + visible.shape[1:])
    return jnp.einsum("bqk,bkx->bqx", visible.astype(jnp.float32), bad.astype(jnp.float32)) > 0


def quarantine_nonfinite(query, key, value, runway_query=None, runway_key=None, *,
                         segment_ids=None, runway_reaches_output=True, local_window_size=None,
                         key_value_seq_lengths=None):
    """Inputs with NaN/Inf replaced by 0, and the ``[B, Tq, H]`` bool of output rows that see a
    non-finite input (give those to :func:`poison_rows`).

    Which rows see what (eqs. (1)-(3), (5), (7a)): a query reaches only its own row and head; a
    key or value at j every row whose position ``i`` sees j (``j <= i``, ``i - j <= w`` with
    ``local_window_size`` w, same segment) in the heads of its key/value group; a runway query or
    key at j (through A and g) every head of those rows, unless ``runway_reaches_output`` is
    False (``beta = 0``). Query rows sit at the last ``Tq`` of the ``Tk`` key positions, or of
    ``key_value_seq_lengths[b]`` (eq. (7)). ``runway_query``/``runway_key`` may be None (causal
    attention).
    """
    heads, kv_heads = query.shape[2], key.shape[2]
    bad = [nonfinite_positions(key, value)]  # [B, Tk, K]
    if runway_query is not None and runway_reaches_output is not False:
        # runway_reaches_output may be traced (beta != 0 for a traced beta).
        bad.append((nonfinite_positions(runway_query, runway_key)
                    & jnp.asarray(runway_reaches_output))[..., None])  # [B, Tk, 1]
    seen = seen_by_rows(jnp.concatenate(bad, axis=2), segment_ids, local_window_size)
    query_length, key_length = query.shape[1], key.shape[1]
    if query_length != key_length or key_value_seq_lengths is not None:
        positions = query_positions(query_length, key_length, key_value_seq_lengths)
        seen = at_positions(seen, positions) & (positions >= 0)[..., None]  # [B, Tq, K (+ 1)]
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
