"""Pallas Mosaic GPU (Hopper, sm_90+) forward kernels for rewired attention, METHOD (3c).

Two kernels (``plgpu.kernel``), one warpgroup per program, operands moved by TMA into shared
memory (SMEM) and every product a WGMMA with a float32 accumulator:

1. :func:`runway_statistics` -- grid ``(B, query blocks)``: the runway head's flash attention with
   values w, giving ``lse^r`` and ``u_i = (A w)_i - A_ii w_i`` (METHOD eq. (3b)).
2. :func:`rewired_forward` -- grid ``(B, query blocks, head groups)``: a program walks the key
   blocks its rows see (a ``fori_loop`` with per-program bounds); for each key block J it forms
   ``rho_IJ`` ONCE in registers (exact span: ``A_IJ``, the running prefix ``S_I`` and the in-block
   term ``A_IJ triu(W_J Z_J^T)``), then runs the online softmax of every head of its group on
   ``s^h - beta rho`` (eq. (3)). With one group (``heads_per_program=None``) rho is made once
   per tile for ALL rewired heads: ``(2 (H - 1) + 5 + 2) / 2H``, about 1.16x the FLOPs of
   standard attention at H = 16 (:func:`flop_ratio`).

SMEM per program: the group's queries ``[G, Bq, d]``, the runway rows and ``u`` ``[Bq, d]``, one
key block of ``K^T``, ``V``, ``Z^T``, ``W`` and staging tiles for the WGMMA left operands that are
computed in registers (``A_IJ``, ``P^h``, ``u - S``, ``triu``). Registers: ``rho``, ``S_I`` and
the group's running max, sum and ``[Bq, d]`` float32 accumulators. On hardware SMEM and registers
bound G: at ``Bq = Bk = 64, d = 128`` bf16 SMEM fits G <= 4 (16 KiB of queries per head) and one
float32 accumulator is 32 KiB, so one warpgroup holds about two heads; 15 heads (480 KiB of
float32 state) exceed an SM's 256 KiB register file plus 227 KiB of SMEM. So at that size rho
is formed once per group of G heads (2.31x the FLOPs of standard attention at G = 2); once for
all heads needs rho shared across programs (a cluster's distributed SMEM), not done here. The
kernels run and lower with ``heads_per_program=None`` wherever the state fits (small d, H).

Minimum tiles: WGMMA needs 64-row tiles and 128-byte swizzled rows, so ``Bq``, ``Bk`` are powers
of two >= 64 (:func:`plan`) and ``d`` a multiple of 64. Keys are stored transposed (``K^T``,
``Z^T`` ``[.., d, Tkp]``) so that no WGMMA operand needs a transposed view (the jax 0.10 GPU
interpreter cannot read one). Float32 inputs run in the interpreter; on hardware WGMMA would take
them as tf32, which needs K-major right operands, so only 16-bit inputs lower for CUDA.

Not pipelined (each TMA copy is awaited before use), no warp specialization, and K, V are
fetched per head (a GQA group's heads fetch the same tiles): a first, correct kernel to tune on
a Hopper machine, which this was not run on. Options of METHOD (7): ``local_window_size``,
``logits_soft_cap``, fewer queries than keys and ``key_value_seq_lengths`` all work through
the row positions and the per-program key-block range (same helpers as the other kernels).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from runway_jax.kernels import cost_model, layouts, tile_math, tiling
from runway_jax.masking import MASK_VALUE

MIN_BLOCK = 64  # WGMMA tiles have 64 rows (M) and a 64-element bf16 swizzle row
_ROW = plgpu.Layout.WGMMA.reduce(1)  # [Bq] row statistics
_COL = plgpu.Layout.WGMMA.reduce(0)  # [Bk] key-side vectors
# plgpu.load(ref, idx, *, layout) in jax 0.10; plgpu.load(ref, *, layout) from jax 0.11 on.
_LOAD_TAKES_INDEX = "idx" in inspect.signature(plgpu.load).parameters


def interpret_params():
    """The Mosaic GPU interpreter's parameters (public in jax >= 0.11, private in 0.10)."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


def plan(query_length, block_sizes: tiling.BlockSizes, *, key_length=None, window=None,
         ragged=False) -> tiling.Plan:
    """:func:`runway_jax.kernels.tiling.plan` with WGMMA-sized blocks: the requested ones, shrunk
    for short sequences to the next power of two >= T but never below 64; padded alike."""
    return tiling.plan(query_length, block_sizes, key_length=key_length, window=window,
                       ragged=ragged, min_block=MIN_BLOCK)


def _check(plan_, query, interpret):
    width = query.shape[-1]
    if plan_.block_q % MIN_BLOCK or plan_.block_k % MIN_BLOCK or width % MIN_BLOCK:
        raise ValueError(
            f"mosaic_gpu: blocks ({plan_.block_q}, {plan_.block_k}) and head width {width} must "
            f"be multiples of {MIN_BLOCK} (WGMMA tiles); plan with mosaic_gpu.plan.")
    if query.dtype.itemsize != 2 and not interpret:
        raise ValueError(f"mosaic_gpu: {query.dtype} inputs run in interpret mode only; on "
                         "hardware the kernels take 16-bit inputs (see the module docstring).")


def head_group(heads, heads_per_program=None) -> int:
    """Heads per program: ``heads_per_program`` (None: all), at most ``heads``; the heads are
    padded with zero heads to a multiple of it (as ``gpu.pad_heads``)."""
    return heads if heads_per_program is None else max(1, min(heads_per_program, heads))


def flop_ratio(heads=16, width=128, length=4096, *, runway_span="exact", block_q=64, block_k=64,
               heads_per_program=None):
    """FLOPs of this forward (runway head + ``heads - 1`` rewired heads, METHOD (1)) over those of
    standard causal attention with ``heads`` heads, by the cost model of
    :func:`runway_jax.kernels.cost_model.plan_forward_cost`; each of the ``ceil((H - 1) / G)``
    programs of a query block forms rho once, padded heads count. H = 16, d = 128: 1.16 (exact)
    and 1.03 (prefix) for G = 15; 1.47 / 1.09 for G = 5; 2.31 / 1.31 for G = 2."""
    group = head_group(heads - 1, heads_per_program)
    groups = -(-(heads - 1) // group)
    flops = forward_cost(1, length, groups * group, 1, width, 2, runway_span=runway_span,
                         block_q=block_q, block_k=block_k, head_groups=groups)[0]
    standard = cost_model.standard_attention_cost(1, length, heads, heads, width, 2,
                                                  block_q=block_q, block_k=block_k)[0]
    return flops / standard


def forward_cost(batch, length, heads, kv_heads, width, itemsize, *, runway_span, block_q=64,
                 block_k=64, head_groups=1, window=None, query_length=None):
    """``(flops, transcendentals, hbm_bytes)`` of the two kernels (METHOD (3c)): the common cost
    model with this kernel's tiles; ``head_groups`` programs per query block each form rho."""
    plan_ = plan(length if query_length is None else query_length,
                 tiling.BlockSizes(block_q=block_q, block_k=block_k), key_length=length,
                 window=window)
    return cost_model.plan_forward_cost(batch, plan_, heads, kv_heads, width, itemsize,
                                        runway_span=runway_span, head_groups=head_groups)


# --------------------------------------------------------------------------------------------
# In-kernel helpers (values in WGMMA register layouts; refs in SMEM).
# --------------------------------------------------------------------------------------------


def _operand(shape, dtype):
    """An SMEM tile that WGMMA reads: 8-row tiles of 128 bytes, 128-byte swizzle."""
    transforms = (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)),
                  plgpu.SwizzleTransform(128))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _mma(left_smem, right_smem, shape):
    """``left @ right`` float32 ``[M, N]`` by one WGMMA, awaited (the SMEM may be reused)."""
    def body(acc):
        plgpu.wgmma(acc, left_smem, right_smem)
        plgpu.wgmma_wait(0)
        return acc[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _stage(value, smem):
    """Write a register tile to SMEM for a WGMMA operand (visible to the async proxy)."""
    smem[...] = value.astype(smem.dtype)
    plgpu.commit_smem()


def _rows(vector, shape):
    return lax.broadcast_in_dim(vector, shape, [0])


class _Loader:
    """TMA copies into SMEM, each awaited, and values in a given register layout (the
    interpreter has no layouts: there they are plain arrays)."""

    def __init__(self, barrier, interpret):
        self.barrier, self.interpret = barrier, interpret
    def copy(self, *pairs):
        for source, target in pairs:
            plgpu.copy_gmem_to_smem(source, target, self.barrier)
            plgpu.barrier_wait(self.barrier)

    def read(self, ref, layout):
        if self.interpret:
            return ref[...]
        index = ((),) if _LOAD_TAKES_INDEX else ()
        return plgpu.load(ref, *index, layout=layout)

    def full(self, shape, value, layout):
        value = jnp.full(shape, value, jnp.float32)
        return value if self.interpret else plgpu.layout_cast(value, layout)

    def iota(self, shape, dimension):
        return plgpu.broadcasted_iota(jnp.int32, shape, dimension,
                                      layout=None if self.interpret else plgpu.Layout.WGMMA)


def _masks(io, plan_, row_positions, row_segments, key_block, key_segments):
    """``visible`` (eq. (7a)) and ``distance = i - j`` of a ``[Bq, Bk]`` tile."""
    shape = (plan_.block_q, plan_.block_k)
    keys = key_block * plan_.block_k + io.iota(shape, 1)
    return tile_math.tile_masks(_rows(row_positions, shape), keys, _rows(row_segments, shape),
                                lax.broadcast_in_dim(key_segments, shape, [1]), window=plan_.window)


def _softmax_step(stats, logits, visible, probs_smem, values_smem):
    """One key tile of the online softmax (as ``tile_math.online_softmax_step``); ``P`` goes through
    SMEM as the left operand of ``P V``."""
    max_so_far, sum_so_far, accumulator = stats
    logits = jnp.where(visible, logits, MASK_VALUE)
    new_max = jnp.maximum(max_so_far, logits.max(axis=1))
    probs = jnp.where(visible, jnp.exp(logits - _rows(new_max, logits.shape)), 0.0)
    correction = jnp.exp(max_so_far - new_max)
    _stage(probs, probs_smem)
    accumulator = (_rows(correction, accumulator.shape) * accumulator
                   + _mma(probs_smem, values_smem, accumulator.shape))
    return new_max, correction * sum_so_far + probs.sum(axis=1), accumulator


def _finish(stats):
    """Normalized output and log-sum-exp (as ``tile_math.finish_softmax``)."""
    max_so_far, sum_so_far, accumulator = stats
    empty = sum_so_far == 0.0
    safe_sum = jnp.where(empty, 1.0, sum_so_far)
    return (accumulator / _rows(safe_sum, accumulator.shape),
            jnp.where(empty, MASK_VALUE, max_so_far + jnp.log(safe_sum)))


_SCALARS = 32  # a TMA copy moves a multiple of 128 bytes: scalars travel in 32-word rows


def _key_range(plan_, offsets):
    """``[B, nQ, 32]`` int32: first and one-past-last key block of every query block (zero
    padded to one TMA row)."""
    blocks = jnp.arange(plan_.num_query_blocks, dtype=jnp.int32)[None, :]
    first, last = tiling.query_block_key_range(blocks, offsets[:, None], plan_)
    first = jnp.broadcast_to(jnp.asarray(first, jnp.int32), last.shape)
    bounds = jnp.stack([first, jnp.maximum(last + 1, first)], axis=-1).astype(jnp.int32)
    return jnp.pad(bounds, ((0, 0), (0, 0), (0, _SCALARS - 2)))


# --------------------------------------------------------------------------------------------
# Pass 1: the runway head's statistics.
# --------------------------------------------------------------------------------------------


def _statistics_kernel(runway_query_rows, runway_key_rows, values_rows, keys_t, values,
                       query_segments, key_segments, row_positions, key_ranges, lse_out,
                       summary_out, query_smem, key_rows_smem, value_rows_smem, keys_smem,
                       values_smem, probs_smem, row_ints, row_segments_smem, key_segments_smem,
                       range_smem, summary_smem, lse_smem, barrier, *, plan_, scale, cap,
                       interpret):
    batch, query_block = lax.axis_index("batch"), lax.axis_index("query_block")
    rows = pl.ds(query_block * plan_.block_q, plan_.block_q)
    io = _Loader(barrier.at[0], interpret)
    io.copy((runway_query_rows.at[batch, rows], query_smem),
            (runway_key_rows.at[batch, rows], key_rows_smem),
            (values_rows.at[batch, rows], value_rows_smem),
            (row_positions.at[batch, rows], row_ints),
            (query_segments.at[batch, rows], row_segments_smem),
            (key_ranges.at[batch, query_block], range_smem))
    positions, segments = io.read(row_ints, _ROW), io.read(row_segments_smem, _ROW)
    width, shape = query_smem.shape[-1], (plan_.block_q, plan_.block_k)

    def step(key_block, stats):
        cols = pl.ds(key_block * plan_.block_k, plan_.block_k)
        io.copy((keys_t.at[batch, :, cols], keys_smem), (values.at[batch, cols], values_smem),
                (key_segments.at[batch, cols], key_segments_smem))
        visible, _ = _masks(io, plan_, positions, segments, key_block,
                            io.read(key_segments_smem, _COL))
        logits = tile_math.soft_cap(scale * _mma(query_smem, keys_smem, shape), cap)
        return _softmax_step(stats, logits, visible, probs_smem, values_smem)

    layout = plgpu.Layout.WGMMA
    stats = (io.full((plan_.block_q,), MASK_VALUE, _ROW), io.full((plan_.block_q,), 0.0, _ROW),
             io.full((plan_.block_q, width), 0.0, layout))
    stats = lax.fori_loop(range_smem[0], range_smem[1], step, stats)
    weighted, lse = _finish(stats)
    # u_i = (A w)_i - A_ii w_i, A_ii from the same statistics (eq. (3b)); padded rows: 0.
    own_query, own_key = (io.read(ref, layout).astype(jnp.float32)
                          for ref in (query_smem, key_rows_smem))
    diagonal = tile_math.soft_cap(scale * (own_query * own_key).sum(axis=1), cap)
    diagonal = jnp.where(positions >= 0, jnp.exp(diagonal - lse), 0.0)
    own_values = io.read(value_rows_smem, layout).astype(jnp.float32)
    summary_smem[...] = weighted - _rows(diagonal, weighted.shape) * own_values
    lse_smem[...] = lse
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(summary_smem, summary_out.at[batch, rows])
    plgpu.copy_smem_to_gmem(lse_smem, lse_out.at[batch, rows])
    plgpu.wait_smem_to_gmem(0)


def runway_statistics(runway_query_rows, runway_key_rows, values_rows, keys_t, values,
                      query_segments, key_segments, row_positions, key_ranges, *, plan_, scale,
                      cap=None, interpret=False):
    """Pass 1: ``(lse^r [B, Tqp], u [B, Tqp, d])`` float32; ``keys_t`` is ``Z^T [B, d, Tkp]``."""
    batch, padded, width = runway_query_rows.shape
    dtype, bq, bk, i32 = runway_query_rows.dtype, plan_.block_q, plan_.block_k, jnp.int32
    kernel = functools.partial(_statistics_kernel, plan_=plan_, scale=scale, cap=cap,
                               interpret=bool(interpret))
    return plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct((batch, padded), jnp.float32),
                  jax.ShapeDtypeStruct((batch, padded, width), jnp.float32)],
        scratch_types=[_operand((bq, width), dtype), _operand((bq, width), dtype),
                       _operand((bq, width), values_rows.dtype), _operand((width, bk), dtype),
                       _operand((bk, width), values.dtype), _operand((bq, bk), values.dtype),
                       plgpu.SMEM((bq,), i32), plgpu.SMEM((bq,), i32), plgpu.SMEM((bk,), i32),
                       plgpu.SMEM((_SCALARS,), i32), _operand((bq, width), jnp.float32),
                       plgpu.SMEM((bq,), jnp.float32), plgpu.Barrier(num_barriers=1)],
        grid=(batch, plan_.num_query_blocks), grid_names=("batch", "query_block"),
        interpret=interpret_params() if interpret else None,
    )(runway_query_rows, runway_key_rows, values_rows, keys_t, values, query_segments,
      key_segments, row_positions, key_ranges)


# --------------------------------------------------------------------------------------------
# Pass 2: rho once per tile, shared by the heads of the program (METHOD (3c)).
# --------------------------------------------------------------------------------------------


def _rewired_kernel(query, keys_t, value, runway_query_rows, runway_lse, summary, runway_keys_t,
                    values, query_segments, key_segments, row_positions, key_ranges, beta, out,
                    lse_out, query_smem, keys_smem, value_smem, runway_query_smem,
                    runway_keys_smem, values_smem, probs_smem, left_smem, triu_smem,
                    summary_smem, runway_lse_smem, row_ints, row_segments_smem,
                    key_segments_smem, range_smem, beta_smem, lse_smem, barrier, *,
                    plan_, runway, runway_span, scale, cap, groups, interpret):
    batch, query_block = lax.axis_index("batch"), lax.axis_index("query_block")
    first_head = lax.axis_index("head_group") * query_smem.shape[0]
    heads, width, kv_heads = query_smem.shape[0], query_smem.shape[-1], keys_t.shape[1]
    bq, bk = plan_.block_q, plan_.block_k
    rows = pl.ds(query_block * bq, bq)
    io = _Loader(barrier.at[0], interpret)
    io.copy(*[(query.at[batch, first_head + h, rows], query_smem.at[h]) for h in range(heads)],
            (row_positions.at[batch, rows], row_ints),
            (query_segments.at[batch, rows], row_segments_smem),
            (key_ranges.at[batch, query_block], range_smem), (beta, beta_smem))
    positions, segments = io.read(row_ints, _ROW), io.read(row_segments_smem, _ROW)
    beta_value = beta_smem[0]
    if runway:
        io.copy((runway_query_rows.at[batch, rows], runway_query_smem),
                (runway_lse.at[batch, rows], runway_lse_smem),
                (summary.at[batch, rows], summary_smem))
        runway_row_lse = io.read(runway_lse_smem, _ROW)
        summary_rows = io.read(summary_smem, plgpu.Layout.WGMMA)
        if runway_span == "prefix":
            _stage(summary_rows, left_smem)  # u_I, the same left operand for every key block
    tile = (bq, bk)

    def runway_tile(visible, distance, earlier):
        """``(rho_IJ, S_I + A_IJ W_J)`` of eq. (3b) (as ``tile_math.runway_coefficients_tile``)."""
        if runway_span == "prefix":
            return jnp.where(visible, scale * _mma(left_smem, runway_keys_smem, tile), 0.0), None
        logits = tile_math.soft_cap(scale * _mma(runway_query_smem, runway_keys_smem, tile), cap)
        probs = jnp.where(visible, jnp.exp(logits - _rows(runway_row_lse, tile)), 0.0)  # A_IJ
        within = _mma(values_smem, runway_keys_smem, (bk, bk))  # <w_k, z_j>, [k, j]
        _stage(jnp.where(io.iota((bk, bk), 0) <= io.iota((bk, bk), 1), within, 0.0), triu_smem)
        _stage(summary_rows - earlier, left_smem)
        _stage(probs, probs_smem)
        rho = _mma(left_smem, runway_keys_smem, tile) - _mma(probs_smem, triu_smem, tile)
        earlier = earlier + _mma(probs_smem, values_smem, earlier.shape)  # S_I += A_IJ W_J
        return jnp.where(visible & (distance >= 2), scale * rho, 0.0), earlier

    def step(key_block, carry):
        earlier, stats = carry
        cols = pl.ds(key_block * bk, bk)
        io.copy((key_segments.at[batch, cols], key_segments_smem))
        visible, distance = _masks(io, plan_, positions, segments, key_block,
                                   io.read(key_segments_smem, _COL))
        rho = None
        if runway:
            io.copy((runway_keys_t.at[batch, :, cols], runway_keys_smem),
                    (values.at[batch, cols], values_smem))
            rho, earlier = runway_tile(visible, distance, earlier)
        new_stats = []
        for h in range(heads):  # rho is shared by every head of the program (METHOD (3c))
            kv_head = jnp.minimum(lax.div(first_head + h, groups), kv_heads - 1)  # padded heads
            io.copy((keys_t.at[batch, kv_head, :, cols], keys_smem),
                    (value.at[batch, kv_head, cols], value_smem))
            logits = scale * _mma(query_smem.at[h], keys_smem, tile)
            if rho is not None:
                logits = logits - beta_value * rho
            logits = tile_math.soft_cap(logits, cap)
            new_stats.append(_softmax_step(stats[h], logits, visible, probs_smem, value_smem))
        return earlier, tuple(new_stats)

    layout = plgpu.Layout.WGMMA
    zeros = lambda: io.full((bq, width), 0.0, layout)
    stats = tuple((io.full((bq,), MASK_VALUE, _ROW), io.full((bq,), 0.0, _ROW), zeros())
                  for _ in range(heads))
    earlier = zeros() if runway and runway_span == "exact" else None
    _, stats = lax.fori_loop(range_smem[0], range_smem[1], step, (earlier, stats))
    for h in range(heads):
        head_out, head_lse = _finish(stats[h])
        left_smem[...] = head_out.astype(left_smem.dtype)  # the loop is done with it
        lse_smem[...] = head_lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(left_smem, out.at[batch, first_head + h, rows])
        plgpu.copy_smem_to_gmem(lse_smem, lse_out.at[batch, first_head + h, rows])
        plgpu.wait_smem_to_gmem(0)  # the staging tiles are reused by the next head


def rewired_forward(query, keys_t, value, runway_query_rows, runway_lse, summary, runway_keys_t,
                    values, query_segments, key_segments, row_positions, key_ranges, beta, *,
                    plan_, runway, runway_span, scale, cap=None, heads_per_program=None,
                    interpret=False):
    """Pass 2: ``(out [B, H, Tqp, d], lse [B, H, Tqp])``; ``keys_t`` is ``K^T [B, K, d, Tkp]``,
    ``runway_keys_t`` ``Z^T [B, d, Tkp]``, ``beta`` ``[32]`` float32 (a runtime value)."""
    batch, heads, padded, width = query.shape
    group = head_group(heads, heads_per_program)
    padded_heads = -(-heads // group) * group
    query = jnp.pad(query, ((0, 0), (0, padded_heads - heads), (0, 0), (0, 0)))
    dtype, bq, bk, i32, f32 = query.dtype, plan_.block_q, plan_.block_k, jnp.int32, jnp.float32
    kernel = functools.partial(_rewired_kernel, plan_=plan_, runway=runway, runway_span=runway_span,
                               scale=scale, cap=cap, groups=heads // keys_t.shape[1],
                               interpret=bool(interpret))
    out, lse = plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct(query.shape, dtype),
                  jax.ShapeDtypeStruct((batch, padded_heads, padded), f32)],
        scratch_types=[
            _operand((group, bq, width), dtype), _operand((width, bk), dtype),
            _operand((bk, width), value.dtype), _operand((bq, width), runway_query_rows.dtype),
            _operand((width, bk), runway_keys_t.dtype), _operand((bk, width), values.dtype),
            _operand((bq, bk), dtype), _operand((bq, width), dtype), _operand((bk, bk), dtype),
            _operand((bq, width), f32), plgpu.SMEM((bq,), f32), plgpu.SMEM((bq,), i32),
            plgpu.SMEM((bq,), i32), plgpu.SMEM((bk,), i32), plgpu.SMEM((_SCALARS,), i32),
            plgpu.SMEM((_SCALARS,), f32), plgpu.SMEM((bq,), f32),
            plgpu.Barrier(num_barriers=1)],
        grid=(batch, plan_.num_query_blocks, padded_heads // group),
        grid_names=("batch", "query_block", "head_group"),
        interpret=interpret_params() if interpret else None,
    )(query, keys_t, value, runway_query_rows, runway_lse, summary, runway_keys_t, values,
      query_segments, key_segments, row_positions, key_ranges, beta)
    return out[:, :heads], lse[:, :heads]


def forward(query, key, value, runway_query, runway_key, segment_ids, query_segments,
            runway_query_rows, runway_key_rows, offsets, *, plan, beta, runway_coefficient,
            runway_span, scale, cap=None, runway=None, heads_per_program=None, interpret=False):
    """Both passes on :class:`runway_jax.kernels.layouts.KernelInputs` (planned by :func:`plan`):
    ``(out [B, H, Tqp, d], lse [B, H, Tqp, 1], runway_lse [B, Tqp, 1], u [B, Tqp, d])`` as
    ``tpu.forward`` returns them. ``runway`` (default: unless ``beta`` is the Python number 0)
    runs the runway head."""
    _check(plan, query, interpret)
    runway = tiling.runs_runway_head(beta) if runway is None else runway
    bilinear = runway_coefficient == "bilinear"
    values = runway_query if bilinear else runway_key
    values_rows = runway_query_rows if bilinear else runway_key_rows
    positions = layouts.row_positions(offsets, plan)
    key_ranges = _key_range(plan, offsets)
    runway_keys_t = jnp.swapaxes(runway_key, 1, 2)  # Z^T [B, d, Tkp]: WGMMA's right operand
    if runway:
        runway_lse, summary = runway_statistics(
            runway_query_rows, runway_key_rows, values_rows, runway_keys_t, values,
            query_segments, segment_ids, positions, key_ranges, plan_=plan, scale=scale,
            cap=cap, interpret=interpret)
    else:  # standard attention (METHOD (6), invariant 1): no runway work at all
        runway_lse = jnp.zeros(runway_query_rows.shape[:2], jnp.float32)
        summary = jnp.zeros(runway_query_rows.shape, jnp.float32)
    beta_array = jnp.full((_SCALARS,), beta, jnp.float32)
    out, lse = rewired_forward(
        query, jnp.swapaxes(key, 2, 3), value, runway_query_rows, runway_lse, summary,
        runway_keys_t, values, query_segments, segment_ids, positions, key_ranges, beta_array,
        plan_=plan, runway=runway, runway_span=runway_span, scale=scale, cap=cap,
        heads_per_program=heads_per_program, interpret=interpret)
    return out, lse[..., None], runway_lse[..., None], summary
