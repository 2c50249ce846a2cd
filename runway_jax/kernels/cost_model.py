"""The cost model of one kernel call (METHOD (3c)): FLOPs, transcendentals and HBM bytes of the
tiles that run, for ``pl.CostEstimate`` and the benchmarks' ratios to standard attention.
"""

from __future__ import annotations

from runway_jax.kernels import tiling


def tiles_that_run(plan_: tiling.Plan) -> int:
    """Tiles the kernels compute: for each query block the key blocks from the first its window
    reaches to the last at or below the diagonal
    (:func:`runway_jax.kernels.tiling.query_block_key_range`; the key blocks outside are skipped
    by the grids and loops, not masked). With ragged per-row lengths the count for full-length
    rows, an upper bound."""
    offset = tiling.static_offset(plan_)
    count = 0
    for query_block in range(plan_.num_query_blocks):
        first, last = tiling.query_block_key_range(query_block, offset, plan_)
        count += max(0, last - first + 1)
    return count


def computed_tiles(length, block_q=128, block_k=128, *, window=None, query_length=None):
    """``(tiles, plan)``: the tiles a call computes (:func:`tiles_that_run`), padded as a call
    is; ``length`` keys, ``query_length`` (default ``length``) query rows, ``window`` the
    ``local_window_size``."""
    plan_ = tiling.plan(length if query_length is None else query_length,
                        tiling.BlockSizes(block_q=block_q, block_k=block_k), key_length=length,
                        window=window)
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
    plan_ = tiling.plan(length if query_length is None else query_length,
                        tiling.BlockSizes(block_q=block_q, block_k=block_k), key_length=length,
                        window=window)
    return plan_forward_cost(batch, plan_, heads, kv_heads, width, itemsize,
                             runway_span=runway_span, runway=runway, head_groups=head_groups,
                             soft_cap=soft_cap)


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
