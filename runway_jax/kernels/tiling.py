"""Block sizes and the plan of one kernel call: how the padded query and key sequences are cut
into tiles, and which tiles run (METHOD (7)).

Query row r of batch row b sits at key position ``offsets[b] + r`` (fewer queries than keys,
bottom-right aligned; per-row ``key_value_seq_lengths``). A query block needs the key blocks from
the first its rows' window reaches to the last at or below its last row
(:func:`query_block_key_range`), and the key-major backward pass the same tiles from the other
side (:func:`key_block_query_range`). Every kernel visits only those tiles, and the cost model
(:mod:`runway_jax.kernels.cost_model`) counts only those. The range helpers work on Python ints
(grid sizes) and on traced values inside kernels alike.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


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

    @classmethod
    def mosaic_gpu_default(cls) -> "BlockSizes":
        """64 x 64 tiles (WGMMA's smallest M, and a 128-byte swizzle row of bfloat16), two rewired
        heads per program: at d = 128 the forward's shared memory fits at most four heads' queries
        beside the key tiles, and one warpgroup's registers hold about two heads' float32
        accumulators (see :mod:`runway_jax.kernels.mosaic_gpu`); the backward fits any group.
        Lowered for CUDA at T=4096, H=16, d=128 bf16; not timed on hardware."""
        return cls(block_q=64, block_k=64, heads_per_program=2)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Block sizes fitted to one call and the static facts the tiles depend on.

    ``query_length`` rows ``Tq`` are the last ``Tq`` of ``key_length`` positions ``Tk`` (METHOD
    (7); with ``ragged`` the per-row lengths ``key_value_seq_lengths`` are only known at run time,
    as the per-row offsets of :func:`runway_jax.kernels.layouts.to_kernel_layout`). Queries are
    padded to a multiple of ``block_q``, keys to a multiple of ``block_k``. ``window`` is
    ``local_window_size`` (eq. (7a)) or ``None``.
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


def _fitted_block(block, length, min_block):
    """``block`` shrunk to the next power of two >= T, but not below ``min_block``."""
    return max(min_block, min(block, 1 << (max(length, 1) - 1).bit_length()))


def plan(length: int, block_sizes: BlockSizes, *, key_length: int | None = None,
         window: int | None = None, ragged: bool = False, min_block: int = 8) -> Plan:
    """Shrink the blocks for short sequences and pad to whole blocks (METHOD (6), item 6: any
    T >= 1). ``length`` is the number of query rows, ``key_length`` that of keys (default: the
    same); with equal lengths both are padded alike, as one sequence. ``min_block``: the smallest
    block a target's tiles allow (8 sublanes on TPU; 64 rows for Hopper's WGMMA)."""
    key_length = length if key_length is None else key_length
    block_q = _fitted_block(block_sizes.block_q, length, min_block)
    block_k = _fitted_block(block_sizes.block_k, key_length, min_block)
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
