"""The ``"xla"`` implementation: METHOD eq. (3b) evaluated in query blocks and key blocks.

Each query block I (``Bq`` rows) sees all ``Tp`` (padded) keys at once, so the largest arrays are
the ``[B, Bq, H, Tkp]`` logits; nothing is ``T x T x T`` or ``T x T x d``. For the exact span the
correction ``c_ij = <P_i(j), z_j>`` of eq. (3b) is split over key blocks J of size ``Bk``:

  c_ij = <S_i(J), z_j> + (A_{i,J} @ triu(W_J Z_J^T))_ij,   S_i(J) = sum_{J' < J} A_{i,J'} W_{J'}

where ``S`` is an exclusive prefix sum over key blocks (``[B, Tkp/Bk, Bq, d]``) and ``triu`` keeps
``k <= j``. The loop over query blocks is a ``lax.map`` of a rematerialized body, so the backward
pass recomputes one block at a time instead of storing every block's ``Bq x Tp`` arrays: training
memory stays ``O(Bq * Tp)`` per layer, like the forward pass.

Every option of METHOD (7) is one visibility ``V`` per query block (``[B, Bq, Tkp]``, from the
rows' positions, window, segments and ``mask``) and the soft cap on the logits; queries may be
fewer than keys (each row knows its position among the keys). With ``local_window_size`` w a query
block reads only the keys its rows can see, a slice of ``round_up(Bq + w, Bk) + Bk`` keys that
starts at a key-block boundary, so windowed attention costs ``O(T (Bq + w))``, not ``O(T^2)``:
the slice holds every visible key and every runway token of a visible pair (they lie inside the
window, METHOD (7a)), and the keys before it are invisible to the block's rows, so they add
nothing to the runway head's prefix sums. Positions inside a block are taken relative to the
slice's start; distances, and so every mask, are unchanged.

A query block's products run over every key (``probs @ values`` over all ``Tkp``), so a masked
zero meets every masked value; NaN/Inf inputs are therefore zeroed first and the rows that see one
(by the block's own ``V``) set to NaN after, as :func:`runway_jax.masking.quarantine_nonfinite`
describes.

Layouts were chosen by measurement on CPU (``benchmarks/attention.py``): the heads' logits keep
the heads beside the key axis and the exact-span runway terms live in key-block layout
``[B, J, i, k]``; with other layouts XLA inserted transposes that made the rewired backward pass
1.5x to 2x slower than it is.

Shape letters: B batch, i query (``Bq``), j / k key (``Tkp``, or ``Bk`` inside a key block J),
K key/value heads, G query heads per key/value head, d head width.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from runway_jax.masking import (at_positions, finite_or_zero, masked_softmax, nonfinite_positions,
                                 poison_rows, query_positions, rows_seeing, soft_cap,
                                 visible_keys)

QUERY_BLOCK = 512
KEY_BLOCK = 64
# At most this many query rows (decoding, small chunks) take the exact span by a running sum over
# the keys (``O(Tq Tk d)``) instead of key blocks, whose ``triu(W_J Z_J^T)`` costs ``O(Tk Bk d)``
# per call however few the rows (64x the attention's own work for one decoded token).
FEW_ROWS = 16


def block_plan(length: int, query_block: int = QUERY_BLOCK, key_block: int = KEY_BLOCK):
    """``(Bq, Bk, padded_length)`` for ``length`` query rows: ``Bk`` divides ``Bq`` and ``Bq``
    divides ``padded_length``.

    ``query_block`` is an upper bound: the blocks are evened out so that little is padding
    (T = 600 gives two blocks of 320, not two of 512).
    """
    if query_block % key_block:
        raise ValueError(f"{query_block=} must be a multiple of {key_block=}.")
    key_block = min(key_block, length)
    num_query_blocks = -(-length // query_block)
    query_block = _round_up(-(-length // num_query_blocks), key_block)
    return query_block, key_block, num_query_blocks * query_block


@functools.partial(jax.jit, static_argnames=(
    "runway_coefficient", "runway_span", "local_window_size", "query_block", "key_block"))
def rewired_attention(
    query,
    key,
    value,
    runway_query,
    runway_key,
    *,
    beta,
    runway_coefficient,
    runway_span,
    segment_ids,
    scale,
    alibi_slopes,
    runway_alibi_slope,
    mask=None,
    local_window_size=None,
    logits_soft_cap=None,
    key_value_seq_lengths=None,
    query_block=QUERY_BLOCK,
    key_block=KEY_BLOCK,
):
    """METHOD eqs. (3), (7) with rho from eq. (3b); arguments as ``attention.rewired_attention``."""
    layout = _Layout(query, key, segment_ids, key_value_seq_lengths, mask, local_window_size,
                     query_block, key_block)
    runway = _Runway(layout, finite_or_zero(runway_query), finite_or_zero(runway_key),
                     runway_coefficient, runway_span, scale, runway_alibi_slope, logits_soft_cap)
    keys, values = layout.pad_keys(finite_or_zero(key)), layout.pad_keys(finite_or_zero(value))
    # A non-finite runway query or key reaches the outputs only through rho (beta may be traced).
    bad_runway = nonfinite_positions(runway_query, runway_key) & (jnp.asarray(beta) != 0)
    bad_keys = layout.pad_keys(jnp.concatenate(
        [nonfinite_positions(key, value), bad_runway[..., None]], axis=2))  # [B, Tkp, K + 1]

    def block(inputs):
        rows, runway_rows = inputs
        start = layout.window_start(rows)
        rows = layout.relative_to(rows, start)
        visible = layout.visible(rows, start)
        rho = runway.coefficients(runway_rows, rows.positions, visible, start)
        out = _attend(rows.query, layout.take_keys(keys, start), layout.take_keys(values, start),
                      layout, rows.positions, visible, scale, alibi_slopes, logits_soft_cap,
                      bias=-beta * rho)
        return out, rows_seeing(layout.take_keys(bad_keys, start), visible)

    rows = layout.query_rows(finite_or_zero(query))
    out, seen = jax.lax.map(jax.checkpoint(block, prevent_cse=False),
                            (rows, runway.query_rows()))
    own_runway_query = at_positions(nonfinite_positions(runway_query)[..., None],
                                    layout.positions[:, : layout.query_length])[..., 0]
    own_runway_query = own_runway_query & (jnp.asarray(beta) != 0)
    poisoned = layout.poisoned(seen, nonfinite_positions(query), own_runway_query)
    return poison_rows(layout.merge(out), poisoned)


@functools.partial(jax.jit, static_argnames=("local_window_size", "query_block", "key_block"))
def causal_attention(query, key, value, *, segment_ids, scale, alibi_slopes, mask=None,
                     local_window_size=None, logits_soft_cap=None, key_value_seq_lengths=None,
                     query_block=QUERY_BLOCK, key_block=KEY_BLOCK):
    """Standard causal attention with the same blocking and options as :func:`rewired_attention`."""
    layout = _Layout(query, key, segment_ids, key_value_seq_lengths, mask, local_window_size,
                     query_block, key_block)
    keys, values = layout.pad_keys(finite_or_zero(key)), layout.pad_keys(finite_or_zero(value))
    bad_keys = layout.pad_keys(nonfinite_positions(key, value))

    def block(rows):
        start = layout.window_start(rows)
        rows = layout.relative_to(rows, start)
        visible = layout.visible(rows, start)
        out = _attend(rows.query, layout.take_keys(keys, start), layout.take_keys(values, start),
                      layout, rows.positions, visible, scale, alibi_slopes, logits_soft_cap,
                      bias=None)
        return out, rows_seeing(layout.take_keys(bad_keys, start), visible)

    out, seen = jax.lax.map(jax.checkpoint(block, prevent_cse=False),
                            layout.query_rows(finite_or_zero(query)))
    poisoned = layout.poisoned(seen, nonfinite_positions(query), None)
    return poison_rows(layout.merge(out), poisoned)


@functools.partial(jax.jit, static_argnames=(
    "runway_coefficient", "runway_span", "local_window_size", "query_block", "key_block"))
def runway_coefficients(runway_query, runway_key, *, runway_coefficient, runway_span, segment_ids,
                        scale, runway_alibi_slope, mask=None, local_window_size=None,
                        logits_soft_cap=None, query_block=QUERY_BLOCK, key_block=KEY_BLOCK):
    """``[B, T, T]`` float32 rho of METHOD eqs. (2), (7), one query block at a time; rows that
    see a non-finite runway query or key are NaN."""
    layout = _Layout(runway_query[:, :, None], runway_key[:, :, None], segment_ids, None, mask,
                     local_window_size, query_block, key_block, slice_window=False)
    runway = _Runway(layout, finite_or_zero(runway_query), finite_or_zero(runway_key),
                     runway_coefficient, runway_span, scale, runway_alibi_slope, logits_soft_cap)
    bad = layout.pad_keys(nonfinite_positions(runway_query, runway_key)[..., None])

    def block(inputs):
        rows, runway_rows = inputs
        visible = layout.visible(rows, None)
        rho = runway.coefficients(runway_rows, rows.positions, visible, None)
        return rho, rows_seeing(bad, visible)

    rows = layout.query_rows(finite_or_zero(runway_query)[:, :, None])
    rho, seen = jax.lax.map(block, (rows, runway.query_rows()))
    length = runway_query.shape[1]
    rho = layout.merge_rows(rho)[:, :, :length]
    poisoned = layout.merge_rows(seen)[..., 0] | nonfinite_positions(runway_query)
    return jnp.where(poisoned[:, :, None], jnp.nan, rho)


class _Rows(NamedTuple):
    """One query block's per-row inputs (stacked over blocks for ``lax.map``)."""

    query: jax.Array  # [B, Bq, K, G, d]
    positions: jax.Array  # [B, Bq] positions among the keys; -1: padding
    segments: Optional[jax.Array]  # [B, Bq] segment ids, or None
    mask: Optional[jax.Array]  # [B or 1, Bq, Tkp], or None


class _Layout:
    """Block sizes, padding, the rows' positions and the reshapes between ``[B, T, ...]`` and
    query blocks; the visibility ``V`` of METHOD eq. (7a) of a query block."""

    def __init__(self, query, key, segment_ids, key_value_seq_lengths, mask, local_window_size,
                 query_block, key_block, slice_window=True):
        self.batch, self.query_length, self.heads = query.shape[:3]
        self.key_length, self.kv_heads = key.shape[1], key.shape[2]
        self.query_block, _, self.padded_query_length = block_plan(
            self.query_length, query_block, key_block)
        self.key_block = min(key_block, self.key_length)
        self.padded_key_length = _round_up(self.key_length, self.key_block)
        self.num_query_blocks = self.padded_query_length // self.query_block
        self.window = local_window_size
        # The keys one query block reads: all of them, or with a window only the slice its rows
        # can see (a query block's rows ascend, so the slice starts at most w before the first).
        self.key_span = self.padded_key_length
        if slice_window and local_window_size is not None:
            span = _round_up(self.query_block + local_window_size, self.key_block) + self.key_block
            self.key_span = min(span, self.padded_key_length)
        self.key_positions = jnp.arange(self.key_span)  # relative to the block's slice
        positions = jnp.broadcast_to(
            query_positions(self.query_length, self.key_length, key_value_seq_lengths),
            (self.batch, self.query_length))
        # Padded query rows get position -1: they see nothing. Padded keys sit after every real
        # position, so causality hides them from real rows.
        self.positions = self._pad_rows(positions, -1)
        self.key_segments = None if segment_ids is None else self.pad_keys(segment_ids)
        self.query_segments = (None if segment_ids is None
                               else self._pad_rows(at_positions(segment_ids, positions), 0))
        self.mask = None
        if mask is not None:
            mask = jnp.broadcast_to(mask, (mask.shape[0], self.query_length, self.key_length))
            widths = ((0, 0), (0, self.padded_query_length - self.query_length),
                      (0, self.padded_key_length - self.key_length))
            self.mask = jnp.pad(mask, widths)

    def _pad_rows(self, x, fill):
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, self.padded_query_length - self.query_length)
        return jnp.pad(x, widths, constant_values=fill)

    def pad_keys(self, x):
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, self.padded_key_length - self.key_length)
        return jnp.pad(x, widths)

    def blocks(self, x):
        """``[B, Tqp, ...] -> [num_query_blocks, B, Bq, ...]`` (``x`` already padded)."""
        x = x.reshape(x.shape[0], self.num_query_blocks, self.query_block, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    def query_rows(self, query):
        """The per-row inputs of every query block, as ``_Rows`` of stacked blocks."""
        groups = self.heads // self.kv_heads
        query = query.reshape(*query.shape[:2], self.kv_heads, groups, query.shape[-1])  # BTKGd
        optional = lambda x: None if x is None else self.blocks(x)
        return _Rows(self.blocks(self._pad_rows(query, 0)), self.blocks(self.positions),
                     optional(self.query_segments), optional(self.mask))

    def window_start(self, rows):
        """``[B]`` int: where the block's slice of keys starts (a multiple of ``Bk``), or None
        when the block reads every key."""
        if self.key_span == self.padded_key_length:
            return None
        first = jnp.maximum(rows.positions[:, 0] - self.window, 0)  # the first row's first key
        start = first // self.key_block * self.key_block
        return jnp.minimum(start, self.padded_key_length - self.key_span)

    def take_keys(self, x, start, axis=1, unit=1):
        """The block's slice of ``x`` along its key ``axis`` (``unit``: keys per entry, ``Bk``
        for arrays in key blocks); ``x`` itself when the block reads every key."""
        if start is None:
            return x
        x = jnp.broadcast_to(x, (self.batch,) + x.shape[1:])
        take = lambda row, begin: jax.lax.dynamic_slice_in_dim(
            row, begin, self.key_span // unit, axis=axis - 1)
        return jax.vmap(take)(x, start // unit)

    def relative_to(self, rows, start):
        """``rows`` with positions relative to the slice's start and the mask sliced alike."""
        if start is None:
            return rows
        mask = None if rows.mask is None else self.take_keys(rows.mask, start, axis=2)
        return rows._replace(positions=rows.positions - start[:, None], mask=mask)

    def visible(self, rows, start):
        """``[B or 1, Bq, S]`` ``V`` of one query block (METHOD eq. (7a)) over its ``S`` keys."""
        key_segments = (None if self.key_segments is None
                        else self.take_keys(self.key_segments, start))
        return visible_keys(rows.positions, self.key_positions, query_segments=rows.segments,
                            key_segments=key_segments, local_window_size=self.window,
                            mask=rows.mask)

    def merge_rows(self, blocks):
        """``[num_query_blocks, B, Bq, ...] -> [B, Tq, ...]``."""
        out = jnp.moveaxis(blocks, 0, 1)
        out = out.reshape(out.shape[0], self.padded_query_length, *out.shape[3:])
        return out[:, : self.query_length]

    def merge(self, blocks):
        """``[num_query_blocks, B, Bq, K, G, d] -> [B, Tq, H, d]``."""
        out = self.merge_rows(blocks)
        return out.reshape(*out.shape[:2], self.heads, out.shape[-1])

    def poisoned(self, seen, bad_query, bad_own_runway_query):
        """``[B, Tq, H]``: the rows that see a non-finite input (``seen`` by blocks,
        ``[.., K (+ 1 for the runway head)]``), or whose own query is one."""
        seen = self.merge_rows(seen)
        groups = self.heads // self.kv_heads
        poisoned = jnp.repeat(seen[..., : self.kv_heads], groups, axis=2) | bad_query
        if bad_own_runway_query is not None:
            poisoned = poisoned | (seen[..., self.kv_heads:] | bad_own_runway_query[..., None])
        return poisoned


class _Runway:
    """The runway head's arrays (float32, padded) and rho for one query block (eq. (3b))."""

    def __init__(self, layout, runway_query, runway_key, runway_coefficient, runway_span, scale,
                 alibi_slope, logits_soft_cap):
        self.layout = layout
        self.span = runway_span
        self.scale = scale
        self.alibi_slope = alibi_slope
        self.cap = logits_soft_cap
        self.runway_query = runway_query.astype(jnp.float32)
        self.key = layout.pad_keys(runway_key.astype(jnp.float32))  # z_j, [B, Tkp, d]
        source = runway_query if runway_coefficient == "bilinear" else runway_key
        self.values = layout.pad_keys(source.astype(jnp.float32))  # w_k, [B, Tkp, d]
        self.few_rows = layout.query_block <= FEW_ROWS
        if runway_span == "exact" and not self.few_rows:
            num_key_blocks = layout.padded_key_length // layout.key_block
            self.value_blocks = self.values.reshape(layout.batch, num_key_blocks, layout.key_block, -1)
            self.key_blocks = self.key.reshape(self.value_blocks.shape)
            # triu(W_J Z_J^T): [B, J, k, j] with k <= j; shared by every query block.
            within = jnp.einsum("bJkd,bJjd->bJkj", self.value_blocks, self.key_blocks)
            upper = jnp.triu(jnp.ones((layout.key_block, layout.key_block), bool))
            self.within_block = jnp.where(upper, within, 0.0)

    def query_rows(self):
        """``[num_query_blocks, B, Bq, 2, d]``: each row's runway query and own ``w_i``."""
        layout = self.layout
        own = jnp.stack([self.runway_query, self.values[:, : layout.key_length]], 2)
        return layout.blocks(at_positions(own, layout.positions))  # padded rows: position -1

    def coefficients(self, runway_rows, positions, visible, start):
        """``[B, Bq, S]`` rho for one query block over its slice of keys (``start``, see
        ``_Layout.take_keys``); zero where undefined."""
        runway_query, own_values = runway_rows[:, :, 0], runway_rows[:, :, 1]  # [B, Bq, d] each
        take = functools.partial(self.layout.take_keys, start=start)
        keys, values = take(self.key), take(self.values)
        if self.span == "exact" and self.few_rows:
            return self._exact_by_running_sums(runway_query, own_values, positions, visible,
                                               keys, values)
        if self.span == "exact":
            blocks = functools.partial(take, unit=self.layout.key_block)
            return self._exact(runway_query, own_values, positions, visible, blocks(self.key_blocks),
                               blocks(self.value_blocks), blocks(self.within_block))
        return self._prefix(runway_query, own_values, positions, visible, keys, values)

    def _logits(self, logits, distance):
        if self.alibi_slope is not None:
            logits = logits - jnp.asarray(self.alibi_slope, jnp.float32) * distance
        return soft_cap(logits, self.cap)  # eq. (7b)

    def _prefix(self, runway_query, own_values, positions, visible, keys, values):
        layout = self.layout
        distance = (positions[:, :, None] - layout.key_positions[None, None, :]).astype(jnp.float32)
        logits = self._logits(self.scale * jnp.einsum("bid,bkd->bik", runway_query, keys),
                              distance)
        probs = masked_softmax(logits, visible)  # A_ik
        diagonal_probs = jnp.sum(jnp.where(distance == 0, probs, 0.0), axis=-1)  # A_ii, [B, Bq]
        # u_i = P_i(i-1) = (A w)_i - A_ii w_i (eq. (3b)): not a renormalized strictly-causal pass.
        runway_summary = jnp.einsum("bik,bkd->bid", probs, values)
        runway_summary -= diagonal_probs[..., None] * own_values
        rho = jnp.einsum("bid,bjd->bij", runway_summary, keys)
        return jnp.where(visible, self.scale * rho, 0.0)

    def _exact_by_running_sums(self, runway_query, own_values, positions, visible, keys, values):
        """Eq. (3b) with ``P_i(j)`` as a cumulative sum over the keys: ``[B, Bq, Tkp, d]``, cheap
        for the few rows of a decoding step."""
        layout = self.layout
        distance = positions[:, :, None] - layout.key_positions[None, None, :]  # [B, Bq, Tkp]
        logits = self._logits(self.scale * jnp.einsum("bid,bkd->bik", runway_query, keys),
                              distance.astype(jnp.float32))
        probs = masked_softmax(logits, visible)  # A_ik
        diagonal_probs = jnp.sum(jnp.where(distance == 0, probs, 0.0), axis=-1)  # A_ii
        running = jnp.cumsum(probs[..., None] * values[:, None], axis=2)  # P_i(j)
        runway_summary = running[:, :, -1] - diagonal_probs[..., None] * own_values  # u_i
        rho = jnp.einsum("bijd,bjd->bij", runway_summary[:, :, None] - running, keys)
        return jnp.where(visible & (distance >= 2), self.scale * rho, 0.0)

    def _exact(self, runway_query, own_values, positions, visible, key_blocks, value_blocks,
               within_block):
        """Everything in key-block layout ``[B, J, i, k]``, so that the block-batched products
        need no transposes; one transpose back to ``[B, i, S]`` at the end."""
        layout = self.layout
        batch, key_block, key_span = layout.batch, layout.key_block, layout.key_span
        query_block = positions.shape[1]
        num_key_blocks = key_span // key_block
        key_positions = layout.key_positions.reshape(num_key_blocks, key_block)
        distance = positions[:, None, :, None] - key_positions[None, :, None, :]  # [B, J, i, k]
        to_blocks = lambda x: jnp.moveaxis(
            x.reshape(x.shape[0], query_block, num_key_blocks, key_block), 2, 1)
        mask = to_blocks(visible)
        logits = self._logits(
            self.scale * jnp.einsum("bid,bJkd->bJik", runway_query, key_blocks),
            distance.astype(jnp.float32))
        probs = masked_softmax(logits, mask, axis=(1, 3))  # A_ik
        # A_ii sits in key block p // Bk at offset p % Bk for the row's position p (a row that
        # sees nothing has probabilities 0 wherever the clipped index points).
        own = jnp.clip(positions, 0, key_span - 1)
        rows = jnp.arange(query_block)[None]
        diagonal_probs = probs[jnp.arange(batch)[:, None], own // key_block, rows, own % key_block]
        block_sums = jnp.einsum("bJik,bJkd->bJid", probs, value_blocks)  # A_{i,J} W_J
        # u_i = P_i(i-1) = (A w)_i - A_ii w_i (eq. (3b)): not a renormalized strictly-causal pass.
        runway_summary = jnp.sum(block_sums, axis=1) - diagonal_probs[..., None] * own_values
        earlier_blocks = jnp.cumsum(block_sums, axis=1) - block_sums  # S_i(J), exclusive
        # rho_ij = <u_i - S_i(J), z_j> - (A_{i,J} triu(W_J Z_J^T))_ij, eq. (3b) by key blocks.
        rho = jnp.einsum("bJid,bJjd->bJij", runway_summary[:, None] - earlier_blocks, key_blocks)
        rho -= jnp.einsum("bJik,bJkj->bJij", probs, within_block)
        # The runway j < k < i is empty for j >= i - 1 (eq. (2)); mask it exactly rather than
        # leave the rounding residue of the (3b) cancellation.
        rho = jnp.where(mask & (distance >= 2), self.scale * rho, 0.0)
        return jnp.moveaxis(rho, 1, 2).reshape(batch, query_block, key_span)


def _attend(query_rows, keys, values, layout, positions, visible, scale, alibi_slopes,
            logits_soft_cap, bias):
    """Softmax attention of one query block ``[B, Bq, K, G, d]`` over all padded keys, restricted
    to ``visible`` ``[B or 1, Bq, Tkp]``, logits ``s + bias`` (+ ALiBi), soft-capped (eq. (7c)).

    The logits are laid out ``[B, Bq, K, G, Tkp]`` (heads beside the key axis): with this layout
    XLA fuses the shared bias ``rho`` and its gradient (a sum over heads) into the softmax; with
    heads leading, the bias alone made forward+backward about 1.5x slower on CPU.
    """
    logits = jnp.einsum("bikgd,bjkd->bikgj", query_rows, keys,
                        preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias[:, :, None, None, :]
    if alibi_slopes is not None:
        slopes = jnp.reshape(alibi_slopes, (layout.kv_heads, -1))  # head h = k * G + g
        distance = positions[:, :, None] - layout.key_positions[None, None, :]  # [B, Bq, Tkp]
        logits = logits - slopes[:, :, None] * distance[:, :, None, None, :].astype(jnp.float32)
    probs = masked_softmax(soft_cap(logits, logits_soft_cap), visible[:, :, None, None, :])
    out = jnp.einsum("bikgj,bjkd->bikgd", probs.astype(values.dtype), values,
                     preferred_element_type=jnp.float32)
    return out.astype(query_rows.dtype)


def _round_up(value, multiple):
    return -(-value // multiple) * multiple
