"""What the TPU and GPU kernels share: block sizes, the padded head-major layout, the per-tile
mathematics of METHOD eqs. (3b)-(3c), and the cost model of a call.

The tile functions here are pure ``jnp`` over values (no refs), so the same code runs inside a
Mosaic TPU kernel, inside a Triton GPU kernel and in the pure-``jnp`` reference twin
(:mod:`runway_jax.kernels.reference`). Row statistics are kept as ``[Bq, 1]`` columns
(``keepdims``) so that no kernel needs 1-D vectors.

Shape letters: B batch, H rewired (query) heads, K key/value heads, G = H // K, Tqp / Tkp padded
query / key lengths, Bq query block, Bk key block, d head width. Kernel layouts are head-major:
queries ``[B, H, Tqp, d]``, keys and values ``[B, K, Tkp, d]``, runway arrays ``[B, Tkp, d]`` and
their per-row copies ``[B, Tqp, d]`` (:class:`KernelInputs`).

Which tiles run (METHOD (7)): query row r of batch row b sits at position ``offsets[b] + r``; a
query block needs the key blocks from the first its rows' window reaches to the last at or below
its last row (:func:`query_block_key_range`), and the key-major backward pass the same tiles
from the other side (:func:`key_block_query_range`). The kernels visit only those tiles, and the
cost model counts only those (:func:`tiles_that_run`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from runway_jax.masking import MASK_VALUE


def _is_power_of_two(value) -> bool:
    return isinstance(value, int) and value >= 1 and value & (value - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the fused kernels; validated on construction.

    ``block_q`` / ``block_k``: query and key rows per tile (powers of two, >= 8: Triton needs
    powers of two and Mosaic needs multiples of the 8 sublanes). Short sequences shrink both to the
    next power of two >= T, so T = 1 costs one 8-row tile, not a 128-row one.
    ``heads_per_program``: rewired heads one GPU program serves (they share one rho tile, METHOD
    (3c)); ``None`` means all heads. The TPU kernel always serves all heads of a query block.
    ``num_warps`` / ``num_stages``: Triton launch parameters (GPU only).
    """

    block_q: int = 128
    block_k: int = 128
    heads_per_program: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not (_is_power_of_two(value) and value >= 8):
                raise ValueError(f"BlockSizes: {name}={value!r} must be a power of two >= 8.")
        if self.heads_per_program is not None and not (
                isinstance(self.heads_per_program, int) and self.heads_per_program >= 1):
            raise ValueError(
                f"BlockSizes: heads_per_program={self.heads_per_program!r} must be a positive int "
                "or None (all heads).")
        for name in ("num_warps", "num_stages"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"BlockSizes: {name}={value!r} must be a positive int.")

    @classmethod
    def tpu_default(cls) -> "BlockSizes":
        """128 x 128 tiles: one MXU pass per product on every TPU generation."""
        return cls(block_q=128, block_k=128)

    @classmethod
    def gpu_default(cls) -> "BlockSizes":
        """16 x 16 tiles, one head per program, 4 warps, 1 stage: chosen from the compile report
        (``benchmarks/gpu_compile.py``: XLA's Triton to PTX, then ``ptxas``, at T=4096, H=16,
        d=128, bf16) as the only setting measured that fits a program's shared memory on both
        sm_80 (163 KiB) and sm_90 (227 KiB) and nearly never spills (4.3 KB over the four passes;
        255 registers). The earlier 64 x 64 tiles with two heads per program needed 208-626 KiB
        of shared memory in three of the four passes, so they could not launch; 32 x 32 tiles fit
        but spill 6-69 KB. The cause is the float32 runway products (``Precision.HIGHEST``
        becomes FMA loops, not tensor-core MMAs) and the backward key pass's float32 state; with
        one head per program rho is formed once per head (METHOD (3c): ~3.5x the FLOPs of
        standard attention). Not timed on hardware (none was available)."""
        return cls(block_q=16, block_k=16, heads_per_program=1, num_warps=4, num_stages=1)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Block sizes fitted to one call and the static facts the tiles depend on.

    ``query_length`` rows ``Tq`` are the last ``Tq`` of ``key_length`` positions ``Tk`` (METHOD
    (7); with ``ragged`` the per-row lengths ``key_value_seq_lengths`` are only known at run time,
    as the per-row offsets of :func:`to_kernel_layout`). Queries are padded to a multiple of
    ``block_q``, keys to a multiple of ``block_k``. ``window`` is ``local_window_size`` (eq. (7a))
    or ``None``.
    """

    query_length: int
    key_length: int
    block_q: int
    block_k: int
    padded_query_length: int
    padded_key_length: int
    window: int | None = None
    ragged: bool = False

    @property
    def length(self) -> int:
        return self.query_length

    @property
    def padded_length(self) -> int:
        """The padded query length (the rows of outputs and row statistics)."""
        return self.padded_query_length

    @property
    def num_query_blocks(self) -> int:
        return self.padded_query_length // self.block_q

    @property
    def num_key_blocks(self) -> int:
        return self.padded_key_length // self.block_k

    @property
    def key_steps(self) -> int:
        """Static bound on the key blocks one query block sees: all of them for causal attention;
        with a window w the ``Bq + w`` keys of a query block span at most
        ``(Bq + w - 2) // Bk + 2`` key blocks (the TPU grid's key axis has this length)."""
        if self.window is None:
            return self.num_key_blocks
        return min(self.num_key_blocks, (self.block_q + self.window - 2) // self.block_k + 2)

    @property
    def query_steps(self) -> int:
        """Static bound on the query blocks that see one key block (the key-major backward)."""
        if self.window is None:
            return self.num_query_blocks
        return min(self.num_query_blocks, (self.block_k + self.window - 2) // self.block_q + 2)

    @property
    def aligned(self) -> bool:
        """Query row r sits at position r (no offset): row and key layouts coincide."""
        return not self.ragged and self.query_length == self.key_length


def _fitted_block(block, length):
    return min(block, max(8, 1 << (max(length, 1) - 1).bit_length()))  # next power of two >= T


def plan(length: int, block_sizes: BlockSizes, *, key_length: int | None = None,
         window: int | None = None, ragged: bool = False) -> Plan:
    """Shrink the blocks for short sequences and pad to whole blocks (METHOD (6), item 6: any
    T >= 1). ``length`` is the number of query rows, ``key_length`` that of keys (default: the
    same); with equal lengths both are padded alike, as one sequence."""
    key_length = length if key_length is None else key_length
    block_q = _fitted_block(block_sizes.block_q, length)
    block_k = _fitted_block(block_sizes.block_k, key_length)
    if key_length == length:
        multiple = max(block_q, block_k)  # powers of two: the larger is a multiple of the smaller
        padded_query = padded_key = -(-length // multiple) * multiple
    else:
        padded_query = -(-length // block_q) * block_q
        padded_key = -(-key_length // block_k) * block_k
    return Plan(length, key_length, block_q, block_k, padded_query, padded_key, window, ragged)


def _is_static(*values) -> bool:
    return all(isinstance(v, int) for v in values)


def _div(a, b):
    """``a // b`` for ``a >= 0``; on traced ints ``lax.div``: jnp's floor division lowers through
    sign(), which Mosaic can only lower knowing the TPU generation (unknown when exporting from a
    CPU host)."""
    return a // b if _is_static(a) else jax.lax.div(a, jnp.int32(b))


def _max(a, b):
    return max(a, b) if _is_static(a, b) else jnp.maximum(a, b)


def _min(a, b):
    return min(a, b) if _is_static(a, b) else jnp.minimum(a, b)


def _select(condition, a, b):
    return (a if condition else b) if isinstance(condition, bool) else jnp.where(condition, a, b)


def key_block_range(first_position, last_position, plan_: Plan):
    """``(first, last)`` key blocks that rows at positions ``first_position..last_position`` see
    (causal and window, eq. (7a)); ``last < first`` when they see nothing (``last_position < 0``).
    Works on Python ints (the cost model) and traced int32 scalars (grids, index maps, loops)."""
    last = _select(last_position >= 0, _div(_max(last_position, 0), plan_.block_k), -1)
    if plan_.window is None:
        return 0, last
    return _div(_max(first_position - plan_.window, 0), plan_.block_k), last


def query_block_key_range(query_block, offset, plan_: Plan):
    """:func:`key_block_range` of query block ``query_block`` whose row r sits at position
    ``offset + r`` (only the real rows ``r < Tq`` count)."""
    first_row = query_block * plan_.block_q
    last_row = _min(first_row + plan_.block_q, plan_.query_length) - 1
    last_position = _select(last_row >= first_row, offset + last_row, -1)
    return key_block_range(offset + first_row, last_position, plan_)


def key_block_query_range(key_block, offset, plan_: Plan):
    """``(first, last)`` query blocks with a row that sees a key of block ``key_block`` (the
    key-major twin of :func:`query_block_key_range`: the same tiles); ``last < first``: none."""
    first_key = key_block * plan_.block_k
    last_key = first_key + plan_.block_k - 1
    low = _max(first_key - offset, 0)  # rows at or after the block's first key
    high = plan_.query_length - 1
    if plan_.window is not None:  # rows whose window still reaches the block's last key
        high = _min(last_key + plan_.window - offset, high)
    first = _div(low, plan_.block_q)
    return first, _select(high >= low, _div(_max(high, 0), plan_.block_q), first - 1)


def static_offset(plan_: Plan) -> int:
    """The offset of row 0 when it is the same for every batch row (no ``ragged`` lengths)."""
    return plan_.key_length - plan_.query_length


# --------------------------------------------------------------------------------------------
# Layout: [B, T, ...] token-major (the public API) <-> padded head-major (the kernels).
# --------------------------------------------------------------------------------------------


def pad_length(x, padded_length, axis=1):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, padded_length - x.shape[axis])
    return jnp.pad(x, widths)


class KernelInputs(NamedTuple):
    """The kernels' padded inputs. Key side ``[.., Tkp, ..]``: ``key``, ``value``
    ``[B, K, Tkp, d]``, ``runway_query``, ``runway_key`` ``[B, Tkp, d]`` (w and z of every key
    position) and ``segment_ids`` ``[B, Tkp]``. Row side ``[.., Tqp, ..]``: ``query``
    ``[B, H, Tqp, d]`` and, at each query row's position, ``query_segments`` ``[B, Tqp]``,
    ``runway_query_rows`` and ``runway_key_rows`` ``[B, Tqp, d]`` (the runway head's own query,
    and its key for ``A_ii``).
    ``offsets`` ``[B]`` int32: row r of batch row b sits at position ``offsets[b] + r`` (eq. (7)).
    """

    query: jax.Array
    key: jax.Array
    value: jax.Array
    runway_query: jax.Array
    runway_key: jax.Array
    segment_ids: jax.Array
    query_segments: jax.Array
    runway_query_rows: jax.Array
    runway_key_rows: jax.Array
    offsets: jax.Array


def query_offsets(batch, plan_: Plan, key_value_seq_lengths=None):
    """``[B]`` int32 position of query row 0: ``L_b - Tq`` (METHOD (7)), negative when the row has
    fewer keys than there are queries (those rows see nothing)."""
    if key_value_seq_lengths is None:
        return jnp.full((batch,), static_offset(plan_), jnp.int32)
    return jnp.asarray(key_value_seq_lengths, jnp.int32) - plan_.query_length


def at_rows(x, offsets, plan_: Plan):
    """``x`` ``[B, Tk, ...]`` at each query row's position, padded: ``[B, Tqp, ...]`` (rows that
    sit at no real position read position 0; they see nothing, so it does not matter)."""
    if not plan_.ragged:
        x = x[:, static_offset(plan_):]
    else:
        rows = offsets[:, None] + jnp.arange(plan_.query_length, dtype=jnp.int32)[None]
        index = jnp.clip(rows, 0, x.shape[1] - 1).reshape(rows.shape + (1,) * (x.ndim - 2))
        x = jnp.take_along_axis(x, index, axis=1)
    return pad_length(x, plan_.padded_query_length)


def rows_to_keys(row_values, offsets, plan_: Plan):
    """The transpose of :func:`at_rows`: ``[B, Tqp, d]`` per-row values (e.g. the runway head's
    ``dq^r``) added at their rows' positions, ``[B, Tkp, d]``."""
    row_values = row_values[:, : plan_.query_length]
    if not plan_.ragged:
        start = static_offset(plan_)
        return pad_length(jnp.pad(row_values, ((0, 0), (start, 0), (0, 0))),
                          plan_.padded_key_length)
    rows = offsets[:, None] + jnp.arange(plan_.query_length, dtype=jnp.int32)[None]
    real = (rows >= 0)[..., None]
    batch = jnp.arange(row_values.shape[0])[:, None]
    out = jnp.zeros((row_values.shape[0], plan_.padded_key_length) + row_values.shape[2:],
                    row_values.dtype)
    return out.at[batch, jnp.clip(rows, 0, plan_.key_length - 1)].add(
        jnp.where(real, row_values, 0.0))


def to_kernel_layout(query, key, value, runway_query, runway_key, segment_ids, plan_: Plan,
                     key_value_seq_lengths=None) -> KernelInputs:
    """Pad and move heads before time: ``[B, T, H, d] -> [B, H, Tp, d]``; the per-row runway
    arrays and segment ids read at the rows' positions (see :class:`KernelInputs`).

    Padded key positions come after every real position (and positions ``>= L_b`` after row b's
    last query), so causality hides them; padded query rows sit at position -1 and see nothing.
    """
    offsets = query_offsets(query.shape[0], plan_, key_value_seq_lengths)
    if segment_ids is None:
        segment_ids = jnp.zeros(key.shape[:2], jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    return KernelInputs(
        query=jnp.swapaxes(pad_length(query, plan_.padded_query_length), 1, 2),  # [B, H, Tqp, d]
        key=jnp.swapaxes(pad_length(key, plan_.padded_key_length), 1, 2),  # [B, K, Tkp, d]
        value=jnp.swapaxes(pad_length(value, plan_.padded_key_length), 1, 2),
        runway_query=pad_length(runway_query, plan_.padded_key_length),  # [B, Tkp, d]
        runway_key=pad_length(runway_key, plan_.padded_key_length),
        segment_ids=pad_length(segment_ids, plan_.padded_key_length),  # [B, Tkp]
        query_segments=at_rows(segment_ids, offsets, plan_),  # [B, Tqp]
        runway_query_rows=at_rows(runway_query, offsets, plan_),  # [B, Tqp, d]
        runway_key_rows=at_rows(runway_key, offsets, plan_),
        offsets=offsets)


def row_positions(offsets, plan_: Plan):
    """``[B, Tqp]`` int32 position of every (padded) query row; -1 for padded rows."""
    rows = jnp.arange(plan_.padded_query_length, dtype=jnp.int32)[None]
    return jnp.where(rows < plan_.query_length, offsets[:, None] + rows, -1)


def from_kernel_layout(out, length):
    """``[B, H, Tp, d] -> [B, T, H, d]``."""
    return jnp.swapaxes(out, 1, 2)[:, :length]


# --------------------------------------------------------------------------------------------
# Tile mathematics, shared by every kernel and the reference twin.
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Cost model of one call (METHOD (3c)), for pl.CostEstimate and the CPU benchmark.
# --------------------------------------------------------------------------------------------


def tiles_that_run(plan_: Plan) -> int:
    """Tiles the kernels compute: for each query block the key blocks from the first its window
    reaches to the last at or below the diagonal (:func:`query_block_key_range`; the key blocks
    outside are skipped by the grids and loops, not masked). With ragged per-row lengths the
    count for full-length rows, an upper bound."""
    offset = static_offset(plan_)
    count = 0
    for query_block in range(plan_.num_query_blocks):
        first, last = query_block_key_range(query_block, offset, plan_)
        count += max(0, last - first + 1)
    return count


def computed_tiles(length, block_q=128, block_k=128, *, window=None, query_length=None):
    """``(tiles, plan)``: the tiles a call computes (:func:`tiles_that_run`), padded as a call
    is; ``length`` keys, ``query_length`` (default ``length``) query rows, ``window`` the
    ``local_window_size``."""
    plan_ = plan(length if query_length is None else query_length,
                 BlockSizes(block_q=block_q, block_k=block_k), key_length=length, window=window)
    return tiles_that_run(plan_), plan_


def forward_cost(batch, length, heads, kv_heads, width, itemsize, *, runway_span, block_q=128,
                 block_k=128, runway=True, head_groups=1, window=None, query_length=None,
                 soft_cap=False):
    """``(flops, transcendentals, hbm_bytes)`` of the two forward pallas_calls (METHOD (3c)).

    Per computed tile (:func:`tiles_that_run`: a window skips the key blocks outside it) the
    rewired heads cost ``2 H Bq Bk d`` multiply-adds (QK^T and PV); the runway head adds
    ``5 Bq Bk d`` in the main pass for the exact span (logits, ``(u - S) z^T``,
    ``A triu(W Z^T)`` and ``W Z^T`` with ``Bk = d``, ``A W``), 1 for the prefix span (``u z^T``),
    and ``2 Bq Bk d`` in its statistics pass. HBM traffic: every query block reads the key-side
    blocks it needs (K, V of all key/value heads, runway key and w, segment ids) once; queries,
    outputs and the per-row float32 statistics are read or written once. ``runway=False``
    (``beta = 0``) drops all runway terms. ``head_groups``: how many programs per query block
    split the heads and each re-form rho (1 on TPU; ``H / heads_per_program`` on GPU), which
    multiplies the main pass's runway terms. ``soft_cap``: one more tanh per logit.
    """
    plan_ = plan(length if query_length is None else query_length,
                 BlockSizes(block_q=block_q, block_k=block_k), key_length=length, window=window)
    return plan_forward_cost(batch, plan_, heads, kv_heads, width, itemsize,
                             runway_span=runway_span,
                             runway=runway, head_groups=head_groups, soft_cap=soft_cap)


def plan_forward_cost(batch, plan_, heads, kv_heads, width, itemsize, *, runway_span, runway=True,
                      head_groups=1, soft_cap=False):
    """:func:`forward_cost` of a call planned as ``plan_``."""
    tiles = tiles_that_run(plan_)
    tile = plan_.block_q * plan_.block_k
    runway_products = (5 if runway_span == "exact" else 1) * head_groups + 2 if runway else 0
    flops = 2 * tiles * tile * width * (2 * heads + runway_products)
    exponentials = heads + (head_groups + 1 if runway else 0)
    transcendentals = tiles * tile * exponentials * (2 if soft_cap else 1)
    key_side = plan_.block_k * (2 * kv_heads * width * itemsize + 4
                                + (2 * width * itemsize * head_groups if runway else 0))
    per_token = 2 * heads * width * itemsize + 4 * heads  # q read, out written, lse written
    if runway:
        # statistics pass: its own key-side reads, rows of q^r, k^r, w; u and lse^r written,
        # then read again by the main pass.
        key_side += plan_.block_k * (2 * width * itemsize + 4)
        per_token += 3 * width * itemsize + 2 * (4 * width + 4)
    hbm_bytes = tiles * key_side + plan_.padded_query_length * per_token
    return batch * flops, batch * transcendentals, batch * hbm_bytes


def backward_cost(batch, length, heads, kv_heads, width, itemsize, *, runway_span, block_q=128,
                  block_k=128, head_groups=1, window=None, query_length=None, soft_cap=False):
    """Backward model: a fused flash-style backward (METHOD (3d)) recomputes the forward's tile
    products and adds the gradient products, about 2.5x the forward FLOPs in all as for
    FlashAttention-2, and moves about twice the forward's bytes (gradients written, dO read).
    The kernels here recompute the tiles in both backward passes, so they do somewhat more."""
    flops, transcendentals, hbm_bytes = forward_cost(
        batch, length, heads, kv_heads, width, itemsize, runway_span=runway_span, block_q=block_q,
        block_k=block_k, head_groups=head_groups, window=window, query_length=query_length,
        soft_cap=soft_cap)
    return int(2.5 * flops), 2 * transcendentals, 2 * hbm_bytes


def runway_statistics_cost(batch, plan_, width, itemsize, soft_cap=False):
    """``(flops, transcendentals, hbm_bytes)`` of the statistics pass alone (logits and A w)."""
    tiles = tiles_that_run(plan_)
    tile = plan_.block_q * plan_.block_k
    hbm_bytes = (tiles * plan_.block_k * (2 * width * itemsize + 4)
                 + plan_.padded_query_length * (3 * width * itemsize + 4 * width + 4))
    return (batch * 4 * tiles * tile * width, batch * tiles * tile * (2 if soft_cap else 1),
            batch * hbm_bytes)


def cost_estimate(pl_module, batch, heads, kv_heads, width, itemsize, *, plan_, runway_span=None,
                  runway=True, statistics_pass=False, head_groups=1, soft_cap=False):
    """``pl.CostEstimate`` of one pallas_call: the statistics pass, or the main pass (the whole
    forward minus the statistics pass)."""
    stats = runway_statistics_cost(batch, plan_, width, itemsize, soft_cap)
    if statistics_pass:
        flops, transcendentals, hbm_bytes = stats
    else:
        flops, transcendentals, hbm_bytes = plan_forward_cost(
            batch, plan_, heads, kv_heads, width, itemsize, runway_span=runway_span, runway=runway,
            head_groups=head_groups, soft_cap=soft_cap)
        if runway:
            flops, transcendentals, hbm_bytes = (a - b for a, b in zip(
                (flops, transcendentals, hbm_bytes), stats))
    return pl_module.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                                  bytes_accessed=int(hbm_bytes))


def backward_pass_estimate(pl_module, batch, heads, kv_heads, width, itemsize, *, plan_,
                           runway_span, runway=True, key_pass, head_groups=1, soft_cap=False):
    """``pl.CostEstimate`` of one backward pallas_call (METHOD (3d)), per computed tile in units
    of ``Bq Bk d`` multiply-adds. Query pass: the heads' ``QK^T``, ``dO V^T``, ``dS K`` (3H), the
    runway recomputation (5 exact / 1 prefix, plus its logits) and ``d rho`` terms (2). Key pass:
    the heads' ``QK^T``, ``dO V^T``, ``dS^T Q``, ``P^T dO`` (4H), the runway recomputation and
    the runway gradients (``dA``, ``dz``, ``dw``, ``dq^r``, ``dk^r``, prefixes: about 10); the
    runway terms once per head group (see :func:`forward_cost`)."""
    tiles = tiles_that_run(plan_)
    tile = plan_.block_q * plan_.block_k
    recompute = (6 if runway_span == "exact" else 2) if runway else 0
    runway_units = recompute + (10 if key_pass else 2) if runway else 0
    units = (4 if key_pass else 3) * heads + runway_units * head_groups
    _, _, forward_bytes = plan_forward_cost(batch, plan_, heads, kv_heads, width, itemsize,
                                            runway_span=runway_span, runway=runway,
                                            head_groups=head_groups)
    exponentials = heads + (head_groups if runway else 0)
    return pl_module.CostEstimate(
        flops=int(batch * 2 * tiles * tile * width * units),
        transcendentals=int(batch * tiles * tile * exponentials * (2 if soft_cap else 1)),
        bytes_accessed=int(2 * forward_bytes))  # dO read and f32 gradients written on top


def standard_attention_cost(batch, length, heads, kv_heads, width, itemsize, block_q=128,
                            block_k=128, window=None):
    """``(flops, hbm_bytes)`` of standard causal flash attention forward, counted the same way."""
    flops, _, hbm_bytes = forward_cost(batch, length, heads, kv_heads, width, itemsize,
                                       runway_span="prefix", block_q=block_q, block_k=block_k,
                                       runway=False, window=window)
    return flops, hbm_bytes


def scale_as_float(scale, width):
    """The kernels bake the logit scale in as a constant: it must be a concrete number."""
    if scale is None:
        return 1.0 / math.sqrt(width)
    if isinstance(scale, jax.core.Tracer):
        raise ValueError(
            "rewired_attention: a traced scale is not supported by the pallas kernels; pass a "
            "Python float or use implementation='xla'.")
    return float(scale)


def runs_runway_head(beta) -> bool:
    """Whether the kernels run the runway head: always, except for ``beta`` the Python number 0
    (standard attention, METHOD (6) invariant 1). A traced or array ``beta`` may be anything at
    run time, so it always runs."""
    return not (isinstance(beta, (int, float)) and beta == 0)


def runway_gradients(dq, dk, dv, d_runway_query_rows, d_runway_key, dz, dw, rho_dot, offsets, *,
                     plan, runway_coefficient):
    """The backward kernels' outputs put together: ``(dq, dk, dv, d runway_query, d runway_key,
    d beta)``, the runway gradients on the key side ``[B, Tkp, d]``.

    The runway query of a row's own position gets ``dq^r`` (row side, moved to the key side),
    the key-indexed terms ``dz`` go to ``runway_key`` and ``dw`` to whichever array is w (eq.
    (2)); ``d beta = -sum_i rho_dot_i`` with ``rho_dot_i = sum_j rho_ij sum_h dS~^h_ij``
    (``d s~ / d beta = -rho``, METHOD (7)).
    """
    d_runway_query = rows_to_keys(d_runway_query_rows, offsets, plan)
    d_runway_key = d_runway_key + dz
    if runway_coefficient == "bilinear":
        d_runway_query = d_runway_query + dw
    else:
        d_runway_key = d_runway_key + dw
    return dq, dk, dv, d_runway_query, d_runway_key, -jnp.sum(rho_dot)


# --------------------------------------------------------------------------------------------
# Backward tile mathematics (METHOD (3d)).
# --------------------------------------------------------------------------------------------


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
