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
tune on; it would be a third file beside this one.

Two ``pallas_call``s:

1. :func:`runway_statistics` -- grid ``(B, query blocks)``; the runway head's ``lse^r`` and
   ``u_i = (A w)_i - A_ii w_i`` (METHOD eq. (3b)).
2. :func:`rewired_forward` -- grid ``(B, query blocks, head groups)``; each program walks the key
   blocks ``J <= I`` in a ``fori_loop``, forms ``rho_IJ`` once and runs the online softmax of
   ``heads_per_program`` heads on ``s^h - beta * rho``. Unlike the TPU kernel, a Triton program
   keeps its accumulators in registers, so it cannot serve all 16 heads at d = 128; a group of G'
   heads costs about ``(2 G' + 5) Bq Bk d`` per tile (rho amortized over G' heads).

Layouts: see :mod:`runway_jax.kernels.common`. Every loaded tile has power-of-two sides (Triton's
requirement): ``Bq``, ``Bk`` and ``d`` must be powers of two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from runway_jax.kernels import common


def heads_per_program(heads, block_sizes: common.BlockSizes) -> int:
    """The largest divisor of ``heads`` not above ``block_sizes.heads_per_program``."""
    wanted = heads if block_sizes.heads_per_program is None else block_sizes.heads_per_program
    return max(n for n in range(1, min(wanted, heads) + 1) if heads % n == 0)


def _check_width(width):
    if width & (width - 1):
        raise ValueError(
            f"rewired_attention: head width d={width} must be a power of two for "
            "implementation='pallas_gpu' (Triton tiles); use implementation='xla'.")


def _tile_masks(plan, query_block, key_block, query_segments, segments_ref):
    query_positions = query_block * plan.block_q + jnp.arange(plan.block_q)[:, None]
    key_positions = key_block * plan.block_k + jnp.arange(plan.block_k)[None, :]
    key_segments = segments_ref[pl.ds(key_block * plan.block_k, plan.block_k)][None, :]
    return common.tile_masks(query_positions, key_positions, query_segments, key_segments)


def _compiler_params(block_sizes):
    return pltriton.CompilerParams(num_warps=block_sizes.num_warps,
                                   num_stages=block_sizes.num_stages)


def _runway_statistics_kernel(runway_query_ref, runway_key_ref, values_ref, segments_ref,
                              lse_ref, summary_ref, *, plan, scale):
    query_block = pl.program_id(1)
    rows = pl.ds(query_block * plan.block_q, plan.block_q)
    runway_query_rows = runway_query_ref[rows, :]
    query_segments = segments_ref[rows][:, None]

    def step(key_block, stats):
        cols = pl.ds(key_block * plan.block_k, plan.block_k)
        visible, _ = _tile_masks(plan, query_block, key_block, query_segments, segments_ref)
        logits = common.runway_logits(runway_query_rows, runway_key_ref[cols, :], scale)
        return common.online_softmax_step(*stats, logits, visible,
                                          values_ref[cols, :].astype(jnp.float32))

    stats = jax.lax.fori_loop(0, common.last_key_block(query_block, plan) + 1, step,
                              common.initial_row_stats(plan.block_q, values_ref.shape[-1]))
    weighted, lse = common.finish_softmax(*stats)
    lse_ref[...] = lse
    summary_ref[...] = common.runway_summary(weighted, lse, runway_query_rows,
                                             runway_key_ref[rows, :], values_ref[rows, :], scale)


def runway_statistics(runway_query, runway_key, values, segment_ids, *, plan, scale,
                      block_sizes, interpret=False):
    """Pass 1 (METHOD (3c)): ``(lse^r [B, Tp, 1], u [B, Tp, d])`` float32."""
    batch, padded, width = runway_query.shape
    _check_width(width)
    whole = pl.BlockSpec((None, padded, width), lambda b, i: (b, 0, 0))
    segments = pl.BlockSpec((None, padded), lambda b, i: (b, 0))
    return pl.pallas_call(
        functools.partial(_runway_statistics_kernel, plan=plan, scale=scale),
        grid=(batch, plan.num_query_blocks),
        in_specs=[whole, whole, whole, segments],
        out_specs=[pl.BlockSpec((None, plan.block_q, 1), lambda b, i: (b, i, 0)),
                   pl.BlockSpec((None, plan.block_q, width), lambda b, i: (b, i, 0))],
        out_shape=[jax.ShapeDtypeStruct((batch, padded, 1), jnp.float32),
                   jax.ShapeDtypeStruct((batch, padded, width), jnp.float32)],
        compiler_params=_compiler_params(block_sizes),
        cost_estimate=common.cost_estimate(pl, batch, 0, 0, width,
                                           runway_query.dtype.itemsize, plan_=plan,
                                           statistics_pass=True),
        interpret=interpret,
        name="runway_statistics",
    )(runway_query, runway_key, values, segment_ids)


def _rewired_forward_kernel(query_ref, key_ref, value_ref, runway_query_ref, runway_key_ref,
                            values_ref, runway_lse_ref, summary_ref, segments_ref, out_ref,
                            lse_ref, *, plan, beta, span, scale, groups):
    query_block, head_group = pl.program_id(1), pl.program_id(2)
    group_heads, width = query_ref.shape[0], query_ref.shape[-1]
    rows = pl.ds(query_block * plan.block_q, plan.block_q)
    query_segments = segments_ref[rows][:, None]
    runway_query_rows = runway_query_ref[rows, :]
    runway_lse, summary = runway_lse_ref[...], summary_ref[...]
    queries = [query_ref[h] for h in range(group_heads)]  # stay in registers / shared memory
    kv_heads = [(head_group * group_heads + h) // groups for h in range(group_heads)]

    def step(key_block, carry):
        earlier, stats = carry
        cols = pl.ds(key_block * plan.block_k, plan.block_k)
        visible, distance = _tile_masks(plan, query_block, key_block, query_segments,
                                        segments_ref)
        if beta == 0.0:  # standard attention (invariant 1): no runway work at all
            rho = jnp.zeros(visible.shape, jnp.float32)
        else:
            values_block = values_ref[cols, :].astype(jnp.float32)  # W_J
            keys_block = runway_key_ref[cols, :].astype(jnp.float32)  # Z_J
            probs = None
            if span == "exact":  # the prefix span needs no A in this pass
                logits = common.runway_logits(runway_query_rows, runway_key_ref[cols, :], scale)
                probs = jnp.where(visible, jnp.exp(logits - runway_lse), 0.0)  # A_IJ
            rho = common.runway_coefficients_tile(probs, summary, earlier, values_block,
                                                  keys_block, visible, distance, span=span,
                                                  scale=scale)
            if span == "exact":
                earlier = earlier + common.dot(probs, values_block)  # S_I += A_IJ W_J
        new_stats = []
        for h in range(group_heads):  # rho is shared by the heads of the group (METHOD (3c))
            logits = common.rewired_logits(queries[h], key_ref[kv_heads[h], cols, :], rho,
                                           beta=beta, scale=scale)
            new_stats.append(common.online_softmax_step(*stats[h], logits, visible,
                                                        value_ref[kv_heads[h], cols, :]))
        return earlier, tuple(new_stats)

    initial = (jnp.zeros((plan.block_q, width), jnp.float32),
               tuple(common.initial_row_stats(plan.block_q, width) for _ in range(group_heads)))
    _, stats = jax.lax.fori_loop(0, common.last_key_block(query_block, plan) + 1, step, initial)
    for h in range(group_heads):
        out, lse = common.finish_softmax(*stats[h])
        out_ref[h] = out.astype(out_ref.dtype)
        lse_ref[h] = lse


def rewired_forward(query, key, value, runway_query, runway_key, values, runway_lse, summary,
                    segment_ids, *, plan, beta, span, scale, block_sizes, interpret=False):
    """Pass 2 (METHOD (3c)): ``(out [B, H, Tp, d], lse [B, H, Tp, 1])``."""
    batch, heads, padded, width = query.shape
    kv_heads = key.shape[1]
    _check_width(width)
    group_heads = heads_per_program(heads, block_sizes)
    query_spec = pl.BlockSpec((None, group_heads, plan.block_q, width),
                              lambda b, i, g: (b, g, i, 0))
    kv_spec = pl.BlockSpec((None, kv_heads, padded, width), lambda b, i, g: (b, 0, 0, 0))
    whole = pl.BlockSpec((None, padded, width), lambda b, i, g: (b, 0, 0))
    row_stats = pl.BlockSpec((None, plan.block_q, 1), lambda b, i, g: (b, i, 0))
    row_values = pl.BlockSpec((None, plan.block_q, width), lambda b, i, g: (b, i, 0))
    segments = pl.BlockSpec((None, padded), lambda b, i, g: (b, 0))
    kernel = functools.partial(_rewired_forward_kernel, plan=plan, beta=beta, span=span,
                               scale=scale, groups=heads // kv_heads)
    return pl.pallas_call(
        kernel,
        grid=(batch, plan.num_query_blocks, heads // group_heads),
        in_specs=[query_spec, kv_spec, kv_spec, whole, whole, whole, row_stats, row_values,
                  segments],
        out_specs=[query_spec,
                   pl.BlockSpec((None, group_heads, plan.block_q, 1), lambda b, i, g: (b, g, i, 0))],
        out_shape=[jax.ShapeDtypeStruct(query.shape, query.dtype),
                   jax.ShapeDtypeStruct((batch, heads, padded, 1), jnp.float32)],
        compiler_params=_compiler_params(block_sizes),
        cost_estimate=common.cost_estimate(pl, batch, heads, kv_heads, width,
                                           query.dtype.itemsize, plan_=plan, span=span,
                                           runway=beta != 0.0),
        interpret=interpret,
        name="rewired_attention_forward",
    )(query, key, value, runway_query, runway_key, values, runway_lse, summary, segment_ids)


def forward(query, key, value, runway_query, runway_key, segment_ids, *, plan, beta, coefficient,
            span, scale, block_sizes, interpret=False):
    """Both passes: ``(out, lse, runway_lse, summary)`` in kernel layout."""
    values = runway_query if coefficient == "bilinear" else runway_key
    if beta == 0.0:  # standard attention (METHOD (6), invariant 1): no runway work at all
        runway_lse = jnp.zeros(runway_query.shape[:2] + (1,), jnp.float32)
        summary = jnp.zeros(runway_query.shape, jnp.float32)
    else:
        runway_lse, summary = runway_statistics(runway_query, runway_key, values, segment_ids,
                                                plan=plan, scale=scale, block_sizes=block_sizes,
                                                interpret=interpret)
    out, lse = rewired_forward(query, key, value, runway_query, runway_key, values, runway_lse,
                               summary, segment_ids, plan=plan, beta=beta, span=span, scale=scale,
                               block_sizes=block_sizes, interpret=interpret)
    return out, lse, runway_lse, summary
