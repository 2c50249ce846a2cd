"""Pallas Mosaic GPU (Hopper, sm_90+) backward kernels for rewired attention, METHOD (3d).

The twin of :func:`runway_jax.kernels.gpu.backward` (same inputs, same outputs) for the forward
kernels of :mod:`runway_jax.kernels.mosaic_gpu`, with their design: one warpgroup per program,
TMA copies into swizzled SMEM, every product a WGMMA with a float32 accumulator, keys stored
transposed where they are a right operand (``K^T``, ``V^T``, ``Z^T``, ``W^T``).

Two query-major passes on the grid ``(B, query blocks, head groups)``, query-major because the
exact span's row prefixes ``S_i = P_i(.)`` (eq. (3b)) and ``R_i`` (eq. (3d)) only exist in that
order. Each program walks the key blocks its rows see and, per key block J, recomputes ``A_IJ``
and ``rho_IJ`` ONCE (eq. (3b)), then runs the flash-attention backward of every head of its
group on ``s~^h = s^h - beta rho`` (eq. (3)) one head at a time, summing ``dS~^h`` into one tile:

1. GQ: ``dq`` and the row terms ``rho_dot_i = sum_j rho_ij sum_h dS~^h_ij`` (so
   ``delta_i = -beta rho_dot_i = sum_k A_ik dA_ik``, METHOD Clarifications) and, for the prefix
   span, ``du_i = c sum_j d rho_ij z_j``.
2. GK: ``dk``, ``dv`` and the runway head's gradients of eq. (3d): ``dz``, ``dw``, ``dk^r``
   (key-indexed) and ``dq^r`` (row-indexed, in registers).

No head keeps state across key blocks (the per-head operands are re-fetched per tile and every
product is added to its gradient tile by tile), so registers and SMEM do not grow with the group:
``heads_per_program=None`` serves all rewired heads in one program, rho formed once per tile.

Gradient sums across programs. Every key-indexed gradient (and ``dq``, which would otherwise
hold ``G`` float32 ``[Bq, d]`` accumulators in registers) is added per tile with a TMA
reduce-add (``copy_smem_to_gmem(..., reduction_op="add")``, ``cp.reduce.async.bulk``: atomic per
element) into a zero-initialized float32 buffer. ``plgpu.kernel`` has no input/output aliasing,
so the buffers are mutable ``jax.new_ref`` arrays in GMEM passed to ``pl.kernel`` (which aliases
a Ref in and out); that works on jax 0.10 and 0.12 alike, ``plgpu.kernel``'s vmap wrapper
rejects Refs on 0.10. The Mosaic GPU interpreter of both lines raises NotImplementedError for
``reduction_op`` but runs the grid sequentially, so there a TMA read-add-write is exact.

Budget at ``Bq = Bk = 64, d = 128`` bf16, the same for every group size G (:func:`_scratch`
allocates only what a pass uses). SMEM: ``[64, 128]`` bf16 operand tiles of 16 KiB (q, dO, K^T,
V^T or W^T, Z^T; as needed K, Z, W, the runway rows, ``u``, and the staging tile ``u - S``/``R``/
``du``), ``[64, 64]`` bf16 tiles of 8 KiB (``A``/``P``/``dS``/``d rho``, its transposed twin, the
``[Bk, Bk]`` triangle) and one float32 ``[64, 128]`` reduce-add stage of 32 KiB: GQ 194 KiB
(exact) / 170 KiB (prefix), GK 202 / 194 KiB, under the 227 KiB of an H100 (the lowering checks
this; ``Bq = 128`` at d = 128 exceeds it). Registers (not checked by the lowering; this has not
run on a Hopper machine): GK holds ``S``, ``R`` and ``dq^r`` (three ``[64, 128]`` float32, 96
KiB) and about six ``[64, 64]`` float32 tiles (``A``, ``rho``, ``sum_h dS~``, a head's ``P``,
``dS~``, ``dP``: 96 KiB) against the 127.5 KiB one warpgroup may hold (128 threads x 255 x 4 B),
so it will spill; GQ holds ``S`` (or ``du``) and ``rho_dot`` besides the tiles. Not pipelined, no
warp specialization, TMA copies awaited one at a time, a GQA group's heads fetch and reduce-add
their shared K, V tiles separately: a first, correct kernel to tune on hardware.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from runway_jax.kernels import layouts, tile_math, tiling
from runway_jax.kernels import mosaic_gpu as forward_kernels
# The forward's private helpers: the same tiles, loads and masks as the forward pass.
from runway_jax.kernels.mosaic_gpu import (_COL, _ROW, _SCALARS, _Loader, _masks, _mma, _operand,
                                          _rows, _stage)

_LAYOUT = plgpu.Layout.WGMMA


def _transposed_view(ref):
    """``ref^T`` as a view (jax 0.10: ``plgpu.transpose_ref``; 0.11 on: ``ref.transpose``)."""
    if hasattr(plgpu, "transpose_ref"):
        return plgpu.transpose_ref(ref, (1, 0))
    return ref.transpose((1, 0))


def _transposed_operand(shape, dtype, interpret):
    """SMEM for a WGMMA left operand holding ``x^T`` of a register tile ``x`` of ``shape``."""
    return _operand(shape[::-1] if interpret else shape, dtype)


def _stage_transposed(value, smem, interpret):
    """``value^T`` as a WGMMA operand. Mosaic GPU has no register transpose (no lowering rule
    for ``lax.transpose``), so on hardware the tile is stored as is and read through a
    transposed SMEM view (WGMMA takes MN-major 16-bit operands); the jax 0.10 interpreter cannot
    read such a view, so there ``value.T`` itself is stored."""
    if interpret:
        smem[...] = value.T.astype(smem.dtype)
        plgpu.commit_smem()
        return smem
    _stage(value, smem)
    return _transposed_view(smem)


def _add_to(io, value, stage_smem, target):
    """``target += value`` (float32 GMEM) by a TMA reduce-add; in the interpreter (no TMA
    reductions, grid run sequentially) by a TMA read, an add and a TMA write."""
    if io.interpret:
        io.copy((target, stage_smem))
        stage_smem[...] = stage_smem[...] + value
    else:
        stage_smem[...] = value
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(stage_smem, target, reduction_op=None if io.interpret else "add")
    plgpu.wait_smem_to_gmem(0)  # the stage is reused by the next add


def _backward_kernel(query, out_grad, lse, out_dot, key, keys_t, value_t, runway_query_rows,
                     runway_lse, summary, runway_keys, runway_keys_t, values, values_t,
                     query_segments, key_segments, row_positions, key_ranges, beta, row_terms,
                     summary_grad, *outputs, plan_, runway, runway_span, scale, cap, groups,
                     group, key_pass, interpret, s):
    """One program of pass GQ (``key_pass=False``) or GK, see the module docstring; ``s``: the
    scratch refs by name. ``row_terms``/``summary_grad``: GK's inputs ``delta``, ``du`` of this
    head group (zero but for group 0: the terms that are not linear in ``d rho``)."""
    batch, query_block = lax.axis_index("batch"), lax.axis_index("query_block")
    head_group = lax.axis_index("head_group")
    first_head, kv_heads, width = head_group * group, keys_t.shape[1], query.shape[-1]
    bq, bk = plan_.block_q, plan_.block_k
    tile, rows_shape, keys_shape = (bq, bk), (bq, width), (bk, width)
    rows = pl.ds(query_block * bq, bq)
    exact = runway_span == "exact"
    s = dict(s, keys_f32=s.get("keys_f32", s["rows_f32"]))
    if key_pass and not exact:
        s["summary_grad"] = s["left"]  # unused by the prefix span
    io = _Loader(s["barrier"].at[0], interpret)
    io.copy((row_positions.at[batch, rows], s["row_ints"]),
            (query_segments.at[batch, rows], s["row_segments"]),
            (key_ranges.at[batch, query_block], s["range"]), (beta, s["beta"]))
    positions, segments = io.read(s["row_ints"], _ROW), io.read(s["row_segments"], _ROW)
    beta_value = s["beta"][0]
    zeros = lambda shape: io.full(shape, 0.0, _LAYOUT if len(shape) == 2 else _ROW)
    if runway:
        io.copy((runway_lse.at[batch, rows], s["row_stat"]),
                (summary.at[batch, rows], s["rows_f32"]))
        if exact or key_pass:  # the runway head's logits
            io.copy((runway_query_rows.at[batch, rows], s["runway_rows"]))
        runway_row_lse = io.read(s["row_stat"], _ROW)
        summary_rows = io.read(s["rows_f32"], _LAYOUT)  # u_I, eq. (3b)
        if not exact:
            _stage(summary_rows, s["summary"])
        if key_pass:
            io.copy((row_terms.at[batch, head_group, rows], s["row_stat"]),
                    (summary_grad.at[batch, head_group, rows], s["rows_f32"]))
            delta = io.read(s["row_stat"], _ROW)
            if not exact:
                _stage(io.read(s["rows_f32"], _LAYOUT), s["summary_grad"])  # du_I

    def runway_tile(visible, distance, earlier, need_probs):
        """``(A_IJ, rho_IJ, slope)`` as the forward pass forms them (eq. (3b)); not
        ``tile_math.runway_tile_recompute``, whose products are ``lax.dot_general``s, which
        Mosaic GPU lowers only as WGMMA with SMEM operands."""
        probs = slope = None
        if need_probs:
            logits = scale * _mma(s["runway_rows"], s["runway_keys_t"], tile)
            logits, slope = tile_math.soft_cap_and_slope(logits, cap)
            probs = jnp.where(visible, jnp.exp(logits - _rows(runway_row_lse, tile)), 0.0)
        if not exact:
            return probs, jnp.where(visible, scale * _mma(s["summary"], s["runway_keys_t"],
                                                          tile), 0.0), slope
        within = _mma(s["values"], s["runway_keys_t"], (bk, bk))  # <w_k, z_j>, [k, j]
        _stage(jnp.where(io.iota((bk, bk), 0) <= io.iota((bk, bk), 1), within, 0.0),
               s["square"])
        _stage(summary_rows - earlier, s["left"])
        _stage(probs, s["probs"])
        rho = _mma(s["left"], s["runway_keys_t"], tile) - _mma(s["probs"], s["square"], tile)
        return probs, jnp.where(visible & (distance >= 2), scale * rho, 0.0), slope

    def head_tiles(cols, visible, rho):
        """Every head's ``(P, dS~)`` (as ``tile_math.head_backward_tile``), its products added
        to ``dq`` (GQ) or ``dk``, ``dv`` (GK) at once; returns ``sum_h dS~^h``."""
        ds_sum = zeros(tile)
        for h in range(group):
            head = first_head + h
            kv_head = jnp.minimum(lax.div(head, groups), kv_heads - 1)  # padded heads
            io.copy((query.at[batch, head, rows], s["query"]),
                    (out_grad.at[batch, head, rows], s["out_grad"]),
                    (keys_t.at[batch, kv_head, :, cols], s["keys_t"]),
                    (value_t.at[batch, kv_head, :, cols], s["values_t"]),
                    (lse.at[batch, head, rows], s["head_lse"]),
                    (out_dot.at[batch, head, rows], s["head_out_dot"]))
            logits = scale * _mma(s["query"], s["keys_t"], tile)
            if rho is not None:
                logits = logits - beta_value * rho
            logits, slope = tile_math.soft_cap_and_slope(logits, cap)
            probs = jnp.where(visible, jnp.exp(logits - _rows(io.read(s["head_lse"], _ROW),
                                                              tile)), 0.0)
            dprobs = _mma(s["out_grad"], s["values_t"], tile)  # dO V^T
            ds = probs * (dprobs - _rows(io.read(s["head_out_dot"], _ROW), tile))
            ds = ds if slope is None else ds * slope  # through the cap, eq. (7c)
            ds_sum = ds_sum + ds
            if key_pass:
                dv_tile = _mma(_stage_transposed(probs, s["tile_t"], interpret), s["out_grad"],
                               keys_shape)
                _add_to(io, dv_tile, s["keys_f32"], outputs[1].at[batch, kv_head, cols])
                dk_tile = scale * _mma(_stage_transposed(ds, s["tile_t"], interpret),
                                       s["query"], keys_shape)
                _add_to(io, dk_tile, s["keys_f32"], outputs[0].at[batch, kv_head, cols])
            else:
                io.copy((key.at[batch, kv_head, cols], s["keys"]))
                _stage(ds, s["probs"])
                _add_to(io, scale * _mma(s["probs"], s["keys"], rows_shape), s["rows_f32"],
                        outputs[0].at[batch, head, rows])
        return ds_sum

    def runway_backward(distance, probs, drho, slope, earlier, prefix_sum, d_runway_query,
                        cols):
        """Eq. (3d) on one tile, the products of ``tile_math.runway_backward_tile`` as WGMMAs:
        ``dA``, then ``dz``, ``dw``, ``dk^r`` added to GMEM and ``dq^r`` to its registers."""
        d_runway_key, dz, dw = outputs[2:5]
        before = distance >= 1  # k < i: A_ii is on no runway
        strict_probs = jnp.where(before, probs, 0.0)
        j_index, k_index = io.iota((bk, bk), 0), io.iota((bk, bk), 1)
        if exact:
            # dA_ik = c <w_k, R_i(k)>, R_i(k) = R_I + sum_{j in J, j < k} d rho_ij z_j.
            key_value = _mma(s["runway_keys"], s["values_t"], (bk, bk))  # <z_j, w_k>, [j, k]
            _stage(jnp.where(j_index < k_index, key_value, 0.0), s["square"])
            _stage(prefix_sum, s["left"])
            _stage(drho, s["probs"])
            dprobs = scale * (_mma(s["left"], s["values_t"], tile)
                              + _mma(s["probs"], s["square"], tile))
            # dz_j = c sum_i d rho_ij (u_i - P_i(j)), P_i(j) = S_i + sum_{k in J, k <= j} A_ik w_k.
            drho_t = _stage_transposed(drho, s["tile_t"], interpret)
            _stage(summary_rows - earlier, s["left"])
            _stage(probs, s["probs"])
            _stage(jnp.where(k_index <= j_index, _mma(drho_t, s["probs"], (bk, bk)), 0.0),
                   s["square"])
            dz_tile = scale * (_mma(drho_t, s["left"], keys_shape)
                               - _mma(s["square"], s["values"], keys_shape))
            # dw_k = c sum_{i > k} A_ik R_i(k).
            strict_t = _stage_transposed(strict_probs, s["tile_t"], interpret)
            _stage(prefix_sum, s["left"])
            _stage(drho, s["probs"])
            _stage(jnp.where(k_index < j_index, _mma(strict_t, s["probs"], (bk, bk)), 0.0),
                   s["square"])  # [k, j]
            dw_tile = scale * (_mma(strict_t, s["left"], keys_shape)
                               + _mma(s["square"], s["runway_keys"], keys_shape))
        else:  # R_i(k) -> du_i / c, u_i - P_i(j) -> u_i
            dprobs = jnp.where(before, _mma(s["summary_grad"], s["values_t"], tile), 0.0)
            dz_tile = scale * _mma(_stage_transposed(drho, s["tile_t"], interpret), s["summary"],
                                   keys_shape)
            dw_tile = _mma(_stage_transposed(strict_probs, s["tile_t"], interpret),
                           s["summary_grad"], keys_shape)
        dprobs = jnp.where(before, dprobs, 0.0)
        dlogits = probs * (dprobs - _rows(delta, tile))  # the runway head's softmax backward
        dlogits = dlogits if slope is None else dlogits * slope  # through the cap, eq. (7b)
        _stage(dlogits, s["probs"])
        d_runway_query = d_runway_query + scale * _mma(s["probs"], s["runway_keys"], rows_shape)
        key_tile = scale * _mma(_stage_transposed(dlogits, s["tile_t"], interpret),
                                s["runway_rows"], keys_shape)
        for value, target in ((key_tile, d_runway_key), (dz_tile, dz), (dw_tile, dw)):
            _add_to(io, value, s["keys_f32"], target.at[batch, cols])
        return d_runway_query

    def step(key_block, carry):
        earlier, prefix_sum, row_sums = carry  # GQ: rho_dot, du; GK: dq^r
        cols = pl.ds(key_block * bk, bk)
        io.copy((key_segments.at[batch, cols], s["key_segments"]))
        visible, distance = _masks(io, plan_, positions, segments, key_block,
                                   io.read(s["key_segments"], _COL))
        rho = probs = slope = None
        if runway:
            io.copy((runway_keys_t.at[batch, :, cols], s["runway_keys_t"]))
            if key_pass or not exact:
                io.copy((runway_keys.at[batch, cols], s["runway_keys"]))
            if exact:
                io.copy((values.at[batch, cols], s["values"]))
            probs, rho, slope = runway_tile(visible, distance, earlier, exact or key_pass)
        ds_sum = head_tiles(cols, visible, rho)  # rho shared by the group's heads
        if not runway:
            return carry
        drho = tile_math.defined_drho([(None, ds_sum)], visible, distance,
                                      runway_span=runway_span, beta=beta_value)
        if key_pass:
            io.copy((values_t.at[batch, :, cols], s["values_t"]))  # W^T (V^T is done)
            row_sums = runway_backward(distance, probs, drho, slope, earlier, prefix_sum,
                                       row_sums, cols)
        else:
            rho_dot, summary_grad_rows = row_sums
            rho_dot = rho_dot + (rho * ds_sum).sum(axis=1)
            if not exact:
                _stage(drho, s["probs"])
                summary_grad_rows = summary_grad_rows + scale * _mma(
                    s["probs"], s["runway_keys"], rows_shape)
            row_sums = (rho_dot, summary_grad_rows)
        if exact:  # S_I += A_IJ W_J; R_I += d rho_IJ Z_J
            _stage(probs, s["probs"])
            earlier = earlier + _mma(s["probs"], s["values"], rows_shape)
            if key_pass:
                _stage(drho, s["probs"])
                prefix_sum = prefix_sum + _mma(s["probs"], s["runway_keys"], rows_shape)
        return earlier, prefix_sum, row_sums

    row_sums = zeros(rows_shape) if key_pass else (zeros((bq,)), zeros(rows_shape))
    carry = (zeros(rows_shape), zeros(rows_shape), row_sums)
    _, _, row_sums = lax.fori_loop(s["range"][0], s["range"][1], step, carry)
    if key_pass:
        s["rows_f32"][...] = row_sums
    else:
        s["rows_f32"][...] = row_sums[1]
        s["row_stat"][...] = row_sums[0]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(s["rows_f32"], outputs[-1].at[batch, head_group, rows])
    if not key_pass:
        plgpu.copy_smem_to_gmem(s["row_stat"], outputs[-2].at[batch, head_group, rows])
    plgpu.wait_smem_to_gmem(0)


def _scratch(plan_, width, dtype, *, key_pass, exact, interpret):
    """The SMEM of one pass: only the tiles it uses (the budget, module docstring); the
    prefix span's ``du`` lives in ``left`` (unused there) and, for ``Bq = Bk``, the key-side
    float32 stage in ``rows_f32``."""
    bq, bk, f32, i32 = plan_.block_q, plan_.block_k, jnp.float32, jnp.int32
    rows, keys, keys_t = _operand((bq, width), dtype), _operand((bk, width), dtype), _operand(
        (width, bk), dtype)
    tiles = dict(query=rows, out_grad=rows, keys_t=keys_t, values_t=keys_t, runway_keys_t=keys_t,
                 probs=_operand((bq, bk), dtype), rows_f32=_operand((bq, width), f32))
    if exact:
        tiles.update(left=rows, values=keys, square=_operand((bk, bk), dtype))
    else:
        tiles.update(summary=rows, runway_keys=keys)
    if key_pass:
        tiles.update(runway_rows=rows, runway_keys=keys, left=rows,
                     tile_t=_transposed_operand((bq, bk), dtype, interpret))
        if bk != bq:
            tiles.update(keys_f32=_operand((bk, width), f32))
    else:
        tiles.update(keys=keys)
        if exact:
            tiles.update(runway_rows=rows)
    return dict(tiles, row_stat=plgpu.SMEM((bq,), f32), head_lse=plgpu.SMEM((bq,), f32),
                head_out_dot=plgpu.SMEM((bq,), f32), row_ints=plgpu.SMEM((bq,), i32),
                row_segments=plgpu.SMEM((bq,), i32), key_segments=plgpu.SMEM((bk,), i32),
                range=plgpu.SMEM((_SCALARS,), i32), beta=plgpu.SMEM((_SCALARS,), f32),
                barrier=plgpu.Barrier(num_barriers=1))


def _run(kernel, inputs, accumulators, out_type, *, scratch, grid, interpret):
    """``pl.kernel`` on a Mosaic GPU mesh: ``accumulators`` are mutable GMEM Refs (aliased in
    and out, see the module docstring), the scratch refs reach ``kernel`` as ``s=`` by name."""
    def body(*refs):
        pl.run_scoped(lambda **scoped: kernel(*refs, s=scoped), **scratch)

    return pl.kernel(body, out_type=out_type,
                     mesh=plgpu.Mesh(grid=grid, grid_names=("batch", "query_block", "head_group")),
                     interpret=forward_kernels.interpret_params() if interpret else False,
                     )(*inputs, *accumulators)


def _zeros_ref(shape):
    return jax.new_ref(jnp.zeros(shape, jnp.float32), memory_space=plgpu.GMEM)


def _pad_heads(x, multiple, value=0.0):
    extra = -x.shape[1] % multiple
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def backward(query, key, value, runway_query, runway_key, segment_ids, query_segments,
             runway_query_rows, runway_key_rows, offsets, out, lse, runway_lse, summary,
             out_grad, *, plan, beta, runway_coefficient, runway_span, scale, cap=None,
             runway=None, heads_per_program=None, interpret=False):
    """METHOD (3d) on Hopper: float32 ``(dq, dk, dv, d runway_query, d runway_key, d beta)`` in
    kernel layout, as :func:`runway_jax.kernels.gpu.backward` returns them, from the inputs and
    residuals of :func:`runway_jax.kernels.mosaic_gpu.forward`. ``heads_per_program`` (None:
    all) rewired heads share each rho tile; they are padded with zero heads to a multiple of it
    (zero queries and output gradients, infinite lse: their P and dS~ are exactly zero)."""
    forward_kernels._check(plan, query, interpret)
    runway = tiling.runs_runway_head(beta) if runway is None else runway
    del runway_key_rows  # A_ii is not needed: u is a residual
    # Under jit: the gradient buffers are mutable Refs, which exist only inside a jit.
    return _backward(query, key, value, runway_query, runway_key, segment_ids, query_segments,
                     runway_query_rows, offsets, out, lse, runway_lse, summary, out_grad,
                     jnp.asarray(beta, jnp.float32), plan=plan, runway=bool(runway),
                     runway_coefficient=runway_coefficient, runway_span=runway_span,
                     scale=float(scale), cap=cap, heads_per_program=heads_per_program,
                     interpret=bool(interpret))


@functools.partial(jax.jit, static_argnames=(
    "plan", "runway", "runway_coefficient", "runway_span", "scale", "cap", "heads_per_program",
    "interpret"))
def _backward(query, key, value, runway_query, runway_key, segment_ids, query_segments,
              runway_query_rows, offsets, out, lse, runway_lse, summary, out_grad, beta, *,
              plan, runway, runway_coefficient, runway_span, scale, cap, heads_per_program,
              interpret):
    real_heads, kv_heads = query.shape[1], key.shape[1]
    group = forward_kernels.head_group(real_heads, heads_per_program)
    f32 = jnp.float32
    out_dot = jnp.sum(out_grad.astype(f32) * out.astype(f32), axis=-1)  # rowsum(dO o)
    query, out_dot = _pad_heads(query, group), _pad_heads(out_dot, group)
    out_grad = _pad_heads(out_grad.astype(query.dtype), group)  # a WGMMA operand beside V
    lse = _pad_heads(lse[..., 0], group, value=float("inf"))
    batch, heads, padded, width = query.shape
    groups_count = heads // group
    bilinear = runway_coefficient == "bilinear"
    values = (runway_query if bilinear else runway_key).astype(runway_key.dtype)
    inputs = [query, out_grad, lse, out_dot, key, jnp.swapaxes(key, 2, 3),
              jnp.swapaxes(value, 2, 3).astype(query.dtype), runway_query_rows,
              runway_lse[..., 0], summary, runway_key, jnp.swapaxes(runway_key, 1, 2), values,
              jnp.swapaxes(values, 1, 2), query_segments, segment_ids,
              layouts.row_positions(offsets, plan), forward_kernels._key_range(plan, offsets),
              jnp.full((_SCALARS,), beta, f32)]
    options = dict(plan_=plan, runway=runway, runway_span=runway_span, scale=scale, cap=cap,
                   groups=real_heads // kv_heads, group=group, interpret=bool(interpret))
    run = functools.partial(_run, grid=(batch, plan.num_query_blocks, groups_count),
                            interpret=interpret)
    scratch = functools.partial(_scratch, plan, width, query.dtype, exact=runway_span == "exact",
                                interpret=interpret)
    row_stats = jnp.zeros((batch, groups_count, padded), f32)
    row_vectors = jnp.zeros((batch, groups_count, padded, width), f32)

    dq = _zeros_ref(query.shape)
    rho_dot, summary_grad = run(
        functools.partial(_backward_kernel, **options, key_pass=False),
        inputs + [row_stats, row_vectors], [dq],
        [jax.ShapeDtypeStruct(row_stats.shape, f32), jax.ShapeDtypeStruct(row_vectors.shape, f32)],
        scratch=scratch(key_pass=False))
    rho_dot, summary_grad = rho_dot.sum(axis=1), summary_grad.sum(axis=1)
    # Terms not linear in d rho (-A delta; for the prefix span all that du drives) come from
    # group 0 only; every group adds its own heads' part of the rest.
    delta = row_stats.at[:, 0].set(-beta * rho_dot)  # sum_j d rho_ij rho_ij
    summary_grad_groups = row_vectors.at[:, 0].set(summary_grad)

    accumulators = [_zeros_ref(key.shape), _zeros_ref(value.shape)] + [
        _zeros_ref(runway_key.shape) for _ in range(3)]
    d_runway_query_rows = run(
        functools.partial(_backward_kernel, **options, key_pass=True),
        inputs + [delta, summary_grad_groups], accumulators,
        jax.ShapeDtypeStruct(row_vectors.shape, f32), scratch=scratch(key_pass=True))
    dk, dv, d_runway_key, dz, dw = (ref[...] for ref in accumulators)
    return layouts.runway_gradients(dq[...][:, :real_heads], dk, dv,
                                    d_runway_query_rows.sum(axis=1), d_runway_key, dz, dw,
                                    rho_dot, offsets, plan=plan,
                                    runway_coefficient=runway_coefficient)
