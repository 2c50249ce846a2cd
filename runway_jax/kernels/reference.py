"""Reference twin of the fused kernels: the same blocked algorithm (METHOD (3c)) in plain ``jnp``.

It walks the same tiles in the same order with the same tile functions from
:mod:`runway_jax.kernels.common` as the TPU and GPU kernels, with Python loops instead of a grid,
so a test can compare a kernel with it residual by residual (``lse``, ``u``), and the twin itself
with the dense ``"reference"`` implementation. It is for tests at small T, not for speed.

Layouts (head-major, padded): queries ``[B, H, Tp, d]``, keys/values ``[B, K, Tp, d]``, runway
arrays ``[B, Tp, d]``, segment ids ``[B, Tp]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from runway_jax.kernels import common


def runway_statistics(runway_query, runway_key, segment_ids, *, plan, coefficient, scale):
    """Pass 1 of METHOD (3c) for one batch row: the runway head's ``lse`` ``[Tp, 1]`` and
    ``u = P_i(i-1)`` ``[Tp, d]`` float32."""
    values = runway_query if coefficient == "bilinear" else runway_key
    lse_rows, summary_rows = [], []
    bq, bk = plan.block_q, plan.block_k
    for qi in range(plan.num_query_blocks):
        rows = slice(qi * bq, (qi + 1) * bq)
        stats = common.initial_row_stats(bq, runway_query.shape[-1])
        for kj in range(common.last_key_block(qi, plan) + 1):
            cols = slice(kj * bk, (kj + 1) * bk)
            visible, _ = _masks(qi, kj, plan, segment_ids)
            logits = common.runway_logits(runway_query[rows], runway_key[cols], scale)
            stats = common.online_softmax_step(*stats, logits, visible,
                                               values[cols].astype(jnp.float32))
        weighted, lse = common.finish_softmax(*stats)
        summary_rows.append(common.runway_summary(weighted, lse, runway_query[rows],
                                                  runway_key[rows], values[rows], scale))
        lse_rows.append(lse)
    return jnp.concatenate(lse_rows), jnp.concatenate(summary_rows)


def rewired_forward(query, key, value, runway_query, runway_key, segment_ids, *, plan, beta,
                    coefficient, span, scale):
    """Pass 2 of METHOD (3c) for one batch row: ``out`` ``[H, Tp, d]`` and the rewired heads'
    ``lse`` ``[H, Tp, 1]``, plus pass 1's ``(runway_lse, summary)``."""
    runway_lse, summary = runway_statistics(runway_query, runway_key, segment_ids, plan=plan,
                                            coefficient=coefficient, scale=scale)
    values_w = (runway_query if coefficient == "bilinear" else runway_key).astype(jnp.float32)
    keys_z = runway_key.astype(jnp.float32)
    heads, groups = query.shape[0], query.shape[0] // key.shape[0]
    bq, bk = plan.block_q, plan.block_k
    outs, lses = [], []
    for qi in range(plan.num_query_blocks):
        rows = slice(qi * bq, (qi + 1) * bq)
        earlier = jnp.zeros((bq, query.shape[-1]), jnp.float32)
        stats = [common.initial_row_stats(bq, query.shape[-1]) for _ in range(heads)]
        for kj in range(common.last_key_block(qi, plan) + 1):
            cols = slice(kj * bk, (kj + 1) * bk)
            visible, distance = _masks(qi, kj, plan, segment_ids)
            if span == "exact":
                logits = common.runway_logits(runway_query[rows], runway_key[cols], scale)
                probs = jnp.where(visible, jnp.exp(logits - runway_lse[rows]), 0.0)
            else:
                probs = None
            rho = common.runway_coefficients_tile(
                probs, summary[rows], earlier, values_w[cols], keys_z[cols], visible, distance,
                span=span, scale=scale)
            if span == "exact":
                earlier = earlier + common.dot(probs, values_w[cols])
            for h in range(heads):
                logits = common.rewired_logits(query[h, rows], key[h // groups, cols], rho,
                                               beta=beta, scale=scale)
                stats[h] = common.online_softmax_step(*stats[h], logits, visible,
                                                      value[h // groups, cols])
        finished = [common.finish_softmax(*s) for s in stats]
        outs.append(jnp.stack([o for o, _ in finished]))
        lses.append(jnp.stack([l for _, l in finished]))
    out = jnp.concatenate(outs, axis=1).astype(query.dtype)
    return out, jnp.concatenate(lses, axis=1), runway_lse, summary


def batched_rewired_forward(query, key, value, runway_query, runway_key, segment_ids, **options):
    """:func:`rewired_forward` over the batch axis (``vmap``)."""
    return jax.vmap(lambda *a: rewired_forward(*a, **options))(
        query, key, value, runway_query, runway_key, segment_ids)


def _masks(query_block_index, key_block_index, plan, segment_ids):
    bq, bk = plan.block_q, plan.block_k
    query_positions = query_block_index * bq + jnp.arange(bq)[:, None]
    key_positions = key_block_index * bk + jnp.arange(bk)[None, :]
    query_segments = segment_ids[query_block_index * bq:(query_block_index + 1) * bq, None]
    key_segments = segment_ids[None, key_block_index * bk:(key_block_index + 1) * bk]
    return common.tile_masks(query_positions, key_positions, query_segments, key_segments)
