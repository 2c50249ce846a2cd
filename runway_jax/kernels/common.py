"""What the TPU and GPU kernels share: block sizes, the padded head-major layout, the per-tile
mathematics of METHOD eqs. (3b)-(3c), and the cost model of a call.

The tile functions here are pure ``jnp`` over values (no refs), so the same code runs inside a
Mosaic TPU kernel, inside a Triton GPU kernel and in the pure-``jnp`` reference twin
(:mod:`runway_jax.kernels.reference`). Row statistics are kept as ``[Bq, 1]`` columns
(``keepdims``) so that no kernel needs 1-D vectors.

Shape letters: B batch, H rewired (query) heads, K key/value heads, G = H // K, Tp padded length,
Bq query block, Bk key block, d head width. Kernel layouts are head-major: queries ``[B, H, Tp, d]``,
keys and values ``[B, K, Tp, d]``, runway arrays ``[B, Tp, d]``.
"""

from __future__ import annotations

import dataclasses
import math

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
    """Block sizes fitted to one call: ``Bq``, ``Bk``, padded length ``Tp`` and block counts."""

    length: int
    block_q: int
    block_k: int
    padded_length: int

    @property
    def num_query_blocks(self) -> int:
        return self.padded_length // self.block_q

    @property
    def num_key_blocks(self) -> int:
        return self.padded_length // self.block_k


def plan(length: int, block_sizes: BlockSizes) -> Plan:
    """Shrink the blocks for short sequences and pad T to a multiple of both (METHOD (6), item 6:
    any T >= 1)."""
    fitted = max(8, 1 << (max(length, 1) - 1).bit_length())  # next power of two >= T, >= 8
    block_q = min(block_sizes.block_q, fitted)
    block_k = min(block_sizes.block_k, fitted)
    multiple = max(block_q, block_k)  # both powers of two: the larger is a multiple of the smaller
    return Plan(length, block_q, block_k, -(-length // multiple) * multiple)


def last_key_block(query_block_index, plan_: Plan):
    """Index of the last key block a causal query block sees (works on traced ints)."""
    last_row = (query_block_index + 1) * plan_.block_q - 1
    if isinstance(last_row, int):
        return last_row // plan_.block_k
    # lax.div, not //: jnp's floor division lowers through sign(), which Mosaic can only lower
    # knowing the TPU generation (unknown when exporting from a CPU host). Operands are >= 0.
    return jax.lax.div(last_row, jnp.int32(plan_.block_k))


# --------------------------------------------------------------------------------------------
# Layout: [B, T, ...] token-major (the public API) <-> padded head-major (the kernels).
# --------------------------------------------------------------------------------------------


def pad_length(x, padded_length, axis=1):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, padded_length - x.shape[axis])
    return jnp.pad(x, widths)


def to_kernel_layout(query, key, value, runway_query, runway_key, segment_ids, plan_: Plan):
    """Pad T to ``Tp`` and move heads before time: ``[B, T, H, d] -> [B, H, Tp, d]``.

    Padded positions come after every real token, so causality already hides them from real
    queries; padded queries see themselves (segment 0 on the diagonal), so no row is empty.
    """
    tp = plan_.padded_length
    query = jnp.swapaxes(pad_length(query, tp), 1, 2)  # [B, H, Tp, d]
    key = jnp.swapaxes(pad_length(key, tp), 1, 2)  # [B, K, Tp, d]
    value = jnp.swapaxes(pad_length(value, tp), 1, 2)
    runway_query = pad_length(runway_query, tp)  # [B, Tp, d]
    runway_key = pad_length(runway_key, tp)
    if segment_ids is None:
        segment_ids = jnp.zeros(query.shape[:1] + (plan_.length,), jnp.int32)
    segment_ids = pad_length(segment_ids.astype(jnp.int32), tp)  # [B, Tp]
    return query, key, value, runway_query, runway_key, segment_ids


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


def tile_masks(query_positions, key_positions, query_segments, key_segments):
    """``visible`` (causal, same segment; METHOD eq. (5)) and ``distance = i - j`` of one tile.

    Positions and segments are ``[Bq, 1]`` and ``[1, Bk]`` (or already broadcast ``[Bq, Bk]``).
    """
    distance = query_positions - key_positions
    visible = (distance >= 0) & (query_segments == key_segments)
    return visible, distance


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


def runway_logits(runway_query_rows, runway_key_block, scale):
    """``s^r_IJ = scale * q^r_I (k^r_J)^T``, float32 ``[Bq, Bk]`` (METHOD eq. (1))."""
    return scale * dot(runway_query_rows, runway_key_block, transpose_b=True)


def runway_summary(weighted_values, runway_lse, runway_query_rows, runway_key_rows, own_values,
                   scale):
    """``u_i = P_i(i-1) = (A w)_i - A_ii w_i`` (METHOD eq. (3b)): the runway head's causal output
    with values w minus its diagonal term, ``A_ii = exp(s_ii - lse_i)`` taken elementwise from the
    same statistics (not a renormalized strictly-causal pass)."""
    diagonal_logit = scale * jnp.sum(
        runway_query_rows.astype(jnp.float32) * runway_key_rows.astype(jnp.float32),
        axis=1, keepdims=True)
    diagonal_prob = jnp.exp(diagonal_logit - runway_lse)
    return weighted_values - diagonal_prob * own_values.astype(jnp.float32)


def runway_coefficients_tile(probs, summary, earlier, values_block, keys_block, visible, distance,
                             *, span, scale):
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
    if span == "prefix":
        return jnp.where(visible, scale * dot(summary, keys_block, transpose_b=True), 0.0)
    within = dot(values_block, keys_block, transpose_b=True)  # [Bk(k), Bk(j)] <w_k, z_j>
    k_index = jax.lax.broadcasted_iota(jnp.int32, within.shape, 0)
    j_index = jax.lax.broadcasted_iota(jnp.int32, within.shape, 1)
    within = jnp.where(k_index <= j_index, within, 0.0)
    rho = dot(summary - earlier, keys_block, transpose_b=True) - dot(probs, within)
    return jnp.where(visible & (distance >= 2), scale * rho, 0.0)


def rewired_logits(query_rows, key_block, rho, *, beta, scale):
    """``s~^h_IJ = scale * q^h_I (k^h_J)^T - beta * rho_IJ`` (METHOD eq. (3)), float32."""
    return scale * dot(query_rows, key_block, transpose_b=True) - beta * rho


# --------------------------------------------------------------------------------------------
# Cost model of one call (METHOD (3c)), for pl.CostEstimate and the CPU benchmark.
# --------------------------------------------------------------------------------------------


def computed_tiles(length, block_q=128, block_k=128):
    """Tiles at or below the diagonal, the ones a causal kernel computes (padded as a call is)."""
    plan_ = plan(length, BlockSizes(block_q=block_q, block_k=block_k))
    return sum(last_key_block(i, plan_) + 1 for i in range(plan_.num_query_blocks)), plan_


def forward_cost(batch, length, heads, kv_heads, width, itemsize, *, span, block_q=128,
                 block_k=128, runway=True, head_groups=1):
    """``(flops, transcendentals, hbm_bytes)`` of the two forward pallas_calls (METHOD (3c)).

    Per computed tile the rewired heads cost ``2 H Bq Bk d`` multiply-adds (QK^T and PV); the
    runway head adds ``5 Bq Bk d`` in the main pass for the exact span (logits, ``(u - S) z^T``,
    ``A triu(W Z^T)`` and ``W Z^T`` with ``Bk = d``, ``A W``), 1 for the prefix span (``u z^T``),
    and ``2 Bq Bk d`` in its statistics pass. HBM traffic: every query block reads the key-side
    blocks it needs (K, V of all key/value heads, runway key and w, segment ids) once; queries,
    outputs and the per-row float32 statistics are read or written once. ``runway=False``
    (``beta = 0``) drops all runway terms. ``head_groups``: how many programs per query block
    split the heads and each re-form rho (1 on TPU; ``H / heads_per_program`` on GPU), which
    multiplies the main pass's runway terms.
    """
    tiles, plan_ = computed_tiles(length, block_q, block_k)
    tile = plan_.block_q * plan_.block_k
    runway_products = (5 if span == "exact" else 1) * head_groups + 2 if runway else 0
    flops = 2 * tiles * tile * width * (2 * heads + runway_products)
    transcendentals = tiles * tile * (heads + (head_groups + 1 if runway else 0))
    key_side = plan_.block_k * (2 * kv_heads * width * itemsize + 4
                                + (2 * width * itemsize * head_groups if runway else 0))
    per_token = 2 * heads * width * itemsize + 4 * heads  # q read, out written, lse written
    if runway:
        # statistics pass: its own key-side reads, rows of q^r, k^r, w; u and lse^r written,
        # then read again by the main pass.
        key_side += plan_.block_k * (2 * width * itemsize + 4)
        per_token += 3 * width * itemsize + 2 * (4 * width + 4)
    hbm_bytes = tiles * key_side + plan_.padded_length * per_token
    return batch * flops, batch * transcendentals, batch * hbm_bytes


def backward_cost(batch, length, heads, kv_heads, width, itemsize, *, span, block_q=128,
                  block_k=128, head_groups=1):
    """Backward model: a fused flash-style backward (METHOD (3d)) recomputes the forward's tile
    products and adds the gradient products, about 2.5x the forward FLOPs in all as for
    FlashAttention-2, and moves about twice the forward's bytes (gradients written, dO read).
    The kernels here recompute the tiles in both backward passes, so they do somewhat more."""
    flops, transcendentals, hbm_bytes = forward_cost(
        batch, length, heads, kv_heads, width, itemsize, span=span, block_q=block_q,
        block_k=block_k, head_groups=head_groups)
    return int(2.5 * flops), 2 * transcendentals, 2 * hbm_bytes


def runway_statistics_cost(batch, plan_, width, itemsize):
    """``(flops, transcendentals, hbm_bytes)`` of the statistics pass alone (logits and A w)."""
    tiles = sum(last_key_block(i, plan_) + 1 for i in range(plan_.num_query_blocks))
    tile = plan_.block_q * plan_.block_k
    hbm_bytes = (tiles * plan_.block_k * (2 * width * itemsize + 4)
                 + plan_.padded_length * (3 * width * itemsize + 4 * width + 4))
    return batch * 4 * tiles * tile * width, batch * tiles * tile, batch * hbm_bytes


def cost_estimate(pl_module, batch, heads, kv_heads, width, itemsize, *, plan_, span=None,
                  runway=True, statistics_pass=False, head_groups=1):
    """``pl.CostEstimate`` of one pallas_call: the statistics pass, or the main pass (the whole
    forward minus the statistics pass)."""
    stats = runway_statistics_cost(batch, plan_, width, itemsize)
    if statistics_pass:
        flops, transcendentals, hbm_bytes = stats
    else:
        flops, transcendentals, hbm_bytes = forward_cost(
            batch, plan_.padded_length, heads, kv_heads, width, itemsize, span=span,
            block_q=plan_.block_q, block_k=plan_.block_k, runway=runway, head_groups=head_groups)
        if runway:
            flops, transcendentals, hbm_bytes = (a - b for a, b in zip(
                (flops, transcendentals, hbm_bytes), stats))
    return pl_module.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                                  bytes_accessed=int(hbm_bytes))


def backward_pass_estimate(pl_module, batch, heads, kv_heads, width, itemsize, *, plan_, span,
                           runway=True, key_pass, head_groups=1):
    """``pl.CostEstimate`` of one backward pallas_call (METHOD (3d)), per computed tile in units
    of ``Bq Bk d`` multiply-adds. Query pass: the heads' ``QK^T``, ``dO V^T``, ``dS K`` (3H), the
    runway recomputation (5 exact / 1 prefix, plus its logits) and ``d rho`` terms (2). Key pass:
    the heads' ``QK^T``, ``dO V^T``, ``dS^T Q``, ``P^T dO`` (4H), the runway recomputation and
    the runway gradients (``dA``, ``dz``, ``dw``, ``dq^r``, ``dk^r``, prefixes: about 10); the
    runway terms once per head group (see :func:`forward_cost`)."""
    tiles, _ = computed_tiles(plan_.padded_length, plan_.block_q, plan_.block_k)
    tile = plan_.block_q * plan_.block_k
    recompute = (6 if span == "exact" else 2) if runway else 0
    runway_units = recompute + (10 if key_pass else 2) if runway else 0
    units = (4 if key_pass else 3) * heads + runway_units * head_groups
    _, _, forward_bytes = forward_cost(batch, plan_.padded_length, heads, kv_heads, width,
                                       itemsize, span=span, block_q=plan_.block_q,
                                       block_k=plan_.block_k, runway=runway, head_groups=head_groups)
    return pl_module.CostEstimate(
        flops=int(batch * 2 * tiles * tile * width * units),
        transcendentals=int(batch * tiles * tile * (heads + (head_groups if runway else 0))),
        bytes_accessed=int(2 * forward_bytes))  # dO read and f32 gradients written on top


def standard_attention_cost(batch, length, heads, kv_heads, width, itemsize, block_q=128,
                            block_k=128):
    """``(flops, hbm_bytes)`` of standard causal flash attention forward, counted the same way."""
    flops, _, hbm_bytes = forward_cost(batch, length, heads, kv_heads, width, itemsize,
                                       span="prefix", block_q=block_q, block_k=block_k,
                                       runway=False)
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


# --------------------------------------------------------------------------------------------
# Backward tile mathematics (METHOD (3d)).
# --------------------------------------------------------------------------------------------


def head_backward_tile(query_rows, key_block, value_block, out_grad_rows, lse_rows, out_dot_rows,
                       rho, visible, *, beta, scale):
    """One head's flash-attention backward on a tile of ``s~ = scale q k^T - beta rho``.

    Returns ``(P, dS~)`` float32 ``[Bq, Bk]``: ``P = exp(s~ - lse)`` (zero where not visible) and
    ``dS~ = P (dO V^T - rowsum(dO o))``; then ``dq = scale dS~ K``, ``dk = scale dS~^T Q``,
    ``dv = P^T dO`` and ``d rho = -beta sum_h dS~^h`` (METHOD (3d)).
    """
    logits = rewired_logits(query_rows, key_block, rho, beta=beta, scale=scale)
    probs = jnp.where(visible, jnp.exp(logits - lse_rows), 0.0)
    dprobs = dot(out_grad_rows, value_block, transpose_b=True)
    return probs, probs * (dprobs - out_dot_rows)


def runway_backward_tile(probs, drho, distance, values_block, keys_block, *, span, scale,
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
    if span == "prefix":
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
