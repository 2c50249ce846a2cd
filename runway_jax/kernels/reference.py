"""Reference twin of the fused kernels: the same blocked algorithm (METHOD (3c)) in plain ``jnp``.

It uses the same tile functions from :mod:`runway_jax.kernels.layouts` as the TPU and GPU kernels,
with Python loops instead of a grid, so a test can compare a kernel with it residual by residual
(``lse``, ``u``), and the twin itself with the dense ``"reference"`` implementation. It walks
every tile in the kernels' order, also the tiles that the kernels skip (outside the window or
above the diagonal): with the per-row offset traced under ``vmap`` the loop bounds are not known
in Python, and a tile that a row cannot see adds exactly zero. It is for tests at small T, not
for speed.

Layouts (head-major, padded, one batch row): :class:`runway_jax.kernels.layouts.KernelInputs`
without the batch axis; ``offset`` is the position of query row 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from runway_jax.kernels import layouts, tile_math


def _masks(query_block_index, key_block_index, plan, offset, query_segments, key_segments):
    bq, bk = plan.block_q, plan.block_k
    rows = query_block_index * bq + jnp.arange(bq)[:, None]
    query_positions = jnp.where(rows < plan.query_length, offset + rows, -1)
    key_positions = key_block_index * bk + jnp.arange(bk)[None, :]
    rows = slice(query_block_index * bq, (query_block_index + 1) * bq)
    cols = slice(key_block_index * bk, (key_block_index + 1) * bk)
    return tile_math.tile_masks(query_positions, key_positions, query_segments[rows, None],
                                key_segments[None, cols], window=plan.window)


def runway_statistics(runway_query_rows, runway_key_rows, values_rows, runway_key, values,
                      query_segments, key_segments, offset, *, plan, scale, cap=None):
    """Pass 1 of METHOD (3c) for one batch row: the runway head's ``lse`` ``[Tqp, 1]`` and
    ``u = P_i(i-1)`` ``[Tqp, d]`` float32."""
    lse_rows, summary_rows = [], []
    bq, bk = plan.block_q, plan.block_k
    for qi in range(plan.num_query_blocks):
        rows = slice(qi * bq, (qi + 1) * bq)
        stats = tile_math.initial_row_stats(bq, runway_query_rows.shape[-1])
        for kj in range(plan.num_key_blocks):
            cols = slice(kj * bk, (kj + 1) * bk)
            visible, _ = _masks(qi, kj, plan, offset, query_segments, key_segments)
            logits = tile_math.runway_logits(runway_query_rows[rows], runway_key[cols], scale, cap)
            stats = tile_math.online_softmax_step(*stats, logits, visible,
                                                  values[cols].astype(jnp.float32))
        weighted, lse = tile_math.finish_softmax(*stats)
        row_index = qi * bq + jnp.arange(bq)[:, None]
        sees_itself = (row_index < plan.query_length) & (offset + row_index >= 0)
        summary_rows.append(tile_math.runway_summary(weighted, lse, runway_query_rows[rows],
                                                  runway_key_rows[rows], values_rows[rows], scale,
                                                     cap, sees_itself=sees_itself))
        lse_rows.append(lse)
    return jnp.concatenate(lse_rows), jnp.concatenate(summary_rows)


def rewired_forward(query, key, value, runway_query, runway_key, segment_ids, query_segments,
                    runway_query_rows, runway_key_rows, offset, *, plan, beta, runway_coefficient,
                    runway_span, scale, cap=None):
    """Pass 2 of METHOD (3c) for one batch row: ``out`` ``[H, Tqp, d]`` and the rewired heads'
    ``lse`` ``[H, Tqp, 1]``, plus pass 1's ``(runway_lse, summary)``."""
    values_w = (runway_query if runway_coefficient == "bilinear" else runway_key).astype(
        jnp.float32)
    values_rows = runway_query_rows if runway_coefficient == "bilinear" else runway_key_rows
    runway_lse, summary = runway_statistics(
        runway_query_rows, runway_key_rows, values_rows, runway_key, values_w, query_segments,
        segment_ids, offset, plan=plan, scale=scale, cap=cap)
    keys_z = runway_key.astype(jnp.float32)
    heads, groups = query.shape[0], query.shape[0] // key.shape[0]
    bq, bk = plan.block_q, plan.block_k
    outs, lses = [], []
    for qi in range(plan.num_query_blocks):
        rows = slice(qi * bq, (qi + 1) * bq)
        earlier = jnp.zeros((bq, query.shape[-1]), jnp.float32)
        stats = [tile_math.initial_row_stats(bq, query.shape[-1]) for _ in range(heads)]
        for kj in range(plan.num_key_blocks):
            cols = slice(kj * bk, (kj + 1) * bk)
            visible, distance = _masks(qi, kj, plan, offset, query_segments, segment_ids)
            logits = tile_math.runway_logits(runway_query_rows[rows], runway_key[cols], scale, cap)
            probs = jnp.where(visible, jnp.exp(logits - runway_lse[rows]), 0.0)
            rho = tile_math.runway_coefficients_tile(
                probs, summary[rows], earlier, values_w[cols], keys_z[cols], visible, distance,
                runway_span=runway_span, scale=scale)
            earlier = earlier + tile_math.dot(probs, values_w[cols])
            for h in range(heads):
                logits = tile_math.rewired_logits(query[h, rows], key[h // groups, cols], rho,
                                                  beta=beta, scale=scale, cap=cap)
                stats[h] = tile_math.online_softmax_step(*stats[h], logits, visible,
                                                         value[h // groups, cols])
        finished = [tile_math.finish_softmax(*s) for s in stats]
        outs.append(jnp.stack([o for o, _ in finished]))
        lses.append(jnp.stack([l for _, l in finished]))
    out = jnp.concatenate(outs, axis=1).astype(query.dtype)
    return out, jnp.concatenate(lses, axis=1), runway_lse, summary


def batched_rewired_forward(*arrays, **options):
    """:func:`rewired_forward` over the batch axis (``vmap``) of
    :class:`runway_jax.kernels.layouts.KernelInputs`."""
    return jax.vmap(lambda *a: rewired_forward(*a, **options))(*arrays)


def rewired_backward(query, key, value, runway_query, runway_key, segment_ids, query_segments,
                     runway_query_rows, runway_key_rows, offset, out, lse, runway_lse, summary,
                     out_grad, *, plan, beta, runway_coefficient, runway_span, scale, cap=None):
    """METHOD (3d) for one batch row, walking the tiles as the TPU backward kernels do.

    Pass BQ (query blocks, key blocks ascending): ``dq`` of the heads, ``delta_i = sum_j d rho_ij
    rho_ij`` (which equals ``sum_k A_ik dA_ik``, the runway softmax-backward term) and, for the
    prefix span, ``du_i``. Pass BK (key blocks ascending, then query blocks): ``dk``, ``dv`` of the
    heads and every runway gradient, with the exact span's row prefixes ``S_i`` and ``R_i`` kept
    for all rows and advanced one key block at a time.

    Returns float32 ``(dq, dk, dv, d runway_query, d runway_key, d beta)``, the runway gradients
    on the key side ``[Tkp, d]``.
    """
    f32 = jnp.float32
    values_w = (runway_query if runway_coefficient == "bilinear" else runway_key).astype(f32)
    keys_z = runway_key.astype(f32)
    runway_query_rows32 = runway_query_rows.astype(f32)
    heads, groups = query.shape[0], query.shape[0] // key.shape[0]
    bq, bk, tqp, width = plan.block_q, plan.block_k, plan.padded_query_length, query.shape[-1]
    out_dot = jnp.sum(out_grad.astype(f32) * out.astype(f32), axis=-1, keepdims=True)  # [H,Tqp,1]

    def tile(qi, kj, earlier):
        rows, cols = slice(qi * bq, (qi + 1) * bq), slice(kj * bk, (kj + 1) * bk)
        visible, distance = _masks(qi, kj, plan, offset, query_segments, segment_ids)
        probs, rho, _, _, slope = tile_math.runway_tile_recompute(
            visible, distance, runway_query_rows[rows], runway_lse[rows], runway_key[cols],
            values_w[cols], summary[rows], earlier, runway_span=runway_span, scale=scale, cap=cap)
        head_tiles = [tile_math.head_backward_tile(
            query[h, rows], key[h // groups, cols], value[h // groups, cols], out_grad[h, rows],
            lse[h, rows], out_dot[h, rows], rho, visible, beta=beta, scale=scale, cap=cap)
            for h in range(heads)]
        drho = tile_math.defined_drho(head_tiles, visible, distance, runway_span=runway_span,
                                      beta=beta)
        return rows, cols, distance, probs, rho, head_tiles, drho, slope

    # Pass BQ.
    dq = jnp.zeros(query.shape, f32)
    rho_dot = jnp.zeros((tqp, 1), f32)
    summary_grad = jnp.zeros((tqp, width), f32)
    for qi in range(plan.num_query_blocks):
        earlier = jnp.zeros((bq, width), f32)
        for kj in range(plan.num_key_blocks):
            rows, cols, _, probs, rho, head_tiles, drho, _ = tile(qi, kj, earlier)
            for h, (_, ds) in enumerate(head_tiles):
                dq = dq.at[h, rows].add(scale * tile_math.dot(ds, key[h // groups, cols]))
            rho_dot = rho_dot.at[rows].add(
                jnp.sum(rho * sum(ds for _, ds in head_tiles), axis=1, keepdims=True))
            summary_grad = summary_grad.at[rows].add(scale * tile_math.dot(drho, keys_z[cols]))
            earlier = earlier + tile_math.dot(probs, values_w[cols])
    delta = -beta * rho_dot

    # Pass BK.
    dk, dv = jnp.zeros(key.shape, f32), jnp.zeros(value.shape, f32)
    tkp = plan.padded_key_length
    d_runway_query_rows = jnp.zeros((tqp, width), f32)  # dq^r
    d_runway_key = jnp.zeros((tkp, width), f32)  # dk^r
    dz, dw = jnp.zeros((tkp, width), f32), jnp.zeros((tkp, width), f32)
    earlier_all = jnp.zeros((tqp, width), f32)  # S_i before the current key block
    prefix_all = jnp.zeros((tqp, width), f32)  # R_i before the current key block
    for kj in range(plan.num_key_blocks):
        for qi in range(plan.num_query_blocks):
            rows, cols, distance, probs, rho, head_tiles, drho, slope = tile(
                qi, kj, earlier_all[qi * bq:(qi + 1) * bq])
            for h, (p, ds) in enumerate(head_tiles):
                g = h // groups
                dk = dk.at[g, cols].add(scale * tile_math.dot(ds.T, query[h, rows]))
                dv = dv.at[g, cols].add(tile_math.dot(p.T, out_grad[h, rows].astype(f32)))
            dprobs, dz_tile, dw_tile = tile_math.runway_backward_tile(
                probs, drho, distance, values_w[cols], keys_z[cols], runway_span=runway_span,
                scale=scale, prefix_sum=prefix_all[rows], summary_grad=summary_grad[rows],
                earlier=earlier_all[rows], summary=summary[rows])
            dlogits = probs * (dprobs - delta[rows])  # softmax backward of the runway head
            if slope is not None:
                dlogits = dlogits * slope  # through the soft cap (eq. (7b))
            d_runway_query_rows = d_runway_query_rows.at[rows].add(
                scale * tile_math.dot(dlogits, keys_z[cols]))
            d_runway_key = d_runway_key.at[cols].add(
                scale * tile_math.dot(dlogits.T, runway_query_rows32[rows]))
            dz, dw = dz.at[cols].add(dz_tile), dw.at[cols].add(dw_tile)
            earlier_all = earlier_all.at[rows].add(tile_math.dot(probs, values_w[cols]))
            prefix_all = prefix_all.at[rows].add(tile_math.dot(drho, keys_z[cols]))
    grads = layouts.runway_gradients(dq, dk, dv, d_runway_query_rows[None], d_runway_key, dz, dw,
                                     rho_dot, jnp.reshape(offset, (1,)), plan=plan,
                                     runway_coefficient=runway_coefficient)
    return grads[:3] + (grads[3][0],) + grads[4:]
