"""The ``"xla"`` implementation: METHOD eq. (3b) evaluated in query blocks and key blocks.

Each query block I (``Bq`` rows) sees all ``Tp`` (padded) keys at once, so the largest arrays are
the ``[B, Bq, H, Tp]`` logits; nothing is ``T x T x T`` or ``T x T x d``. For the exact span the
correction ``c_ij = <P_i(j), z_j>`` of eq. (3b) is split over key blocks J of size ``Bk``:

  c_ij = <S_i(J), z_j> + (A_{i,J} @ triu(W_J Z_J^T))_ij,   S_i(J) = sum_{J' < J} A_{i,J'} W_{J'}

where ``S`` is an exclusive prefix sum over key blocks (``[B, Tp/Bk, Bq, d]``) and ``triu`` keeps
``k <= j``. The loop over query blocks is a ``lax.map`` of a rematerialized body, so the backward
pass recomputes one block at a time instead of storing every block's ``Bq x Tp`` arrays: training
memory stays ``O(Bq * Tp)`` per layer, like the forward pass.

A query block's products run over every key (``probs @ values`` over all ``Tp``), so a masked zero
meets every masked value; NaN/Inf inputs are therefore zeroed first and the rows that can see them
set to NaN after (:func:`runway_jax.masking.quarantine_nonfinite`, ``O(B T H d)`` work).

Layouts were chosen by measurement on CPU (``benchmarks/attention.py``): the heads' logits keep
the heads beside the key axis and the exact-span runway terms live in key-block layout
``[B, J, i, k]``; with other layouts XLA inserted transposes that made the rewired backward pass
1.5x to 2x slower than it is.

Shape letters: B batch, i query (``Bq``), j / k key (``Tp``, or ``Bk`` inside a key block J),
K key/value heads, G query heads per key/value head, d head width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from runway_jax.masking import (alibi_bias, finite_or_zero, masked_softmax, nonfinite_positions,
                                 poison_rows, quarantine_nonfinite, seen_by_rows, visibility_mask)

QUERY_BLOCK = 512
KEY_BLOCK = 64


def block_plan(length: int, query_block: int = QUERY_BLOCK, key_block: int = KEY_BLOCK):
    """``(Bq, Bk, padded_length)``: ``Bk`` divides ``Bq`` and ``Bq`` divides ``padded_length``.

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
    "beta", "runway_coefficient", "runway_span", "query_block", "key_block"))
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
    query_block=QUERY_BLOCK,
    key_block=KEY_BLOCK,
):
    """METHOD eq. (3) with rho from eq. (3b); arguments as ``attention.rewired_attention``."""
    (query, key, value, runway_query, runway_key), poisoned = quarantine_nonfinite(
        query, key, value, runway_query, runway_key, segment_ids=segment_ids,
        runway_reaches_output=beta != 0)
    layout = _Layout(query, key, segment_ids, query_block, key_block)
    runway = _Runway(layout, runway_query, runway_key, runway_coefficient, runway_span, scale,
                     runway_alibi_slope)
    keys, values = layout.pad(key), layout.pad(value)

    def block(inputs):
        query_rows, runway_rows, segments, start = inputs
        rho = runway.coefficients(runway_rows, segments, start)
        return _attend(query_rows, keys, values, layout, segments, start, scale, alibi_slopes,
                       bias=-beta * rho)

    inputs = (layout.query_blocks(query), runway.query_blocks(), layout.segment_blocks(),
              layout.starts)
    out = layout.merge(jax.lax.map(jax.checkpoint(block, prevent_cse=False), inputs))
    return poison_rows(out, poisoned)


@functools.partial(jax.jit, static_argnames=("query_block", "key_block"))
def causal_attention(query, key, value, *, segment_ids, scale, alibi_slopes,
                     query_block=QUERY_BLOCK, key_block=KEY_BLOCK):
    """Standard causal attention with the same blocking as :func:`rewired_attention`."""
    (query, key, value), poisoned = quarantine_nonfinite(query, key, value,
                                                         segment_ids=segment_ids)
    layout = _Layout(query, key, segment_ids, query_block, key_block)
    keys, values = layout.pad(key), layout.pad(value)

    def block(inputs):
        query_rows, segments, start = inputs
        return _attend(query_rows, keys, values, layout, segments, start, scale, alibi_slopes,
                       bias=None)

    inputs = (layout.query_blocks(query), layout.segment_blocks(), layout.starts)
    out = layout.merge(jax.lax.map(jax.checkpoint(block, prevent_cse=False), inputs))
    return poison_rows(out, poisoned)


@functools.partial(jax.jit, static_argnames=(
    "runway_coefficient", "runway_span", "query_block", "key_block"))
def runway_coefficients(runway_query, runway_key, *, runway_coefficient, runway_span, segment_ids,
                        scale, runway_alibi_slope, query_block=QUERY_BLOCK, key_block=KEY_BLOCK):
    """``[B, T, T]`` float32 rho of METHOD eq. (2), one query block at a time; rows that see a
    non-finite runway query or key are NaN (see :func:`masking.quarantine_nonfinite`)."""
    poisoned = seen_by_rows(nonfinite_positions(runway_query, runway_key), segment_ids)
    runway_query, runway_key = finite_or_zero(runway_query), finite_or_zero(runway_key)
    layout = _Layout(runway_query[:, :, None], runway_key[:, :, None], segment_ids, query_block,
                     key_block)
    runway = _Runway(layout, runway_query, runway_key, runway_coefficient, runway_span, scale,
                     runway_alibi_slope)

    def block(inputs):
        runway_rows, segments, start = inputs
        return runway.coefficients(runway_rows, segments, start)

    rho = jax.lax.map(block, (runway.query_blocks(), layout.segment_blocks(), layout.starts))
    batch, length = runway_query.shape[:2]
    rho = jnp.moveaxis(rho, 0, 1).reshape(batch, layout.padded_length, layout.padded_length)
    return jnp.where(poisoned[:, :, None], jnp.nan, rho[:, :length, :length])


class _Layout:
    """Block sizes, padding and the reshapes between ``[B, T, ...]`` and query blocks."""

    def __init__(self, query, key, segment_ids, query_block, key_block):
        self.batch, self.length, self.heads = query.shape[:3]
        self.kv_heads = key.shape[2]
        self.query_block, self.key_block, self.padded_length = block_plan(
            self.length, query_block, key_block)
        self.num_query_blocks = self.padded_length // self.query_block
        self.starts = jnp.arange(self.num_query_blocks) * self.query_block
        self.key_positions = jnp.arange(self.padded_length)
        if segment_ids is None:
            segment_ids = jnp.zeros((self.batch, self.length), jnp.int32)
        # Padding sits after every real token, so causality already hides it from real queries.
        self.segments = self.pad(segment_ids)

    def pad(self, x):
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, self.padded_length - self.length)
        return jnp.pad(x, widths)

    def blocks(self, x):
        """``[B, T, ...] -> [num_query_blocks, B, Bq, ...]``."""
        x = self.pad(x)
        x = x.reshape(self.batch, self.num_query_blocks, self.query_block, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    def query_blocks(self, query):
        groups = self.heads // self.kv_heads
        query = query.reshape(*query.shape[:2], self.kv_heads, groups, query.shape[-1])  # BTKGd
        return self.blocks(query)

    def segment_blocks(self):
        return self.blocks(self.segments[:, : self.length])

    def merge(self, blocks):
        """``[num_query_blocks, B, Bq, K, G, d] -> [B, T, H, d]``."""
        out = jnp.moveaxis(blocks, 0, 1)
        out = out.reshape(self.batch, self.padded_length, self.heads, out.shape[-1])
        return out[:, : self.length]

    def query_positions(self, start):
        return start + jnp.arange(self.query_block)

    def mask(self, segments, start):
        """``[B, Bq, Tp]`` visibility of the padded keys to one query block."""
        return visibility_mask(self.query_positions(start), self.key_positions, segments,
                               self.segments)


class _Runway:
    """The runway head's arrays (float32, padded) and rho for one query block (eq. (3b))."""

    def __init__(self, layout, runway_query, runway_key, runway_coefficient, runway_span, scale,
                 alibi_slope):
        self.layout = layout
        self.span = runway_span
        self.scale = scale
        self.alibi_slope = alibi_slope
        self.runway_query = runway_query.astype(jnp.float32)
        self.key = layout.pad(runway_key.astype(jnp.float32))  # z_j, [B, Tp, d]
        source = runway_query if runway_coefficient == "bilinear" else runway_key
        self.values = layout.pad(source.astype(jnp.float32))  # w_k, [B, Tp, d]
        if runway_span == "exact":
            num_key_blocks = layout.padded_length // layout.key_block
            self.value_blocks = self.values.reshape(layout.batch, num_key_blocks, layout.key_block, -1)
            self.key_blocks = self.key.reshape(self.value_blocks.shape)
            # triu(W_J Z_J^T): [B, J, k, j] with k <= j; shared by every query block.
            within = jnp.einsum("bJkd,bJjd->bJkj", self.value_blocks, self.key_blocks)
            upper = jnp.triu(jnp.ones((layout.key_block, layout.key_block), bool))
            self.within_block = jnp.where(upper, within, 0.0)

    def query_blocks(self):
        return self.layout.blocks(jnp.stack([self.runway_query, self.values[:, : self.layout.length]], 2))

    def coefficients(self, runway_rows, segments, start):
        """``[B, Bq, Tp]`` rho for the query block starting at ``start``; zero where undefined."""
        runway_query, own_values = runway_rows[:, :, 0], runway_rows[:, :, 1]  # [B, Bq, d] each
        if self.span == "exact":
            return self._exact(runway_query, own_values, segments, start)
        return self._prefix(runway_query, own_values, segments, start)

    def _prefix(self, runway_query, own_values, segments, start):
        layout = self.layout
        query_positions = layout.query_positions(start)
        mask = layout.mask(segments, start)  # [B, i, k]
        logits = self.scale * jnp.einsum("bid,bkd->bik", runway_query, self.key)
        if self.alibi_slope is not None:
            logits = logits + alibi_bias(query_positions, layout.key_positions, self.alibi_slope)
        probs = masked_softmax(logits, mask)  # A_ik
        diagonal = query_positions[:, None] == layout.key_positions[None, :]
        diagonal_probs = jnp.sum(jnp.where(diagonal, probs, 0.0), axis=-1)  # A_ii, [B, Bq]
        # u_i = P_i(i-1) = (A w)_i - A_ii w_i (eq. (3b)): not a renormalized strictly-causal pass.
        runway_summary = jnp.einsum("bik,bkd->bid", probs, self.values)
        runway_summary -= diagonal_probs[..., None] * own_values
        rho = jnp.einsum("bid,bjd->bij", runway_summary, self.key)
        return jnp.where(mask, self.scale * rho, 0.0)

    def _exact(self, runway_query, own_values, segments, start):
        """Everything in key-block layout ``[B, J, i, k]``, so that the block-batched products
        need no transposes; one transpose back to ``[B, i, Tp]`` at the end."""
        layout = self.layout
        batch, query_block, key_block = layout.batch, layout.query_block, layout.key_block
        num_key_blocks = layout.padded_length // key_block
        query_positions = layout.query_positions(start)
        key_positions = layout.key_positions.reshape(num_key_blocks, key_block)
        distance = query_positions[None, :, None] - key_positions[:, None, :]  # [J, i, k]
        mask = (distance >= 0)[None] & (
            segments[:, None, :, None]
            == self.layout.segments.reshape(batch, num_key_blocks, 1, key_block))
        logits = self.scale * jnp.einsum("bid,bJkd->bJik", runway_query, self.key_blocks)
        if self.alibi_slope is not None:
            logits = logits - jnp.asarray(self.alibi_slope, jnp.float32) * distance
        probs = masked_softmax(logits, mask, axis=(1, 3))  # A_ik
        # A_ii sits in key block (start + i) // Bk at offset (start + i) % Bk.
        rows = jnp.arange(query_block)
        diagonal_probs = probs[:, query_positions // key_block, rows, query_positions % key_block]
        block_sums = jnp.einsum("bJik,bJkd->bJid", probs, self.value_blocks)  # A_{i,J} W_J
        # u_i = P_i(i-1) = (A w)_i - A_ii w_i (eq. (3b)): not a renormalized strictly-causal pass.
        runway_summary = jnp.sum(block_sums, axis=1) - diagonal_probs[..., None] * own_values
        earlier_blocks = jnp.cumsum(block_sums, axis=1) - block_sums  # S_i(J), exclusive
        # rho_ij = <u_i - S_i(J), z_j> - (A_{i,J} triu(W_J Z_J^T))_ij, eq. (3b) by key blocks.
        rho = jnp.einsum("bJid,bJjd->bJij", runway_summary[:, None] - earlier_blocks, self.key_blocks)
        rho -= jnp.einsum("bJik,bJkj->bJij", probs, self.within_block)
        # The runway j < k < i is empty for j >= i - 1 (eq. (2)); mask it exactly rather than
        # leave the rounding residue of the (3b) cancellation.
        rho = jnp.where(mask & (distance >= 2)[None], self.scale * rho, 0.0)
        return jnp.moveaxis(rho, 1, 2).reshape(batch, query_block, layout.padded_length)


def _attend(query_rows, keys, values, layout, segments, start, scale, alibi_slopes, bias):
    """Causal softmax attention of one query block ``[B, Bq, K, G, d]`` over all padded keys.

    The logits are laid out ``[B, Bq, K, G, Tp]`` (heads beside the key axis): with this layout
    XLA fuses the shared bias ``rho`` and its gradient (a sum over heads) into the softmax; with
    heads leading, the bias alone made forward+backward about 1.5x slower on CPU.
    """
    logits = jnp.einsum("bikgd,bjkd->bikgj", query_rows, keys,
                        preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias[:, :, None, None, :]
    if alibi_slopes is not None:
        slopes = jnp.reshape(alibi_slopes, (layout.kv_heads, -1))  # head h = k * G + g
        distance = layout.query_positions(start)[:, None] - layout.key_positions[None, :]
        logits = logits - slopes[:, :, None] * distance[:, None, None, :].astype(jnp.float32)
    probs = masked_softmax(logits, layout.mask(segments, start)[:, :, None, None, :])
    out = jnp.einsum("bikgj,bjkd->bikgd", probs.astype(values.dtype), values,
                     preferred_element_type=jnp.float32)
    return out.astype(query_rows.dtype)


def _round_up(value, multiple):
    return -(-value // multiple) * multiple
