"""Pallas GPU kernels for rewired attention (Triton lowering), METHOD (3c).

Backend choice. JAX 0.10.2 offers two Pallas GPU backends: Mosaic GPU (the default for
``pallas_call`` on CUDA; Hopper/Blackwell only, warpgroup-level programming with explicit TMA,
barriers and WGMMA pipelines) and the Triton lowering (selected by passing
``jax.experimental.pallas.triton.CompilerParams``; any CUDA GPU from Ampere on, and ROCm). We use
the Triton lowering: the same block-level program as the TPU kernel (tiles, ``fori_loop`` over key
blocks, per-row statistics in registers) runs on A100 and H100 alike, runs in interpret mode for
the CPU tests like the TPU kernel, and Triton schedules the tensor-core pipeline itself. Mosaic
GPU is the way to the last factor of speed on H100 (warp-specialized producer/consumer, WGMMA
with the accumulators in registers across the head loop) once a Hopper machine is available to
tune on; it would be a third file beside this one. JAX >= 0.11 deprecates the Triton lowering
and warns (a DeprecationWarning attributed to ``jax._src.pallas``) each time it lowers one of
these ``pallas_call``s, which happens inside the caller's ``jit``, out of reach of a
``catch_warnings`` here; the kernels keep working while JAX has the backend, and porting them to
Mosaic GPU is a follow-up issue. Without a GPU, jax >= 0.11 lowers them for the
``jax.sharding.AbstractDevice`` of the current abstract mesh (see tests/test_kernels.py).

Two ``pallas_call``s:

1. :func:`runway_statistics` -- grid ``(B, query blocks)``; the runway head's ``lse^r`` and
   ``u_i = (A w)_i - A_ii w_i`` (METHOD eq. (3b)).
2. :func:`rewired_forward` -- grid ``(B, query blocks, head groups)``; each program walks the key
   blocks its rows see in a ``fori_loop``, forms ``rho_IJ`` once and runs the online softmax of
   ``heads_per_program`` heads on ``s^h - beta * rho``. Unlike the TPU kernel, a Triton program
   keeps its accumulators in registers, so it cannot serve all 16 heads at d = 128; a group of G'
   heads costs about ``(2 G' + 5) Bq Bk d`` per tile (rho amortized over G' heads). At the
   defaults (G' = 2) a 16-head layer runs 8 groups, about 2.3x the FLOPs of standard attention
   (``python benchmarks/kernels.py`` prints the estimate) against 1.16x for the TPU kernel, which
   serves all heads in one program. Closing that gap needs more heads per program (G' = 4 at
   ``Bq = 64, d = 128`` holds 128 KiB of float32 accumulators, half an SM's register file: 1.6x)
   or a Mosaic GPU kernel; both need a GPU to tune on.

Backward (:func:`backward`, METHOD (3d)): two more passes on the same grid, query-major because
the exact span's row prefixes ``S_i`` and ``R_i`` only exist in that order: GQ gives ``dq`` and the
row terms ``delta``, ``du``; GK adds ``dk``, ``dv`` and the runway head's key-indexed gradients with
float32 atomic adds (the TPU kernel, whose grid runs sequentially, keeps them in VMEM instead).

The options of METHOD (7): every program reads its rows' positions (``[Bq]`` int32, -1 for
padding; fewer queries than keys and per-row ``key_value_seq_lengths`` move them) and loops only
over the key blocks from the first that its rows' ``local_window_size`` reaches to the last at or
below its diagonal (:func:`runway_jax.kernels.tiling.key_block_range`): blocks outside the window
are skipped, not masked. ``logits_soft_cap`` caps the logits after every bias (eqs. (7b), (7c));
``beta`` is a runtime ``[1]`` float32 operand, so it may be traced.

Layouts: see :mod:`runway_jax.kernels.layouts`. Every loaded tile has power-of-two sides (Triton's
requirement): ``Bq``, ``Bk`` and ``d`` must be powers of two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from runway_jax.kernels import cost_model, layouts, tile_math, tiling


def heads_per_program(heads, block_sizes: tiling.BlockSizes) -> int:
    """Rewired heads one program serves: ``block_sizes.heads_per_program`` (all when ``None``),
    at most ``heads``. When it does not divide ``heads`` the kernels add zero heads up to a
    multiple (see :func:`pad_heads`): 15 rewired heads (a 16-head layer) in groups of 2 run as
    16, which costs one head's ``QK^T`` and ``PV`` but keeps rho shared by two heads
    (``(2 G' + 5) / 2 G'``); groups of 1 would re-form rho for every head (``3.5x``)."""
    wanted = heads if block_sizes.heads_per_program is None else block_sizes.heads_per_program
    return min(wanted, heads)


def pad_heads(x, multiple, value=0.0):
    """``[B, H, ...] -> [B, H', ...]`` with ``H'`` the next multiple of ``multiple``; the padded
    heads hold ``value``."""
    extra = -x.shape[1] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _kv_head(head_group, group_heads, h, groups, kv_heads):
    """Key/value head of head ``h`` of a group; padded heads (beyond the real ones) borrow the
    last key/value head (their queries and output gradients are zero)."""
    return jnp.minimum((head_group * group_heads + h) // groups, kv_heads - 1)


def _check_width(width):
    if width & (width - 1):
        raise ValueError(
            f"rewired_attention: head width d={width} must be a power of two for "
            "implementation='pallas_gpu' (Triton tiles); use implementation='xla'.")


def _rows_range(plan, positions):
    """``(first, last)`` key blocks of a query block whose rows sit at ``positions`` ``[Bq]``
    (-1 for padded rows): :func:`runway_jax.kernels.tiling.key_block_range` of its real rows."""
    last_position = jnp.max(positions)
    first_position = jnp.min(jnp.where(positions >= 0, positions, plan.padded_key_length))
    return tiling.key_block_range(first_position, last_position, plan)


def _tile_masks(plan, query_positions, key_block, query_segments, key_segments_ref):
    key_positions = key_block * plan.block_k + jnp.arange(plan.block_k)[None, :]
    key_segments = key_segments_ref[pl.ds(key_block * plan.block_k, plan.block_k)][None, :]
    return tile_math.tile_masks(query_positions, key_positions, query_segments, key_segments,
                                window=plan.window)


def _compiler_params(block_sizes):
    return pltriton.CompilerParams(num_warps=block_sizes.num_warps,
                                   num_stages=block_sizes.num_stages)


def _runway_statistics_kernel(runway_query_rows_ref, runway_key_rows_ref, values_rows_ref,
                              runway_key_ref, values_ref, positions_ref, query_segments_ref,
                              key_segments_ref, lse_ref, summary_ref, *, plan, scale, cap):
    runway_query_rows = runway_query_rows_ref[...]
    positions = positions_ref[...]
    query_positions, query_segments = positions[:, None], query_segments_ref[...][:, None]

    def step(key_block, stats):
        cols = pl.ds(key_block * plan.block_k, plan.block_k)
        visible, _ = _tile_masks(plan, query_positions, key_block, query_segments,
                                 key_segments_ref)
        logits = tile_math.runway_logits(runway_query_rows, runway_key_ref[cols, :], scale, cap)
        return tile_math.online_softmax_step(*stats, logits, visible,
                                             values_ref[cols, :].astype(jnp.float32))

    first, last = _rows_range(plan, positions)
    stats = jax.lax.fori_loop(first, last + 1, step,
                              tile_math.initial_row_stats(plan.block_q, values_ref.shape[-1]))
    weighted, lse = tile_math.finish_softmax(*stats)
    lse_ref[...] = lse
    summary_ref[...] = tile_math.runway_summary(weighted, lse, runway_query_rows,
                                                runway_key_rows_ref[...], values_rows_ref[...],
                                                scale, cap, sees_itself=query_positions >= 0)


def _row_specs(plan, width, grid_rank):
    """Specs of row blocks (``[Bq, d]``, ``[Bq, 1]``, ``[Bq]``) and whole key-side arrays for a
    grid ``(B, query blocks)`` or ``(B, query blocks, head groups)``."""
    if grid_rank == 2:
        index = lambda f: (lambda b, i: f(b, i))
    else:
        index = lambda f: (lambda b, i, g: f(b, i))
    return dict(
        rows=pl.BlockSpec((None, plan.block_q, width), index(lambda b, i: (b, i, 0))),
        row_stats=pl.BlockSpec((None, plan.block_q, 1), index(lambda b, i: (b, i, 0))),
        row_ids=pl.BlockSpec((None, plan.block_q), index(lambda b, i: (b, i))),
        keys=pl.BlockSpec((None, plan.padded_key_length, width), index(lambda b, i: (b, 0, 0))),
        key_ids=pl.BlockSpec((None, plan.padded_key_length), index(lambda b, i: (b, 0))),
        beta=pl.BlockSpec((1,), index(lambda b, i: (0,))))


def runway_statistics(runway_query_rows, runway_key_rows, values_rows, runway_key, values,
                      positions, query_segments, key_segments, *, plan, scale, cap=None,
                      block_sizes, interpret=False):
    """Pass 1 (METHOD (3c)): ``(lse^r [B, Tqp, 1], u [B, Tqp, d])`` float32."""
    batch, padded, width = runway_query_rows.shape
    _check_width(width)
    specs = _row_specs(plan, width, 2)
    return pl.pallas_call(
        functools.partial(_runway_statistics_kernel, plan=plan, scale=scale, cap=cap),
        grid=(batch, plan.num_query_blocks),
        in_specs=[specs["rows"]] * 3 + [specs["keys"]] * 2
        + [specs["row_ids"], specs["row_ids"], specs["key_ids"]],
        out_specs=[specs["row_stats"], specs["rows"]],
        out_shape=[jax.ShapeDtypeStruct((batch, padded, 1), jnp.float32),
                   jax.ShapeDtypeStruct((batch, padded, width), jnp.float32)],
        compiler_params=_compiler_params(block_sizes),
        cost_estimate=cost_model.cost_estimate(pl, batch, 0, 0, width,
                                               runway_query_rows.dtype.itemsize, plan_=plan,
                                               statistics_pass=True, soft_cap=cap is not None),
        interpret=interpret,
        name="runway_statistics",
    )(runway_query_rows, runway_key_rows, values_rows, runway_key, values, positions,
      query_segments, key_segments)


def _rewired_forward_kernel(query_ref, key_ref, value_ref, runway_query_rows_ref, runway_key_ref,
                            values_ref, runway_lse_ref, summary_ref, positions_ref,
                            query_segments_ref, key_segments_ref, beta_ref, out_ref, lse_ref, *,
                            plan, runway, runway_span, scale, cap, groups):
    head_group = pl.program_id(2)
    group_heads, width = query_ref.shape[0], query_ref.shape[-1]
    positions = positions_ref[...]
    query_positions, query_segments = positions[:, None], query_segments_ref[...][:, None]
    runway_query_rows = runway_query_rows_ref[...]
    runway_lse, summary, beta = runway_lse_ref[...], summary_ref[...], beta_ref[0]
    queries = [query_ref[h] for h in range(group_heads)]  # stay in registers / shared memory
    kv_heads = [_kv_head(head_group, group_heads, h, groups, key_ref.shape[0])
                for h in range(group_heads)]

    def step(key_block, carry):
        earlier, stats = carry
        cols = pl.ds(key_block * plan.block_k, plan.block_k)
        visible, distance = _tile_masks(plan, query_positions, key_block, query_segments,
                                        key_segments_ref)
        rho = None  # standard attention (beta = 0, invariant 1): no runway work at all
        if runway:
            values_block = values_ref[cols, :].astype(jnp.float32)  # W_J
            keys_block = runway_key_ref[cols, :].astype(jnp.float32)  # Z_J
            probs = None
            if runway_span == "exact":  # the prefix span needs no A in this pass
                logits = tile_math.runway_logits(runway_query_rows, runway_key_ref[cols, :], scale,
                                                 cap)
                probs = jnp.where(visible, jnp.exp(logits - runway_lse), 0.0)  # A_IJ
            rho = tile_math.runway_coefficients_tile(probs, summary, earlier, values_block,
                                                     keys_block, visible, distance,
                                                     runway_span=runway_span, scale=scale)
            if runway_span == "exact":
                earlier = earlier + tile_math.dot(probs, values_block)  # S_I += A_IJ W_J
        new_stats = []
        for h in range(group_heads):  # rho is shared by the heads of the group (METHOD (3c))
            logits = tile_math.rewired_logits(queries[h], key_ref[kv_heads[h], cols, :], rho,
                                              beta=beta, scale=scale, cap=cap)
            new_stats.append(tile_math.online_softmax_step(*stats[h], logits, visible,
                                                           value_ref[kv_heads[h], cols, :]))
        return earlier, tuple(new_stats)

    initial = (jnp.zeros((plan.block_q, width), jnp.float32),
               tuple(tile_math.initial_row_stats(plan.block_q, width) for _ in range(group_heads)))
    first, last = _rows_range(plan, positions)
    _, stats = jax.lax.fori_loop(first, last + 1, step, initial)
    for h in range(group_heads):
        out, lse = tile_math.finish_softmax(*stats[h])
        out_ref[h] = out.astype(out_ref.dtype)
        lse_ref[h] = lse


def rewired_forward(query, key, value, runway_query_rows, runway_key, values, runway_lse, summary,
                    positions, query_segments, key_segments, beta, *, plan, runway, runway_span,
                    scale, cap=None, block_sizes, interpret=False):
    """Pass 2 (METHOD (3c)): ``(out [B, H, Tqp, d], lse [B, H, Tqp, 1])``."""
    real_heads, kv_heads = query.shape[1], key.shape[1]
    _check_width(query.shape[-1])
    group_heads = heads_per_program(real_heads, block_sizes)
    query = pad_heads(query, group_heads)
    batch, heads, padded, width = query.shape
    specs = _row_specs(plan, width, 3)
    query_spec = pl.BlockSpec((None, group_heads, plan.block_q, width),
                              lambda b, i, g: (b, g, i, 0))
    kv_spec = pl.BlockSpec((None, kv_heads, plan.padded_key_length, width),
                           lambda b, i, g: (b, 0, 0, 0))
    kernel = functools.partial(_rewired_forward_kernel, plan=plan, runway=runway,
                               runway_span=runway_span, scale=scale, cap=cap,
                               groups=real_heads // kv_heads)
    out, lse = pl.pallas_call(
        kernel,
        grid=(batch, plan.num_query_blocks, heads // group_heads),
        in_specs=[query_spec, kv_spec, kv_spec, specs["rows"], specs["keys"], specs["keys"],
                  specs["row_stats"], specs["rows"], specs["row_ids"], specs["row_ids"],
                  specs["key_ids"], specs["beta"]],
        out_specs=[query_spec,
                   pl.BlockSpec((None, group_heads, plan.block_q, 1),
                                lambda b, i, g: (b, g, i, 0))],
        out_shape=[jax.ShapeDtypeStruct(query.shape, query.dtype),
                   jax.ShapeDtypeStruct((batch, heads, padded, 1), jnp.float32)],
        compiler_params=_compiler_params(block_sizes),
        cost_estimate=cost_model.cost_estimate(pl, batch, heads, kv_heads, width,
                                               query.dtype.itemsize, plan_=plan,
                                               runway_span=runway_span, runway=runway,
                                               head_groups=heads // group_heads,
                                               soft_cap=cap is not None),
        interpret=interpret,
        name="rewired_attention_forward",
    )(query, key, value, runway_query_rows, runway_key, values, runway_lse, summary, positions,
      query_segments, key_segments, _beta_array(beta))
    return out[:, :real_heads], lse[:, :real_heads]


def _beta_array(beta):
    return jnp.reshape(jnp.asarray(beta, jnp.float32), (1,))


def forward(query, key, value, runway_query, runway_key, segment_ids, query_segments,
            runway_query_rows, runway_key_rows, offsets, *, plan, beta, runway_coefficient,
            runway_span, scale, cap=None, runway=None, block_sizes, interpret=False):
    """Both passes on :class:`runway_jax.kernels.layouts.KernelInputs`: ``(out, lse, runway_lse,
    summary)`` in kernel layout. ``runway`` (default: unless ``beta`` is the Python number 0)
    runs the runway head."""
    runway = tiling.runs_runway_head(beta) if runway is None else runway
    values = runway_query if runway_coefficient == "bilinear" else runway_key
    values_rows = runway_query_rows if runway_coefficient == "bilinear" else runway_key_rows
    positions = layouts.row_positions(offsets, plan)
    if not runway:  # standard attention (METHOD (6), invariant 1): no runway work at all
        runway_lse = jnp.zeros(runway_query_rows.shape[:2] + (1,), jnp.float32)
        summary = jnp.zeros(runway_query_rows.shape, jnp.float32)
    else:
        runway_lse, summary = runway_statistics(
            runway_query_rows, runway_key_rows, values_rows, runway_key, values, positions,
            query_segments, segment_ids, plan=plan, scale=scale, cap=cap,
            block_sizes=block_sizes, interpret=interpret)
    out, lse = rewired_forward(query, key, value, runway_query_rows, runway_key, values,
                               runway_lse, summary, positions, query_segments, segment_ids, beta,
                               plan=plan, runway=runway, runway_span=runway_span, scale=scale,
                               cap=cap, block_sizes=block_sizes, interpret=interpret)
    return out, lse, runway_lse, summary


# --------------------------------------------------------------------------------------------
# Backward (METHOD (3d)): two query-major passes; key-indexed gradients by atomic adds.
# --------------------------------------------------------------------------------------------


def _backward_tile(plan, key_block, cols, head_group, group_heads, groups, refs, rows_data,
                   earlier, *, runway, beta, runway_span, scale, cap):
    """The per-tile recomputation both backward passes share: masks, ``A_IJ``, ``rho_IJ`` and
    every head's ``(P, dS~)``; returns them with ``d rho`` of this head group and the runway
    logits' soft-cap slope."""
    (query_ref, key_ref, value_ref, out_grad_ref, lse_ref, out_dot_ref, runway_key_ref,
     values_ref, key_segments_ref) = refs
    runway_query_rows, runway_lse, summary, query_positions, query_segments = rows_data
    visible, distance = _tile_masks(plan, query_positions, key_block, query_segments,
                                    key_segments_ref)
    probs = values_block = keys_block = slope = rho = None
    if runway:
        probs, rho, values_block, keys_block, slope = tile_math.runway_tile_recompute(
            visible, distance, runway_query_rows, runway_lse, runway_key_ref[cols, :],
            values_ref[cols, :], summary, earlier, runway_span=runway_span, scale=scale, cap=cap)
    head_tiles = []
    for h in range(group_heads):
        kv_head = _kv_head(head_group, group_heads, h, groups, key_ref.shape[0])
        head_tiles.append(tile_math.head_backward_tile(
            query_ref[h], key_ref[kv_head, cols, :], value_ref[kv_head, cols, :],
            out_grad_ref[h], lse_ref[h], out_dot_ref[h], rho, visible, beta=beta, scale=scale,
            cap=cap))
    drho = tile_math.defined_drho(head_tiles, visible, distance, runway_span=runway_span,
                                  beta=beta)
    return distance, probs, rho, values_block, keys_block, head_tiles, drho, slope


def _backward_query_kernel(query_ref, key_ref, value_ref, out_grad_ref, lse_ref, out_dot_ref,
                           runway_query_rows_ref, runway_key_ref, values_ref, runway_lse_ref,
                           summary_ref, positions_ref, query_segments_ref, key_segments_ref,
                           beta_ref, dq_ref, rho_dot_ref, summary_grad_ref, *, plan, runway,
                           runway_span, scale, cap, groups):
    """Pass GQ: the group's ``dq``, and its part of ``sum_j rho_ij sum_h dS~^h_ij`` and (prefix)
    ``du``."""
    head_group = pl.program_id(2)
    group_heads, width = query_ref.shape[0], query_ref.shape[-1]
    positions, beta = positions_ref[...], beta_ref[0]
    rows_data = (runway_query_rows_ref[...], runway_lse_ref[...], summary_ref[...],
                 positions[:, None], query_segments_ref[...][:, None])
    refs = (query_ref, key_ref, value_ref, out_grad_ref, lse_ref, out_dot_ref, runway_key_ref,
            values_ref, key_segments_ref)

    def step(key_block, carry):
        dq, earlier, rho_dot, summary_grad = carry
        cols = pl.ds(key_block * plan.block_k, plan.block_k)
        _, probs, rho, values_block, keys_block, head_tiles, drho, _ = _backward_tile(
            plan, key_block, cols, head_group, group_heads, groups, refs, rows_data, earlier,
            runway=runway, beta=beta, runway_span=runway_span, scale=scale, cap=cap)
        dq = tuple(dq[h] + scale * tile_math.dot(
            ds.astype(key_ref.dtype),
            key_ref[_kv_head(head_group, group_heads, h, groups, key_ref.shape[0]), cols, :])
            for h, (_, ds) in enumerate(head_tiles))
        if runway:
            rho_dot = rho_dot + jnp.sum(rho * sum(ds for _, ds in head_tiles), axis=1,
                                        keepdims=True)
            if runway_span == "prefix":
                summary_grad = summary_grad + scale * tile_math.dot(drho, keys_block)
            else:
                earlier = earlier + tile_math.dot(probs, values_block)
        return dq, earlier, rho_dot, summary_grad

    zeros = jnp.zeros((plan.block_q, width), jnp.float32)
    initial = (tuple(zeros for _ in range(group_heads)), zeros,
               jnp.zeros((plan.block_q, 1), jnp.float32), zeros)
    first, last = _rows_range(plan, positions)
    dq, _, rho_dot, summary_grad = jax.lax.fori_loop(first, last + 1, step, initial)
    for h in range(group_heads):
        dq_ref[h] = dq[h]
    rho_dot_ref[...] = rho_dot
    summary_grad_ref[...] = summary_grad


def _backward_key_kernel(query_ref, key_ref, value_ref, out_grad_ref, lse_ref, out_dot_ref,
                         runway_query_rows_ref, runway_key_ref, values_ref, runway_lse_ref,
                         summary_ref, positions_ref, query_segments_ref, key_segments_ref,
                         beta_ref, delta_ref, summary_grad_ref, dk_in, dv_in, d_runway_key_in,
                         dz_in, dw_in, dk_ref, dv_ref, d_runway_key_ref, dz_ref, dw_ref,
                         d_runway_query_ref, *, plan, runway, runway_span, scale, cap, groups):
    """Pass GK: key-indexed gradients of the group, added atomically; the group's part of
    ``dq^r``. The runway gradients are linear in ``d rho``, so each head group adds the part
    of its own heads; the terms that do not depend on ``d rho`` (``-A delta``, and for the
    prefix span everything driven by ``du``) are added by group 0 only."""
    del dk_in, dv_in, d_runway_key_in, dz_in, dw_in  # aliased to the outputs (zeros)
    head_group = pl.program_id(2)
    group_heads, width = query_ref.shape[0], query_ref.shape[-1]
    positions, beta = positions_ref[...], beta_ref[0]
    runway_query_rows = runway_query_rows_ref[...]
    rows_data = (runway_query_rows, runway_lse_ref[...], summary_ref[...], positions[:, None],
                 query_segments_ref[...][:, None])
    refs = (query_ref, key_ref, value_ref, out_grad_ref, lse_ref, out_dot_ref, runway_key_ref,
            values_ref, key_segments_ref)
    first_group = (head_group == 0).astype(jnp.float32)
    delta = first_group * delta_ref[...]
    summary_grad = first_group * summary_grad_ref[...]

    def step(key_block, carry):
        earlier, prefix_sum, d_runway_query = carry
        cols = pl.ds(key_block * plan.block_k, plan.block_k)
        distance, probs, _, values_block, keys_block, head_tiles, drho, slope = _backward_tile(
            plan, key_block, cols, head_group, group_heads, groups, refs, rows_data, earlier,
            runway=runway, beta=beta, runway_span=runway_span, scale=scale, cap=cap)
        for h, (probs_h, ds) in enumerate(head_tiles):
            kv_head = _kv_head(head_group, group_heads, h, groups, key_ref.shape[0])
            pltriton.atomic_add(dk_ref, (kv_head, cols, slice(None)),
                                scale * tile_math.dot(ds.T.astype(query_ref.dtype), query_ref[h]))
            pltriton.atomic_add(dv_ref, (kv_head, cols, slice(None)), tile_math.dot(
                probs_h.T.astype(out_grad_ref.dtype), out_grad_ref[h]))
        if runway:
            dprobs, dz, dw = tile_math.runway_backward_tile(
                probs, drho, distance, values_block, keys_block, runway_span=runway_span,
                scale=scale, prefix_sum=prefix_sum, summary_grad=summary_grad, earlier=earlier,
                summary=rows_data[2])
            dlogits = probs * (dprobs - delta)
            if slope is not None:
                dlogits = dlogits * slope  # through the soft cap, eq. (7b)
            d_runway_query = d_runway_query + scale * tile_math.dot(dlogits, keys_block)
            pltriton.atomic_add(d_runway_key_ref, (cols, slice(None)), scale * tile_math.dot(
                dlogits.T, runway_query_rows.astype(jnp.float32)))
            pltriton.atomic_add(dz_ref, (cols, slice(None)), dz)
            pltriton.atomic_add(dw_ref, (cols, slice(None)), dw)
            if runway_span == "exact":
                earlier = earlier + tile_math.dot(probs, values_block)
                prefix_sum = prefix_sum + tile_math.dot(drho, keys_block)
        return earlier, prefix_sum, d_runway_query

    zeros = jnp.zeros((plan.block_q, width), jnp.float32)
    first, last = _rows_range(plan, positions)
    _, _, d_runway_query = jax.lax.fori_loop(first, last + 1, step, (zeros, zeros, zeros))
    d_runway_query_ref[...] = d_runway_query


def backward(query, key, value, runway_query, runway_key, segment_ids, query_segments,
             runway_query_rows, runway_key_rows, offsets, out, lse, runway_lse, summary,
             out_grad, *, plan, beta, runway_coefficient, runway_span, scale, cap=None, runway=None,
             block_sizes, interpret=False):
    """METHOD (3d) on GPU; float32 ``(dq, dk, dv, d runway_query, d runway_key, d beta)``, the
    first five in kernel layout (the runway gradients on the key side). Both passes run on the
    grid ``(B, query blocks, head groups)`` like the forward pass, each program over the key
    blocks its rows see: GQ gives ``dq`` and the row terms ``sum_j rho_ij sum_h dS~^h_ij``
    (``delta_i`` is ``-beta`` times it) and ``du`` (summed over head groups here); GQ's
    key-indexed twin GK adds ``dk``, ``dv``, ``dk^r``, ``dz`` and ``dw`` with float32 atomic adds
    (the exact span's row prefixes ``S_i``, ``R_i`` only exist in query-major order, so there is
    no key-major pass)."""
    runway = tiling.runs_runway_head(beta) if runway is None else runway
    real_heads, kv_heads = query.shape[1], key.shape[1]
    f32 = jnp.float32
    group_heads = heads_per_program(real_heads, block_sizes)
    # Padded heads (see pad_heads) have zero queries and zero output gradients, and an infinite
    # lse, so that their P and dS~ are exactly zero: they add nothing to any gradient.
    query, out, out_grad = (pad_heads(x, group_heads) for x in (query, out, out_grad))
    lse = pad_heads(lse, group_heads, value=float("inf"))
    batch, heads, padded, width = query.shape
    num_groups = heads // group_heads
    values = runway_query if runway_coefficient == "bilinear" else runway_key
    out_dot = jnp.sum(out_grad.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    positions = layouts.row_positions(offsets, plan)
    beta_array = _beta_array(beta)
    bq = plan.block_q
    options = dict(plan=plan, runway=runway, runway_span=runway_span, scale=scale, cap=cap,
                   groups=real_heads // kv_heads)
    specs = _row_specs(plan, width, 3)
    group_rows = pl.BlockSpec((None, group_heads, bq, width), lambda b, i, g: (b, g, i, 0))
    group_stats = pl.BlockSpec((None, group_heads, bq, 1), lambda b, i, g: (b, g, i, 0))
    kv_whole = pl.BlockSpec((None, kv_heads, plan.padded_key_length, width),
                            lambda b, i, g: (b, 0, 0, 0))
    per_group_stats = pl.BlockSpec((None, None, bq, 1), lambda b, i, g: (b, g, i, 0))
    per_group_rows = pl.BlockSpec((None, None, bq, width), lambda b, i, g: (b, g, i, 0))
    grid = (batch, plan.num_query_blocks, num_groups)
    cost_of = functools.partial(cost_model.backward_pass_estimate, pl, batch, heads, kv_heads,
                                width, query.dtype.itemsize, plan_=plan, runway_span=runway_span,
                                runway=runway, head_groups=num_groups, soft_cap=cap is not None)
    shared_inputs = (query, key, value, out_grad, lse, out_dot, runway_query_rows, runway_key,
                     values, runway_lse, summary, positions, query_segments, segment_ids,
                     beta_array)
    shared_specs = [group_rows, kv_whole, kv_whole, group_rows, group_stats, group_stats,
                    specs["rows"], specs["keys"], specs["keys"], specs["row_stats"],
                    specs["rows"], specs["row_ids"], specs["row_ids"], specs["key_ids"],
                    specs["beta"]]

    dq, rho_dot, summary_grad = pl.pallas_call(
        functools.partial(_backward_query_kernel, **options),
        grid=grid,
        in_specs=shared_specs,
        out_specs=[group_rows, per_group_stats, per_group_rows],
        out_shape=[jax.ShapeDtypeStruct(query.shape, f32),
                   jax.ShapeDtypeStruct((batch, num_groups, padded, 1), f32),
                   jax.ShapeDtypeStruct((batch, num_groups, padded, width), f32)],
        compiler_params=_compiler_params(block_sizes), cost_estimate=cost_of(key_pass=False),
        interpret=interpret, name="rewired_attention_backward_queries",
    )(*shared_inputs)
    rho_dot, summary_grad = rho_dot.sum(axis=1), summary_grad.sum(axis=1)
    delta = -beta_array[0] * rho_dot  # sum_j d rho_ij rho_ij

    key_shape = runway_key.shape
    accumulators = [jnp.zeros(key.shape, f32), jnp.zeros(value.shape, f32)] + [
        jnp.zeros(key_shape, f32)] * 3
    first_accumulator = len(shared_inputs) + 2
    dk, dv, d_runway_key, dz, dw, d_runway_query_rows = pl.pallas_call(
        functools.partial(_backward_key_kernel, **options),
        grid=grid,
        in_specs=shared_specs + [specs["row_stats"], specs["rows"], kv_whole, kv_whole,
                                 specs["keys"], specs["keys"], specs["keys"]],
        out_specs=[kv_whole, kv_whole, specs["keys"], specs["keys"], specs["keys"],
                   per_group_rows],
        out_shape=[jax.ShapeDtypeStruct(key.shape, f32), jax.ShapeDtypeStruct(value.shape, f32)]
        + [jax.ShapeDtypeStruct(key_shape, f32)] * 3
        + [jax.ShapeDtypeStruct((batch, num_groups, padded, width), f32)],
        input_output_aliases={first_accumulator + n: n for n in range(5)},
        compiler_params=_compiler_params(block_sizes), cost_estimate=cost_of(key_pass=True),
        interpret=interpret, name="rewired_attention_backward_keys",
    )(*shared_inputs, delta, summary_grad, *accumulators)
    return layouts.runway_gradients(dq[:, :real_heads], dk, dv, d_runway_query_rows.sum(axis=1),
                                    d_runway_key, dz, dw, rho_dot, offsets, plan=plan,
                                    runway_coefficient=runway_coefficient)
