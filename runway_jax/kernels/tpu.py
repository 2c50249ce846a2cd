"""Pallas Mosaic TPU kernels for rewired attention, METHOD (3c).

Two ``pallas_call``s, each on the grid ``(B, query blocks, key blocks)``; the key axis is
``"arbitrary"`` (sequential), so per-row state lives in VMEM scratch across it:

1. :func:`runway_statistics` -- the runway head's flash attention with values w: its log-sum-exp
   ``lse^r`` and ``u_i = (A w)_i - A_ii w_i`` (METHOD eq. (3b)).
2. :func:`rewired_forward` -- one program per (batch row, query block) serves ALL rewired heads:
   for each key block J (ascending) it recomputes ``A_IJ`` from ``lse^r``, forms ``rho_IJ`` once
   (eq. (3b); exact span with the running prefix ``S_I``), and runs the online softmax of every
   head on ``s^h - beta * rho`` (eq. (3)). Rho is made once per tile and reused by the H heads:
   about ``(2H + 5) Bq Bk d`` multiply-adds per tile against ``2H Bq Bk d`` for standard attention.

Key blocks above the diagonal are skipped (``pl.when``) and their index map is clamped to the last
needed block, so they are neither computed nor fetched. Row statistics are ``[Bq, 1]`` columns.
The runway head's products are float32 (METHOD: softmax statistics and rho in float32); the heads'
``QK^T`` and ``PV`` run in the input dtype with float32 accumulation.

Layouts: see :mod:`runway_jax.kernels.common`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from runway_jax.kernels import common

_SEQUENTIAL_KEYS = ("parallel", "parallel", "arbitrary")


def _tile_masks(plan, query_block, key_block, query_segments_ref, key_segments_ref):
    shape = (plan.block_q, plan.block_k)
    query_positions = query_block * plan.block_q + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    key_positions = key_block * plan.block_k + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return common.tile_masks(query_positions, key_positions, query_segments_ref[...],
                             key_segments_ref[...])


def _key_block_index(plan):
    """Index map of key-side blocks: clamped to the last block the query block needs, so the
    skipped blocks above the diagonal re-use the previous DMA instead of fetching new data."""
    def index(batch, query_block, key_block):
        return jnp.minimum(key_block, common.last_key_block(query_block, plan))
    return index


def _specs(plan, width):
    key_index = _key_block_index(plan)
    rows = pl.BlockSpec((None, plan.block_q, width), lambda b, i, j: (b, i, 0))
    cols = pl.BlockSpec((None, plan.block_k, width), lambda b, i, j: (b, key_index(b, i, j), 0))
    query_segments = pl.BlockSpec((None, plan.block_q, 1), lambda b, i, j: (b, i, 0))
    key_segments = pl.BlockSpec((None, 1, plan.block_k), lambda b, i, j: (b, 0, key_index(b, i, j)))
    row_stats = pl.BlockSpec((None, plan.block_q, 1), lambda b, i, j: (b, i, 0))
    return rows, cols, query_segments, key_segments, row_stats


def _runway_statistics_kernel(runway_query_rows_ref, runway_key_rows_ref, values_rows_ref,
                              runway_key_cols_ref, values_cols_ref, query_segments_ref,
                              key_segments_ref, lse_ref, summary_ref, max_ref, sum_ref,
                              accumulator_ref, *, plan, scale):
    query_block, key_block = pl.program_id(1), pl.program_id(2)

    @pl.when(key_block == 0)
    def _init():
        max_ref[...], sum_ref[...], accumulator_ref[...] = common.initial_row_stats(
            plan.block_q, accumulator_ref.shape[-1])

    @pl.when(key_block <= common.last_key_block(query_block, plan))
    def _step():
        visible, _ = _tile_masks(plan, query_block, key_block, query_segments_ref,
                                 key_segments_ref)
        logits = common.runway_logits(runway_query_rows_ref[...], runway_key_cols_ref[...], scale)
        max_ref[...], sum_ref[...], accumulator_ref[...] = common.online_softmax_step(
            max_ref[...], sum_ref[...], accumulator_ref[...], logits, visible,
            values_cols_ref[...].astype(jnp.float32))

    @pl.when(key_block == plan.num_key_blocks - 1)
    def _finish():
        weighted, lse = common.finish_softmax(max_ref[...], sum_ref[...], accumulator_ref[...])
        lse_ref[...] = lse
        summary_ref[...] = common.runway_summary(
            weighted, lse, runway_query_rows_ref[...], runway_key_rows_ref[...],
            values_rows_ref[...], scale)


def runway_statistics(runway_query, runway_key, values, segment_ids, *, plan, scale,
                      interpret=False):
    """Pass 1 (METHOD (3c)): ``(lse^r [B, Tp, 1], u [B, Tp, d])`` float32 from padded runway
    arrays ``[B, Tp, d]`` and ``values = w`` (``runway_query`` or ``runway_key``)."""
    batch, padded, width = runway_query.shape
    rows, cols, query_segments, key_segments, row_stats = _specs(plan, width)
    kernel = functools.partial(_runway_statistics_kernel, plan=plan, scale=scale)
    return pl.pallas_call(
        kernel,
        grid=(batch, plan.num_query_blocks, plan.num_key_blocks),
        in_specs=[rows, rows, rows, cols, cols, query_segments, key_segments],
        out_specs=[row_stats, rows],
        out_shape=[jax.ShapeDtypeStruct((batch, padded, 1), jnp.float32),
                   jax.ShapeDtypeStruct((batch, padded, width), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((plan.block_q, 1), jnp.float32),
                        pltpu.VMEM((plan.block_q, 1), jnp.float32),
                        pltpu.VMEM((plan.block_q, width), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEQUENTIAL_KEYS),
        cost_estimate=common.cost_estimate(pl, batch, 0, 0, width,
                                           runway_query.dtype.itemsize, plan_=plan,
                                           statistics_pass=True),
        interpret=interpret,
        name="runway_statistics",
    )(runway_query, runway_key, values, runway_key, values, segment_ids[:, :, None],
      segment_ids[:, None, :])


def _rewired_forward_kernel(query_ref, key_ref, value_ref, runway_query_rows_ref,
                            runway_lse_ref, summary_ref, runway_key_cols_ref, values_cols_ref,
                            query_segments_ref, key_segments_ref, out_ref, lse_ref,
                            max_ref, sum_ref, accumulator_ref, earlier_ref, *, plan, beta, span,
                            scale):
    # Program ids are read here, outside pl.when: the interpreter cannot evaluate them in a branch.
    query_block, key_block = pl.program_id(1), pl.program_id(2)
    heads, groups = query_ref.shape[0], query_ref.shape[0] // key_ref.shape[0]

    @pl.when(key_block == 0)
    def _init():
        for h in range(heads):
            max_ref[h], sum_ref[h], accumulator_ref[h] = common.initial_row_stats(
                plan.block_q, accumulator_ref.shape[-1])
        earlier_ref[...] = jnp.zeros(earlier_ref.shape, jnp.float32)

    @pl.when(key_block <= common.last_key_block(query_block, plan))
    def _step():
        visible, distance = _tile_masks(plan, query_block, key_block, query_segments_ref,
                                        key_segments_ref)
        if beta == 0.0:  # standard attention (invariant 1): no runway work at all
            rho = jnp.zeros(visible.shape, jnp.float32)
        else:
            values_block = values_cols_ref[...].astype(jnp.float32)  # W_J
            keys_block = runway_key_cols_ref[...].astype(jnp.float32)  # Z_J
            probs = None
            if span == "exact":  # the prefix span needs no A in this pass
                logits = common.runway_logits(runway_query_rows_ref[...],
                                              runway_key_cols_ref[...], scale)
                probs = jnp.where(visible, jnp.exp(logits - runway_lse_ref[...]), 0.0)  # A_IJ
            rho = common.runway_coefficients_tile(
                probs, summary_ref[...], earlier_ref[...], values_block, keys_block, visible,
                distance, span=span, scale=scale)
            if span == "exact":
                earlier_ref[...] += common.dot(probs, values_block)  # S_I += A_IJ W_J
        for h in range(heads):  # rho is shared by every head of the block (METHOD (3c))
            logits = common.rewired_logits(query_ref[h], key_ref[h // groups], rho, beta=beta,
                                           scale=scale)
            max_ref[h], sum_ref[h], accumulator_ref[h] = common.online_softmax_step(
                max_ref[h], sum_ref[h], accumulator_ref[h], logits, visible,
                value_ref[h // groups])

    @pl.when(key_block == plan.num_key_blocks - 1)
    def _finish():
        for h in range(heads):
            out, lse = common.finish_softmax(max_ref[h], sum_ref[h], accumulator_ref[h])
            out_ref[h] = out.astype(out_ref.dtype)
            lse_ref[h] = lse


def rewired_forward(query, key, value, runway_query, runway_key, values, runway_lse, summary,
                    segment_ids, *, plan, beta, span, scale, interpret=False):
    """Pass 2 (METHOD (3c)): ``(out [B, H, Tp, d], lse [B, H, Tp, 1])`` from head-major padded
    inputs and pass 1's ``runway_lse`` and ``summary`` (u)."""
    batch, heads, padded, width = query.shape
    kv_heads = key.shape[1]
    rows, cols, query_segments, key_segments, row_stats = _specs(plan, width)
    key_index = _key_block_index(plan)
    query_spec = pl.BlockSpec((None, heads, plan.block_q, width), lambda b, i, j: (b, 0, i, 0))
    kv_spec = pl.BlockSpec((None, kv_heads, plan.block_k, width),
                           lambda b, i, j: (b, 0, key_index(b, i, j), 0))
    head_stats = pl.BlockSpec((None, heads, plan.block_q, 1), lambda b, i, j: (b, 0, i, 0))
    kernel = functools.partial(_rewired_forward_kernel, plan=plan, beta=beta, span=span,
                               scale=scale)
    return pl.pallas_call(
        kernel,
        grid=(batch, plan.num_query_blocks, plan.num_key_blocks),
        in_specs=[query_spec, kv_spec, kv_spec, rows, row_stats, rows, cols, cols,
                  query_segments, key_segments],
        out_specs=[query_spec, head_stats],
        out_shape=[jax.ShapeDtypeStruct(query.shape, query.dtype),
                   jax.ShapeDtypeStruct((batch, heads, padded, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((heads, plan.block_q, 1), jnp.float32),
                        pltpu.VMEM((heads, plan.block_q, 1), jnp.float32),
                        pltpu.VMEM((heads, plan.block_q, width), jnp.float32),
                        pltpu.VMEM((plan.block_q, width), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEQUENTIAL_KEYS),
        cost_estimate=common.cost_estimate(pl, batch, heads, kv_heads, width,
                                           query.dtype.itemsize, plan_=plan, span=span,
                                           runway=beta != 0.0),
        interpret=interpret,
        name="rewired_attention_forward",
    )(query, key, value, runway_query, runway_lse, summary, runway_key, values,
      segment_ids[:, :, None], segment_ids[:, None, :])


def forward(query, key, value, runway_query, runway_key, segment_ids, *, plan, beta, coefficient,
            span, scale, interpret=False):
    """Both passes: ``(out, lse, runway_lse, summary)`` in kernel layout."""
    values = runway_query if coefficient == "bilinear" else runway_key
    if beta == 0.0:  # standard attention (METHOD (6), invariant 1): no runway work at all
        runway_lse = jnp.zeros(runway_query.shape[:2] + (1,), jnp.float32)
        summary = jnp.zeros(runway_query.shape, jnp.float32)
    else:
        runway_lse, summary = runway_statistics(runway_query, runway_key, values, segment_ids,
                                                plan=plan, scale=scale, interpret=interpret)
    out, lse = rewired_forward(query, key, value, runway_query, runway_key, values, runway_lse,
                               summary, segment_ids, plan=plan, beta=beta, span=span, scale=scale,
                               interpret=interpret)
    return out, lse, runway_lse, summary
