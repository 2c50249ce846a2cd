"""The kernels' layout: ``[B, T, ...]`` token-major (the public API) to padded head-major and
back, and the backward kernels' outputs put together as the public gradients.

Shape letters: B batch, H rewired (query) heads, K key/value heads, Tqp / Tkp padded query / key
lengths, d head width. Queries ``[B, H, Tqp, d]``, keys and values ``[B, K, Tkp, d]``, runway
arrays ``[B, Tkp, d]`` and their per-row copies ``[B, Tqp, d]`` (:class:`KernelInputs`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from runway_jax.kernels import tiling


def pad_length(x, padded_length, axis=1):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, padded_length - x.shape[axis])
    return jnp.pad(x, widths)


class KernelInputs(NamedTuple):
    """The kernels' padded inputs. Key side ``[.., Tkp, ..]``: ``key``, ``value``
    ``[B, K, Tkp, d]``, ``runway_query``, ``runway_key`` ``[B, Tkp, d]`` (w and z of every key
    position) and ``segment_ids`` ``[B, Tkp]``. Row side ``[.., Tqp, ..]``: ``query``
    ``[B, H, Tqp, d]`` and, at each query row's position, ``query_segments`` ``[B, Tqp]``,
    ``runway_query_rows`` and ``runway_key_rows`` ``[B, Tqp, d]`` (the runway head's own query,
    and its key for ``A_ii``).
    ``offsets`` ``[B]`` int32: row r of batch row b sits at position ``offsets[b] + r`` (eq. (7)).
    """

    query: jax.Array
    key: jax.Array
    value: jax.Array
    runway_query: jax.Array
    runway_key: jax.Array
    segment_ids: jax.Array
    query_segments: jax.Array
    runway_query_rows: jax.Array
    runway_key_rows: jax.Array
    offsets: jax.Array


def query_offsets(batch, plan_: tiling.Plan, key_value_seq_lengths=None):
    """``[B]`` int32 position of query row 0: ``L_b - Tq`` (METHOD (7)), negative when the row has
    fewer keys than there are queries (those rows see nothing)."""
    if key_value_seq_lengths is None:
        return jnp.full((batch,), tiling.static_offset(plan_), jnp.int32)
    return jnp.asarray(key_value_seq_lengths, jnp.int32) - plan_.query_length


def at_rows(x, offsets, plan_: tiling.Plan):
    """``x`` ``[B, Tk, ...]`` at each query row's position, padded: ``[B, Tqp, ...]`` (rows that
    sit at no real position read position 0; they see nothing, so it does not matter)."""
    if not plan_.ragged:
        x = x[:, tiling.static_offset(plan_):]
    else:
        rows = offsets[:, None] + jnp.arange(plan_.query_length, dtype=jnp.int32)[None]
        index = jnp.clip(rows, 0, x.shape[1] - 1).reshape(rows.shape + (1,) * (x.ndim - 2))
        x = jnp.take_along_axis(x, index, axis=1)
    return pad_length(x, plan_.padded_query_length)


def rows_to_keys(row_values, offsets, plan_: tiling.Plan):
    """The transpose of :func:`at_rows`: ``[B, Tqp, d]`` per-row values (e.g. the runway head's
    ``dq^r``) added at their rows' positions, ``[B, Tkp, d]``."""
    row_values = row_values[:, : plan_.query_length]
    if not plan_.ragged:
        start = tiling.static_offset(plan_)
        return pad_length(jnp.pad(row_values, ((0, 0), (start, 0), (0, 0))),
                          plan_.padded_key_length)
    rows = offsets[:, None] + jnp.arange(plan_.query_length, dtype=jnp.int32)[None]
    real = (rows >= 0)[..., None]
    batch = jnp.arange(row_values.shape[0])[:, None]
    out = jnp.zeros((row_values.shape[0], plan_.padded_key_length) + row_values.shape[2:],
                    row_values.dtype)
    return out.at[batch, jnp.clip(rows, 0, plan_.key_length - 1)].add(
        jnp.where(real, row_values, 0.0))


def to_kernel_layout(query, key, value, runway_query, runway_key, segment_ids, plan_: tiling.Plan,
                     key_value_seq_lengths=None) -> KernelInputs:
    """Pad and move heads before time: ``[B, T, H, d] -> [B, H, Tp, d]``; the per-row runway
    arrays and segment ids read at the rows' positions (see :class:`KernelInputs`).

    Padded key positions come after every real position (and positions ``>= L_b`` after row b's
    last query), so causality hides them; padded query rows sit at position -1 and see nothing.
    """
    offsets = query_offsets(query.shape[0], plan_, key_value_seq_lengths)
    if segment_ids is None:
        segment_ids = jnp.zeros(key.shape[:2], jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    return KernelInputs(
        query=jnp.swapaxes(pad_length(query, plan_.padded_query_length), 1, 2),  # [B, H, Tqp, d]
        key=jnp.swapaxes(pad_length(key, plan_.padded_key_length), 1, 2),  # [B, K, Tkp, d]
        value=jnp.swapaxes(pad_length(value, plan_.padded_key_length), 1, 2),
        runway_query=pad_length(runway_query, plan_.padded_key_length),  # [B, Tkp, d]
        runway_key=pad_length(runway_key, plan_.padded_key_length),
        segment_ids=pad_length(segment_ids, plan_.padded_key_length),  # [B, Tkp]
        query_segments=at_rows(segment_ids, offsets, plan_),  # [B, Tqp]
        runway_query_rows=at_rows(runway_query, offsets, plan_),  # [B, Tqp, d]
        runway_key_rows=at_rows(runway_key, offsets, plan_),
        offsets=offsets)


def row_positions(offsets, plan_: tiling.Plan):
    """``[B, Tqp]`` int32 position of every (padded) query row; -1 for padded rows."""
    rows = jnp.arange(plan_.padded_query_length, dtype=jnp.int32)[None]
    return jnp.where(rows < plan_.query_length, offsets[:, None] + rows, -1)


def from_kernel_layout(out, length):
    """``[B, H, Tp, d] -> [B, T, H, d]``."""
    return jnp.swapaxes(out, 1, 2)[:, :length]


def runway_gradients(dq, dk, dv, d_runway_query_rows, d_runway_key, dz, dw, rho_dot, offsets, *,
                     plan, runway_coefficient):
    """The backward kernels' outputs put together: ``(dq, dk, dv, d runway_query, d runway_key,
    d beta)``, the runway gradients on the key side ``[B, Tkp, d]``.

    The runway query of a row's own position gets ``dq^r`` (row side, moved to the key side),
    the key-indexed terms ``dz`` go to ``runway_key`` and ``dw`` to whichever array is w (eq.
    (2)); ``d beta = -sum_i rho_dot_i`` with ``rho_dot_i = sum_j rho_ij sum_h dS~^h_ij``
    (``d s~ / d beta = -rho``, METHOD (7)).
    """
    d_runway_query = rows_to_keys(d_runway_query_rows, offsets, plan)
    d_runway_key = d_runway_key + dz
    if runway_coefficient == "bilinear":
        d_runway_query = d_runway_query + dw
    else:
        d_runway_key = d_runway_key + dw
    return dq, dk, dv, d_runway_query, d_runway_key, -jnp.sum(rho_dot)
