"""Pallas Mosaic TPU kernels for rewired attention, METHOD (3c).

Two ``pallas_call``s, each on the grid ``(B, query blocks, key steps)``; the key axis is
``"arbitrary"`` (sequential), so per-row state lives in VMEM scratch across it:

1. :func:`runway_statistics` -- the runway head's flash attention with values w: its log-sum-exp
   ``lse^r`` and ``u_i = (A w)_i - A_ii w_i`` (METHOD eq. (3b)).
2. :func:`rewired_forward` -- one program per (batch row, query block) serves ALL rewired heads:
   for each key block J (ascending) it recomputes ``A_IJ`` from ``lse^r``, forms ``rho_IJ`` once
   (eq. (3b); exact span with the running prefix ``S_I``), and runs the online softmax of every
   head on ``s^h - beta * rho`` (eq. (3)). Rho is made once per tile and reused by the H heads:
   about ``(2H + 5) Bq Bk d`` multiply-adds per tile against ``2H Bq Bk d`` for standard attention.

The backward pass (:func:`backward`, METHOD (3d)) is two more pallas_calls; see its docstring.

The options of METHOD (7): query row r of batch row b sits at position ``offsets[b] + r`` (fewer
queries than keys, per-row ``key_value_seq_lengths``), a scalar-prefetch operand that the index
maps read. Key step s of query block I is key block ``first(I) + s``
(:func:`runway_jax.kernels.tiling.query_block_key_range`): the grid's key axis is only as long as
the most key blocks one query block sees (``plan.key_steps``: all of them for causal attention,
about ``(Bq + w) / Bk`` with a ``local_window_size`` w), so key blocks outside the window are not
even visited; the steps past a block's last needed key block are skipped (``pl.when``) and their
index map is clamped to it, so they are neither computed nor fetched. ``logits_soft_cap`` caps the
logits after every bias (eqs. (7b), (7c)). ``beta`` is a runtime scalar in SMEM, so it may be
traced; ``runway=False`` (``beta`` the Python number 0) leaves the runway head out entirely.

Row statistics are ``[Bq, 1]`` columns. The runway head's products are float32 (METHOD: softmax
statistics and rho in float32); the heads' ``QK^T`` and ``PV`` run in the input dtype with float32
accumulation.

Layouts: see :mod:`runway_jax.kernels.layouts`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from runway_jax.kernels import cost_model, layouts, tile_math, tiling

_SEQUENTIAL_KEYS = ("parallel", "parallel", "arbitrary")
# beta lives in SMEM as a [1, 1] float32 array: a runtime value, traced or not.
_BETA_SPEC = pl.BlockSpec((1, 1), lambda *_: (0, 0), memory_space=pltpu.SMEM)


def _beta_array(beta):
    return jnp.reshape(jnp.asarray(beta, jnp.float32), (1, 1))


def _row_positions(plan, query_block, offset, columns):
    """``[Bq, columns]`` positions of a query block's rows; -1 for padded rows."""
    rows = query_block * plan.block_q + jax.lax.broadcasted_iota(
        jnp.int32, (plan.block_q, columns), 0)
    return jnp.where(rows < plan.query_length, offset + rows, -1)


def _tile_masks(plan, query_block, key_block, offset, query_segments_ref, key_segments_ref):
    shape = (plan.block_q, plan.block_k)
    key_positions = key_block * plan.block_k + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return tile_math.tile_masks(_row_positions(plan, query_block, offset, plan.block_k),
                                key_positions, query_segments_ref[...], key_segments_ref[...],
                                window=plan.window)


def _key_block(plan, query_block, step, offset):
    """``(key block of this step, whether it runs)``; a step that does not run is clamped to a
    block that does (or to 0), so its fetch repeats the previous one."""
    first, last = tiling.query_block_key_range(query_block, offset, plan)
    key_block = first + step
    index = jnp.clip(jnp.minimum(key_block, last), 0, plan.num_key_blocks - 1)
    return index, key_block <= last


def _key_index(plan):
    """Index map of key-side blocks (see :func:`_key_block`)."""
    def index(batch, query_block, step, offsets_ref):
        return _key_block(plan, query_block, step, offsets_ref[batch])[0]
    return index


def _specs(plan, width):
    key_index = _key_index(plan)
    rows = pl.BlockSpec((None, plan.block_q, width), lambda b, i, j, o: (b, i, 0))
    cols = pl.BlockSpec((None, plan.block_k, width),
                        lambda b, i, j, o: (b, key_index(b, i, j, o), 0))
    query_segments = pl.BlockSpec((None, plan.block_q, 1), lambda b, i, j, o: (b, i, 0))
    key_segments = pl.BlockSpec((None, 1, plan.block_k),
                                lambda b, i, j, o: (b, 0, key_index(b, i, j, o)))
    row_stats = pl.BlockSpec((None, plan.block_q, 1), lambda b, i, j, o: (b, i, 0))
    return rows, cols, query_segments, key_segments, row_stats


def _grid_spec(grid, in_specs, out_specs, scratch_shapes):
    """Grid with the per-row offsets ``[B]`` as the scalar-prefetch operand."""
    return pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                        out_specs=out_specs, scratch_shapes=scratch_shapes)


def _runway_statistics_kernel(offsets_ref, runway_query_rows_ref, runway_key_rows_ref,
                              values_rows_ref, runway_key_cols_ref, values_cols_ref,
                              query_segments_ref, key_segments_ref, lse_ref, summary_ref,
                              max_ref, sum_ref, accumulator_ref, *, plan, scale, cap):
    # Program ids are read here, outside pl.when: the interpreter cannot evaluate them in a branch.
    batch, query_block, step = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    offset = offsets_ref[batch]
    key_block, runs = _key_block(plan, query_block, step, offset)

    @pl.when(step == 0)
    def _init():
        max_ref[...], sum_ref[...], accumulator_ref[...] = tile_math.initial_row_stats(
            plan.block_q, accumulator_ref.shape[-1])

    @pl.when(runs)
    def _step():
        visible, _ = _tile_masks(plan, query_block, key_block, offset, query_segments_ref,
                                 key_segments_ref)
        logits = tile_math.runway_logits(runway_query_rows_ref[...], runway_key_cols_ref[...],
                                         scale, cap)
        max_ref[...], sum_ref[...], accumulator_ref[...] = tile_math.online_softmax_step(
            max_ref[...], sum_ref[...], accumulator_ref[...], logits, visible,
            values_cols_ref[...].astype(jnp.float32))

    @pl.when(step == plan.key_steps - 1)
    def _finish():
        weighted, lse = tile_math.finish_softmax(max_ref[...], sum_ref[...], accumulator_ref[...])
        lse_ref[...] = lse
        summary_ref[...] = tile_math.runway_summary(
            weighted, lse, runway_query_rows_ref[...], runway_key_rows_ref[...],
            values_rows_ref[...], scale, cap,
            sees_itself=_row_positions(plan, query_block, offset, 1) >= 0)


def runway_statistics(runway_query_rows, runway_key_rows, values_rows, runway_key, values,
                      query_segments, key_segments, offsets, *, plan, scale, cap=None,
                      interpret=False):
    """Pass 1 (METHOD (3c)): ``(lse^r [B, Tqp, 1], u [B, Tqp, d])`` float32 from the rows' runway
    query, key and w ``[B, Tqp, d]`` and the keys' runway key and w ``[B, Tkp, d]``."""
    batch, padded, width = runway_query_rows.shape
    rows, cols, q_segments, k_segments, row_stats = _specs(plan, width)
    kernel = functools.partial(_runway_statistics_kernel, plan=plan, scale=scale, cap=cap)
    return pl.pallas_call(
        kernel,
        grid_spec=_grid_spec(
            (batch, plan.num_query_blocks, plan.key_steps),
            [rows, rows, rows, cols, cols, q_segments, k_segments], [row_stats, rows],
            [pltpu.VMEM((plan.block_q, 1), jnp.float32),
             pltpu.VMEM((plan.block_q, 1), jnp.float32),
             pltpu.VMEM((plan.block_q, width), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((batch, padded, 1), jnp.float32),
                   jax.ShapeDtypeStruct((batch, padded, width), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEQUENTIAL_KEYS),
        cost_estimate=cost_model.cost_estimate(pl, batch, 0, 0, width,
                                               runway_query_rows.dtype.itemsize, plan_=plan,
                                               statistics_pass=True, soft_cap=cap is not None),
        interpret=interpret,
        name="runway_statistics",
    )(offsets, runway_query_rows, runway_key_rows, values_rows, runway_key, values,
      query_segments[:, :, None], key_segments[:, None, :])


def _rewired_forward_kernel(offsets_ref, beta_ref, query_ref, key_ref, value_ref,
                            runway_query_rows_ref, runway_lse_ref, summary_ref,
                            runway_key_cols_ref, values_cols_ref, query_segments_ref,
                            key_segments_ref, out_ref, lse_ref, max_ref, sum_ref,
                            accumulator_ref, earlier_ref, *, plan, runway, runway_span, scale, cap):
    # Program ids are read here, outside pl.when: the interpreter cannot evaluate them in a branch.
    batch, query_block, step = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    offset, beta = offsets_ref[batch], beta_ref[0, 0]
    key_block, runs = _key_block(plan, query_block, step, offset)
    heads, groups = query_ref.shape[0], query_ref.shape[0] // key_ref.shape[0]

    @pl.when(step == 0)
    def _init():
        for h in range(heads):
            max_ref[h], sum_ref[h], accumulator_ref[h] = tile_math.initial_row_stats(
                plan.block_q, accumulator_ref.shape[-1])
        earlier_ref[...] = jnp.zeros(earlier_ref.shape, jnp.float32)

    @pl.when(runs)
    def _step():
        visible, distance = _tile_masks(plan, query_block, key_block, offset,
                                        query_segments_ref, key_segments_ref)
        rho = None  # standard attention (beta = 0, invariant 1): no runway work at all
        if runway:
            values_block = values_cols_ref[...].astype(jnp.float32)  # W_J
            keys_block = runway_key_cols_ref[...].astype(jnp.float32)  # Z_J
            probs = None
            if runway_span == "exact":  # the prefix span needs no A in this pass
                logits = tile_math.runway_logits(runway_query_rows_ref[...],
                                                 runway_key_cols_ref[...], scale, cap)
                probs = jnp.where(visible, jnp.exp(logits - runway_lse_ref[...]), 0.0)  # A_IJ
            rho = tile_math.runway_coefficients_tile(
                probs, summary_ref[...], earlier_ref[...], values_block, keys_block, visible,
                distance, runway_span=runway_span, scale=scale)
            if runway_span == "exact":
                earlier_ref[...] += tile_math.dot(probs, values_block)  # S_I += A_IJ W_J
        for h in range(heads):  # rho is shared by every head of the block (METHOD (3c))
            logits = tile_math.rewired_logits(query_ref[h], key_ref[h // groups], rho, beta=beta,
                                              scale=scale, cap=cap)
            max_ref[h], sum_ref[h], accumulator_ref[h] = tile_math.online_softmax_step(
                max_ref[h], sum_ref[h], accumulator_ref[h], logits, visible,
                value_ref[h // groups])

    @pl.when(step == plan.key_steps - 1)
    def _finish():
        for h in range(heads):
            out, lse = tile_math.finish_softmax(max_ref[h], sum_ref[h], accumulator_ref[h])
            out_ref[h] = out.astype(out_ref.dtype)
            lse_ref[h] = lse


def rewired_forward(query, key, value, runway_query_rows, runway_key, values, runway_lse,
                    summary, query_segments, key_segments, offsets, beta, *, plan, runway,
                    runway_span, scale, cap=None, interpret=False):
    """Pass 2 (METHOD (3c)): ``(out [B, H, Tqp, d], lse [B, H, Tqp, 1])`` from head-major padded
    inputs and pass 1's ``runway_lse`` and ``summary`` (u)."""
    batch, heads, padded, width = query.shape
    kv_heads = key.shape[1]
    rows, cols, q_segments, k_segments, row_stats = _specs(plan, width)
    key_index = _key_index(plan)
    query_spec = pl.BlockSpec((None, heads, plan.block_q, width),
                              lambda b, i, j, o: (b, 0, i, 0))
    kv_spec = pl.BlockSpec((None, kv_heads, plan.block_k, width),
                           lambda b, i, j, o: (b, 0, key_index(b, i, j, o), 0))
    head_stats = pl.BlockSpec((None, heads, plan.block_q, 1), lambda b, i, j, o: (b, 0, i, 0))
    kernel = functools.partial(_rewired_forward_kernel, plan=plan, runway=runway,
                               runway_span=runway_span, scale=scale, cap=cap)
    return pl.pallas_call(
        kernel,
        grid_spec=_grid_spec(
            (batch, plan.num_query_blocks, plan.key_steps),
            [_BETA_SPEC, query_spec, kv_spec, kv_spec, rows, row_stats, rows, cols, cols,
             q_segments, k_segments],
            [query_spec, head_stats],
            [pltpu.VMEM((heads, plan.block_q, 1), jnp.float32),
             pltpu.VMEM((heads, plan.block_q, 1), jnp.float32),
             pltpu.VMEM((heads, plan.block_q, width), jnp.float32),
             pltpu.VMEM((plan.block_q, width), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(query.shape, query.dtype),
                   jax.ShapeDtypeStruct((batch, heads, padded, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEQUENTIAL_KEYS),
        cost_estimate=cost_model.cost_estimate(pl, batch, heads, kv_heads, width,
                                               query.dtype.itemsize, plan_=plan,
                                               runway_span=runway_span, runway=runway,
                                               soft_cap=cap is not None),
        interpret=interpret,
        name="rewired_attention_forward",
    )(offsets, _beta_array(beta), query, key, value, runway_query_rows, runway_lse, summary,
      runway_key, values, query_segments[:, :, None], key_segments[:, None, :])


def forward(query, key, value, runway_query, runway_key, segment_ids, query_segments,
            runway_query_rows, runway_key_rows, offsets, *, plan, beta, runway_coefficient,
            runway_span, scale, cap=None, runway=None, interpret=False):
    """Both passes on :class:`runway_jax.kernels.layouts.KernelInputs`: ``(out, lse, runway_lse,
    summary)`` in kernel layout. ``runway`` (default: unless ``beta`` is the Python number 0)
    runs the runway head."""
    runway = tiling.runs_runway_head(beta) if runway is None else runway
    values = runway_query if runway_coefficient == "bilinear" else runway_key
    values_rows = runway_query_rows if runway_coefficient == "bilinear" else runway_key_rows
    if not runway:  # standard attention (METHOD (6), invariant 1): no runway work at all
        runway_lse = jnp.zeros(runway_query_rows.shape[:2] + (1,), jnp.float32)
        summary = jnp.zeros(runway_query_rows.shape, jnp.float32)
    else:
        runway_lse, summary = runway_statistics(
            runway_query_rows, runway_key_rows, values_rows, runway_key, values, query_segments,
            segment_ids, offsets, plan=plan, scale=scale, cap=cap, interpret=interpret)
    out, lse = rewired_forward(query, key, value, runway_query_rows, runway_key, values,
                               runway_lse, summary, query_segments, segment_ids, offsets, beta,
                               plan=plan, runway=runway, runway_span=runway_span, scale=scale,
                               cap=cap, interpret=interpret)
    return out, lse, runway_lse, summary


# --------------------------------------------------------------------------------------------
# Backward (METHOD (3d)): pass BQ over query blocks, pass BK over key blocks.
# --------------------------------------------------------------------------------------------


def _heads_backward(query_ref, key_ref, value_ref, out_grad_ref, lse_ref, out_dot_ref, rho,
                    visible, *, beta, scale, cap, groups):
    """``[(P^h, dS~^h)]`` for every head of the tile, reading one head at a time."""
    return [tile_math.head_backward_tile(
        query_ref[h], key_ref[h // groups], value_ref[h // groups], out_grad_ref[h], lse_ref[h],
        out_dot_ref[h], rho, visible, beta=beta, scale=scale, cap=cap)
        for h in range(query_ref.shape[0])]


def _backward_query_kernel(offsets_ref, beta_ref, query_ref, key_ref, value_ref, out_grad_ref,
                           lse_ref, out_dot_ref, runway_query_rows_ref, runway_lse_ref,
                           summary_ref, runway_key_cols_ref, values_cols_ref, query_segments_ref,
                           key_segments_ref, dq_ref, rho_dot_ref, summary_grad_ref,
                           dq_acc, earlier_acc, rho_dot_acc, summary_grad_acc, *, plan, runway,
                           runway_span, scale, cap):
    batch, query_block, step = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    offset, beta = offsets_ref[batch], beta_ref[0, 0]  # read outside pl.when, see above
    key_block, runs = _key_block(plan, query_block, step, offset)
    groups = query_ref.shape[0] // key_ref.shape[0]

    @pl.when(step == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)
        earlier_acc[...] = jnp.zeros(earlier_acc.shape, jnp.float32)
        rho_dot_acc[...] = jnp.zeros(rho_dot_acc.shape, jnp.float32)
        summary_grad_acc[...] = jnp.zeros(summary_grad_acc.shape, jnp.float32)

    @pl.when(runs)
    def _step():
        visible, distance = _tile_masks(plan, query_block, key_block, offset,
                                        query_segments_ref, key_segments_ref)
        rho = None
        if runway:
            probs, rho, values_block, keys_block, _ = tile_math.runway_tile_recompute(
                visible, distance, runway_query_rows_ref[...], runway_lse_ref[...],
                runway_key_cols_ref[...], values_cols_ref[...], summary_ref[...],
                earlier_acc[...], runway_span=runway_span, scale=scale, cap=cap)
        head_tiles = _heads_backward(query_ref, key_ref, value_ref, out_grad_ref, lse_ref,
                                     out_dot_ref, rho, visible, beta=beta, scale=scale, cap=cap,
                                     groups=groups)
        for h, (_, ds) in enumerate(head_tiles):
            dq_acc[h] += scale * tile_math.dot(ds.astype(key_ref.dtype), key_ref[h // groups])
        if runway:
            # sum_j rho_ij sum_h dS~^h_ij: delta_i = sum_k A_ik dA_ik = sum_j d rho_ij rho_ij is
            # -beta times it (both spans; rho is zero where undefined), d beta = -sum_i of it.
            rho_dot_acc[...] += jnp.sum(rho * sum(ds for _, ds in head_tiles), axis=1,
                                        keepdims=True)
            if runway_span == "prefix":
                drho = tile_math.defined_drho(head_tiles, visible, distance,
                                              runway_span=runway_span, beta=beta)
                summary_grad_acc[...] += scale * tile_math.dot(drho, keys_block)  # du_I
            else:
                earlier_acc[...] += tile_math.dot(probs, values_block)

    @pl.when(step == plan.key_steps - 1)
    def _finish():
        dq_ref[...] = dq_acc[...]
        rho_dot_ref[...] = rho_dot_acc[...]
        summary_grad_ref[...] = summary_grad_acc[...]


def _backward_key_kernel(offsets_ref, beta_ref, query_ref, out_grad_ref, lse_ref, out_dot_ref,
                         runway_query_rows_ref, runway_lse_ref, summary_ref, delta_ref,
                         summary_grad_ref, key_ref, value_ref, runway_key_cols_ref,
                         values_cols_ref, query_segments_ref, key_segments_ref, dk_ref, dv_ref,
                         d_runway_key_ref, dz_ref, dw_ref, d_runway_query_ref, dk_acc, dv_acc,
                         d_runway_key_acc, dz_acc, dw_acc, earlier_all, prefix_all, *, plan,
                         runway, runway_span, scale, cap):
    # Program ids are read here, outside pl.when: the interpreter cannot evaluate them in a branch.
    batch, key_block, step = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    offset, beta = offsets_ref[batch], beta_ref[0, 0]
    query_block, runs = _query_block(plan, key_block, step, offset)
    groups = query_ref.shape[0] // key_ref.shape[0]
    rows = pl.ds(pl.multiple_of(query_block * plan.block_q, plan.block_q), plan.block_q)

    @pl.when((key_block == 0) & (step == 0))
    def _init_row():  # once per batch row: the row prefixes and the resident dq^r
        earlier_all[...] = jnp.zeros(earlier_all.shape, jnp.float32)
        prefix_all[...] = jnp.zeros(prefix_all.shape, jnp.float32)
        d_runway_query_ref[...] = jnp.zeros(d_runway_query_ref.shape, jnp.float32)

    @pl.when(step == 0)
    def _init_block():
        for acc in (dk_acc, dv_acc, d_runway_key_acc, dz_acc, dw_acc):
            acc[...] = jnp.zeros(acc.shape, jnp.float32)

    @pl.when(runs)
    def _step():
        visible, distance = _tile_masks(plan, query_block, key_block, offset,
                                        query_segments_ref, key_segments_ref)
        rho = None
        if runway:
            probs, rho, values_block, keys_block, slope = tile_math.runway_tile_recompute(
                visible, distance, runway_query_rows_ref[...], runway_lse_ref[...],
                runway_key_cols_ref[...], values_cols_ref[...], summary_ref[...],
                earlier_all[rows], runway_span=runway_span, scale=scale, cap=cap)
        head_tiles = _heads_backward(query_ref, key_ref, value_ref, out_grad_ref, lse_ref,
                                     out_dot_ref, rho, visible, beta=beta, scale=scale, cap=cap,
                                     groups=groups)
        for h, (probs_h, ds) in enumerate(head_tiles):
            dk_acc[h // groups] += scale * tile_math.dot(ds.T.astype(query_ref.dtype), query_ref[h])
            dv_acc[h // groups] += tile_math.dot(probs_h.T.astype(out_grad_ref.dtype),
                                                 out_grad_ref[h])
        if runway:
            drho = tile_math.defined_drho(head_tiles, visible, distance, runway_span=runway_span,
                                          beta=beta)
            dprobs, dz, dw = tile_math.runway_backward_tile(
                probs, drho, distance, values_block, keys_block, runway_span=runway_span,
                scale=scale, prefix_sum=prefix_all[rows], summary_grad=summary_grad_ref[...],
                earlier=earlier_all[rows], summary=summary_ref[...])
            dlogits = probs * (dprobs - delta_ref[...])  # the runway head's softmax backward
            if slope is not None:
                dlogits = dlogits * slope  # through the soft cap, eq. (7b)
            d_runway_query_ref[rows] += scale * tile_math.dot(dlogits, keys_block)
            d_runway_key_acc[...] += scale * tile_math.dot(
                dlogits.T, runway_query_rows_ref[...].astype(jnp.float32))
            dz_acc[...] += dz
            dw_acc[...] += dw
            if runway_span == "exact":  # advance the row prefixes past key block J
                earlier_all[rows] += tile_math.dot(probs, values_block)
                prefix_all[rows] += tile_math.dot(drho, keys_block)

    @pl.when(step == plan.query_steps - 1)
    def _finish():
        dk_ref[...], dv_ref[...] = dk_acc[...], dv_acc[...]
        d_runway_key_ref[...], dz_ref[...], dw_ref[...] = (
            d_runway_key_acc[...], dz_acc[...], dw_acc[...])


def _query_block(plan, key_block, step, offset):
    """``(query block of this step of key block J, whether it runs)``: the query blocks that see
    J (:func:`runway_jax.kernels.tiling.key_block_query_range`), clamped like
    :func:`_key_block`."""
    first, last = tiling.key_block_query_range(key_block, offset, plan)
    query_block = first + step
    index = jnp.clip(jnp.minimum(query_block, last), 0, plan.num_query_blocks - 1)
    return index, query_block <= last


def backward(query, key, value, runway_query, runway_key, segment_ids, query_segments,
             runway_query_rows, runway_key_rows, offsets, out, lse, runway_lse, summary,
             out_grad, *, plan, beta, runway_coefficient, runway_span, scale, cap=None, runway=None,
             interpret=False):
    """METHOD (3d) in two pallas_calls; float32 ``(dq, dk, dv, d runway_query, d runway_key,
    d beta)``, the first five in kernel layout (the runway gradients on the key side, ``[B, Tkp,
    d]``).

    BQ, grid ``(B, query blocks, key steps)``: the heads' ``dq``, ``sum_j rho_ij sum_h dS~^h_ij``
    (which gives ``delta_i = sum_j d rho_ij rho_ij = sum_k A_ik dA_ik`` and ``d beta``) and
    (prefix span) ``du``. BK, grid ``(B, key blocks, query steps)``, both block axes sequential:
    ``dk``, ``dv`` and the runway gradients; step s of key block J is the s-th query block that
    sees J. BK keeps, for every row of the batch row, the exact span's prefixes ``S_i`` and
    ``R_i`` (before the current key block) and the runway head's ``dq^r`` in VMEM (``3 Tqp d``
    float32: 6 MiB at T = 4096, d = 128), so that each tile sees the row prefixes of the key
    blocks before it without a ``T x T`` array.
    """
    runway = tiling.runs_runway_head(beta) if runway is None else runway
    batch, heads, padded, width = query.shape
    kv_heads = key.shape[1]
    f32 = jnp.float32
    values = runway_query if runway_coefficient == "bilinear" else runway_key
    out_dot = jnp.sum(out_grad.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    q_segments, k_segments = query_segments[:, :, None], segment_ids[:, None, :]
    bq, bk = plan.block_q, plan.block_k
    options = dict(plan=plan, runway=runway, runway_span=runway_span, scale=scale, cap=cap)
    beta_array = _beta_array(beta)
    estimate = functools.partial(cost_model.backward_pass_estimate, pl, batch, heads, kv_heads,
                                 width, query.dtype.itemsize, plan_=plan, runway_span=runway_span,
                                 runway=runway, soft_cap=cap is not None)

    # Pass BQ.
    key_index = _key_index(plan)
    q_heads = pl.BlockSpec((None, heads, bq, width), lambda b, i, j, o: (b, 0, i, 0))
    q_stats = pl.BlockSpec((None, heads, bq, 1), lambda b, i, j, o: (b, 0, i, 0))
    kv = pl.BlockSpec((None, kv_heads, bk, width),
                      lambda b, i, j, o: (b, 0, key_index(b, i, j, o), 0))
    rows, cols, q_seg, k_seg, row_stats = _specs(plan, width)
    dq, rho_dot, summary_grad = pl.pallas_call(
        functools.partial(_backward_query_kernel, **options),
        grid_spec=_grid_spec(
            (batch, plan.num_query_blocks, plan.key_steps),
            [_BETA_SPEC, q_heads, kv, kv, q_heads, q_stats, q_stats, rows, row_stats, rows, cols,
             cols, q_seg, k_seg],
            [q_heads, row_stats, rows],
            [pltpu.VMEM((heads, bq, width), f32), pltpu.VMEM((bq, width), f32),
             pltpu.VMEM((bq, 1), f32), pltpu.VMEM((bq, width), f32)]),
        out_shape=[jax.ShapeDtypeStruct(query.shape, f32),
                   jax.ShapeDtypeStruct((batch, padded, 1), f32),
                   jax.ShapeDtypeStruct((batch, padded, width), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEQUENTIAL_KEYS),
        cost_estimate=estimate(key_pass=False),
        interpret=interpret,
        name="rewired_attention_backward_queries",
    )(offsets, beta_array, query, key, value, out_grad, lse, out_dot, runway_query_rows,
      runway_lse, summary, runway_key, values, q_segments, k_segments)
    delta = -beta_array[0, 0] * rho_dot  # sum_j d rho_ij rho_ij

    # Pass BK: grid (b, key block j, query step i); query-side blocks clamped to those that
    # see key block j.
    def query_index(b, j, i, o):
        return _query_block(plan, j, i, o[b])[0]

    qh = pl.BlockSpec((None, heads, bq, width),
                      lambda b, j, i, o: (b, 0, query_index(b, j, i, o), 0))
    qs = pl.BlockSpec((None, heads, bq, 1), lambda b, j, i, o: (b, 0, query_index(b, j, i, o), 0))
    r_rows = pl.BlockSpec((None, bq, width), lambda b, j, i, o: (b, query_index(b, j, i, o), 0))
    r_stats = pl.BlockSpec((None, bq, 1), lambda b, j, i, o: (b, query_index(b, j, i, o), 0))
    kvb = pl.BlockSpec((None, kv_heads, bk, width), lambda b, j, i, o: (b, 0, j, 0))
    r_cols = pl.BlockSpec((None, bk, width), lambda b, j, i, o: (b, j, 0))
    qseg = pl.BlockSpec((None, bq, 1), lambda b, j, i, o: (b, query_index(b, j, i, o), 0))
    kseg = pl.BlockSpec((None, 1, bk), lambda b, j, i, o: (b, 0, j))
    whole_rows = pl.BlockSpec((None, padded, width), lambda b, j, i, o: (b, 0, 0))
    # VMEM: the row-resident S, R and dq^r (dq^r double-buffered as an output), double-buffered
    # q/dO and k/v blocks, dk/dv output blocks and their float32 accumulators, plus headroom.
    # Above the default scoped limit (16 MiB) the limit is raised: about 26 MiB at T = 4096,
    # H = 16, d = 128 and 50 MiB at T = 16384 (within v5e/v5p/v6e VMEM; v4's 32 MiB caps T).
    itemsize = query.dtype.itemsize
    resident = 4 * padded * width * 4
    blocks = (2 * 2 * (heads * bq + kv_heads * bk) * width * itemsize
              + 3 * 2 * kv_heads * bk * width * 4)
    vmem = resident + blocks + (8 << 20)
    params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "arbitrary", "arbitrary"),
        vmem_limit_bytes=vmem if vmem > (16 << 20) else None)
    dk, dv, d_runway_key, dz, dw, d_runway_query_rows = pl.pallas_call(
        functools.partial(_backward_key_kernel, **options),
        grid_spec=_grid_spec(
            (batch, plan.num_key_blocks, plan.query_steps),
            [_BETA_SPEC, qh, qh, qs, qs, r_rows, r_stats, r_rows, r_stats, r_rows, kvb, kvb,
             r_cols, r_cols, qseg, kseg],
            [kvb, kvb, r_cols, r_cols, r_cols, whole_rows],
            [pltpu.VMEM((kv_heads, bk, width), f32), pltpu.VMEM((kv_heads, bk, width), f32)]
            + [pltpu.VMEM((bk, width), f32)] * 3 + [pltpu.VMEM((padded, width), f32)] * 2),
        out_shape=[jax.ShapeDtypeStruct(key.shape, f32), jax.ShapeDtypeStruct(value.shape, f32)]
        + [jax.ShapeDtypeStruct(runway_key.shape, f32)] * 3
        + [jax.ShapeDtypeStruct((batch, padded, width), f32)],
        compiler_params=params,
        cost_estimate=estimate(key_pass=True),
        interpret=interpret,
        name="rewired_attention_backward_keys",
    )(offsets, beta_array, query, out_grad, lse, out_dot, runway_query_rows, runway_lse, summary,
      delta, summary_grad, key, value, runway_key, values, q_segments, k_segments)
    return layouts.runway_gradients(dq, dk, dv, d_runway_query_rows, d_runway_key, dz, dw,
                                    rho_dot, offsets, plan=plan,
                                    runway_coefficient=runway_coefficient)
