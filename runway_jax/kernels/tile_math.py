"""The per-tile mathematics of METHOD eqs. (3b)-(3d), shared by every kernel and the reference
twin: masks, soft cap, the online softmax, the runway coefficients of a tile, and the backward
tiles.

Pure ``jnp`` over values (no refs), so the same code runs inside a Mosaic TPU kernel, inside a
Triton or Mosaic GPU kernel and in the pure-``jnp`` twin (:mod:`runway_jax.kernels.reference`).
Row statistics are ``[Bq, 1]`` columns (``keepdims``) so that no kernel needs 1-D vectors.
Shape letters: Bq query block, Bk key block, d head width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from runway_jax.masking import MASK_VALUE


def dot(a, b, *, transpose_b=False):
    """``a @ b`` (or ``a @ b.T``) with float32 accumulation; float32 operands use full precision
    so that the runway coefficients stay float32-accurate (METHOD, notation) on TPU and GPU."""
    contract = ((1,), (1,)) if transpose_b else ((1,), (0,))
    full = jnp.float32 in (a.dtype, b.dtype)
    return jax.lax.dot_general(
        a, b, (contract, ((), ())), preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST if full else None)


def tile_masks(query_positions, key_positions, query_segments, key_segments, window=None):
    """``visible`` ``V_ij`` of METHOD eq. (7a) (causal, inside the window, same segment) and
    ``distance = i - j`` of one tile.

    Positions and segments are ``[Bq, 1]`` and ``[1, Bk]`` (or already broadcast ``[Bq, Bk]``); a
    row at a negative position (padding, or before a short row's first key) sees nothing.
    """
    distance = query_positions - key_positions
    visible = (distance >= 0) & (query_segments == key_segments)
    if window is not None:
        visible = visible & (distance <= window)
    return visible, distance


def soft_cap(logits, cap):
    """``cap * tanh(logits / cap)`` (METHOD eqs. (7b), (7c)); ``cap=None``: unchanged."""
    return logits if cap is None else cap * jnp.tanh(logits * (1.0 / cap))


def soft_cap_and_slope(logits, cap):
    """The capped logits and their derivative ``1 - tanh^2`` from one tanh (for the backward
    pass); ``(logits, None)`` without a cap."""
    if cap is None:
        return logits, None
    tanh = jnp.tanh(logits * (1.0 / cap))
    return cap * tanh, 1.0 - tanh * tanh


def online_softmax_step(max_so_far, sum_so_far, accumulator, logits, visible, values):
    """One key tile of a flash-attention row scan: float32 running max ``[Bq, 1]``, running sum
    ``[Bq, 1]`` and unnormalized output ``[Bq, d]``. Masked entries contribute exactly zero, also
    when a whole tile is masked for a row (then ``exp(MASK_VALUE - m)`` would otherwise be 1)."""
    logits = jnp.where(visible, logits, MASK_VALUE)
    new_max = jnp.maximum(max_so_far, jnp.max(logits, axis=1, keepdims=True))
    probs = jnp.where(visible, jnp.exp(logits - new_max), 0.0)
    correction = jnp.exp(max_so_far - new_max)
    new_sum = correction * sum_so_far + jnp.sum(probs, axis=1, keepdims=True)
    new_accumulator = correction * accumulator + dot(probs.astype(values.dtype), values)
    return new_max, new_sum, new_accumulator


def finish_softmax(max_so_far, sum_so_far, accumulator):
    """Normalized output and log-sum-exp; rows that saw no key (never real ones) give zeros."""
    empty = sum_so_far == 0.0
    safe_sum = jnp.where(empty, 1.0, sum_so_far)
    return accumulator / safe_sum, jnp.where(empty, MASK_VALUE, max_so_far + jnp.log(safe_sum))


def initial_row_stats(block_q, width):
    return (jnp.full((block_q, 1), MASK_VALUE, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
            jnp.zeros((block_q, width), jnp.float32))


def runway_logits(runway_query_rows, runway_key_block, scale, cap=None):
    """``s^r_IJ = scale * q^r_I (k^r_J)^T``, soft-capped (METHOD eqs. (1), (7b)), float32
    ``[Bq, Bk]``."""
    return soft_cap(scale * dot(runway_query_rows, runway_key_block, transpose_b=True), cap)


def runway_summary(weighted_values, runway_lse, runway_query_rows, runway_key_rows, own_values,
                   scale, cap=None, sees_itself=None):
    """``u_i = P_i(i-1) = (A w)_i - A_ii w_i`` (METHOD eq. (3b)): the runway head's causal output
    with values w minus its diagonal term, ``A_ii = exp(cap(s_ii) - lse_i)`` taken elementwise from
    the same statistics (not a renormalized strictly-causal pass). ``sees_itself`` ``[Bq, 1]``:
    False for rows that see nothing (their ``lse`` is the mask value, so ``exp`` would be inf)."""
    diagonal_logit = soft_cap(scale * jnp.sum(
        runway_query_rows.astype(jnp.float32) * runway_key_rows.astype(jnp.float32),
        axis=1, keepdims=True), cap)
    diagonal_prob = jnp.exp(diagonal_logit - runway_lse)
    if sees_itself is not None:
        diagonal_prob = jnp.where(sees_itself, diagonal_prob, 0.0)
    return weighted_values - diagonal_prob * own_values.astype(jnp.float32)


def runway_coefficients_tile(probs, summary, earlier, values_block, keys_block, visible, distance,
                             *, runway_span, scale):
    """``rho_IJ`` of METHOD eq. (3b) for one tile, float32 ``[Bq, Bk]``.

    Args:
      probs: ``A_IJ`` ``[Bq, Bk]`` (already zero where not visible).
      summary: ``u_I`` ``[Bq, d]``.
      earlier: ``S_I = sum_{J' < J} A_IJ' W_J'`` ``[Bq, d]`` (exact span only).
      values_block, keys_block: ``W_J`` and ``Z_J`` ``[Bk, d]`` float32.

    Exact: ``rho_ij = scale * (<u_i - S_i, z_j> - (A_IJ @ triu(W_J Z_J^T))_ij)`` with ``triu``
    keeping ``k <= j``, masked to ``i - j >= 2`` (empty runways are exactly zero, METHOD (6) item
    3). Prefix: ``rho_ij = scale * <u_i, z_j>`` for visible ``j <= i``.
    """
    if runway_span == "prefix":
        return jnp.where(visible, scale * dot(summary, keys_block, transpose_b=True), 0.0)
    within = dot(values_block, keys_block, transpose_b=True)  # [Bk(k), Bk(j)] <w_k, z_j>
    k_index = jax.lax.broadcasted_iota(jnp.int32, within.shape, 0)
    j_index = jax.lax.broadcasted_iota(jnp.int32, within.shape, 1)
    within = jnp.where(k_index <= j_index, within, 0.0)
    rho = dot(summary - earlier, keys_block, transpose_b=True) - dot(probs, within)
    return jnp.where(visible & (distance >= 2), scale * rho, 0.0)


def rewired_logits(query_rows, key_block, rho, *, beta, scale, cap=None):
    """``s~^h_IJ = scale * q^h_I (k^h_J)^T - beta * rho_IJ`` (METHOD eq. (3)), soft-capped after
    the bias (eq. (7c)), float32. ``rho=None``: standard attention (``beta = 0``)."""
    logits = scale * dot(query_rows, key_block, transpose_b=True)
    if rho is not None:
        logits = logits - beta * rho
    return soft_cap(logits, cap)


def head_backward_tile(query_rows, key_block, value_block, out_grad_rows, lse_rows, out_dot_rows,
                       rho, visible, *, beta, scale, cap=None):
    """One head's flash-attention backward on a tile of ``s~ = scale q k^T - beta rho``.

    Returns ``(P, dS~)`` float32 ``[Bq, Bk]``: ``P = exp(cap(s~) - lse)`` (zero where not visible)
    and ``dS~ = P (dO V^T - rowsum(dO o)) (1 - tanh^2)`` (the gradient of the logits before the
    cap, eq. (7c)); then ``dq = scale dS~ K``, ``dk = scale dS~^T Q``, ``dv = P^T dO``,
    ``d rho = -beta sum_h dS~^h`` (METHOD (3d)) and ``d beta = -sum rho sum_h dS~^h``.
    """
    logits = scale * dot(query_rows, key_block, transpose_b=True)
    if rho is not None:
        logits = logits - beta * rho
    logits, slope = soft_cap_and_slope(logits, cap)
    probs = jnp.where(visible, jnp.exp(logits - lse_rows), 0.0)
    dprobs = dot(out_grad_rows, value_block, transpose_b=True)
    dlogits = probs * (dprobs - out_dot_rows)
    return probs, dlogits if slope is None else dlogits * slope


def runway_tile_recompute(visible, distance, runway_query_rows, runway_lse_rows, runway_key_block,
                          values_block, summary_rows, earlier_rows, *, runway_span, scale, cap):
    """The backward passes' recomputation of one tile's runway terms, as in the forward pass:
    ``(A_IJ, rho_IJ, W_J, Z_J, slope)`` with ``W_J``, ``Z_J`` in float32 and ``slope`` the soft
    cap's ``1 - tanh^2`` of the runway logits (None without a cap)."""
    values_block = values_block.astype(jnp.float32)
    keys_block = runway_key_block.astype(jnp.float32)
    logits, slope = soft_cap_and_slope(runway_logits(runway_query_rows, runway_key_block, scale),
                                       cap)
    probs = jnp.where(visible, jnp.exp(logits - runway_lse_rows), 0.0)
    rho = runway_coefficients_tile(probs, summary_rows, earlier_rows, values_block, keys_block,
                                   visible, distance, runway_span=runway_span, scale=scale)
    return probs, rho, values_block, keys_block, slope


def defined_drho(head_tiles, visible, distance, *, runway_span, beta):
    """``d rho = -beta sum_h dS~^h`` where rho is defined (METHOD (3d)); ``head_tiles`` are the
    heads' ``(P^h, dS~^h)`` (:func:`head_backward_tile`)."""
    defined = visible & (distance >= 2) if runway_span == "exact" else visible
    return jnp.where(defined, -beta * sum(ds for _, ds in head_tiles), 0.0)


def runway_backward_tile(probs, drho, distance, values_block, keys_block, *, runway_span, scale,
                         prefix_sum=None, summary_grad=None, earlier=None, summary=None):
    """The runway head's gradients on one tile, METHOD (3d), given ``d rho_IJ``.

    Args:
      probs: ``A_IJ`` ``[Bq, Bk]`` (zero where not visible).
      drho: ``d rho_IJ`` ``[Bq, Bk]``, zero where rho is defined zero.
      distance: ``i - j`` ``[Bq, Bk]``.
      values_block, keys_block: ``W_J``, ``Z_J`` float32 ``[Bk, d]``.
      prefix_sum: exact span: ``R_I = sum_{j in earlier blocks} d rho_ij z_j`` ``[Bq, d]``.
      earlier: exact span: ``S_I`` of the forward pass ``[Bq, d]``; summary: ``u_I``.
      summary_grad: prefix span: ``du_I = scale sum_j d rho_ij z_j`` over the whole row.

    Returns ``(dA, dz_J, dw_J)``: ``dA_IJ`` ``[Bq, Bk]`` (zero for ``k >= i``: ``A_ii`` is not
    on any runway), and this tile's contributions to ``dz`` and ``dw`` ``[Bk, d]``.
    """
    before = distance >= 1  # k < i
    strict_probs = jnp.where(before, probs, 0.0)
    if runway_span == "prefix":
        dprobs = jnp.where(before, dot(summary_grad, values_block, transpose_b=True), 0.0)
        dz = scale * dot(drho.T, summary)
        dw = dot(strict_probs.T, summary_grad)
        return dprobs, dz, dw
    shape = (values_block.shape[0], values_block.shape[0])
    row = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    col = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    # <z_j, w_k> for j < k (as [j, k]): the in-block part of R_i(k) = sum_{j<k} drho_ij z_j.
    key_value = jnp.where(row < col, dot(keys_block, values_block, transpose_b=True), 0.0)
    dprobs = scale * (dot(prefix_sum, values_block, transpose_b=True) + dot(drho, key_value))
    dprobs = jnp.where(before, dprobs, 0.0)
    # dz_j = scale sum_i drho_ij (u_i - P_i(j)), P_i(j) = S_i + sum_{k in J, k <= j} A_ik w_k.
    drho_probs = dot(drho.T, probs)  # [j, k]
    dz = scale * (dot(drho.T, summary - earlier)
                  - dot(jnp.where(col <= row, drho_probs, 0.0), values_block))
    # dw_k = scale sum_{i > k} A_ik R_i(k), R_i(k) = R_I + sum_{j in J, j < k} drho_ij z_j.
    probs_drho = dot(strict_probs.T, drho)  # [k, j]
    dw = scale * (dot(strict_probs.T, prefix_sum)
                  + dot(jnp.where(col < row, probs_drho, 0.0), keys_block))
    return dprobs, dz, dw
