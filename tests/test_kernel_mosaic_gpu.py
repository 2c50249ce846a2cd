"""The Mosaic GPU forward kernels (runway_jax.kernels.mosaic_gpu): the Mosaic GPU interpreter on
CPU against METHOD's direct evaluation and the reference twin, and lowering for CUDA (sm_90)
from this CPU host at training shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from method_direct import direct
from runway_jax.kernels import layouts, tiling, mosaic_gpu, reference
from test_attention import make_inputs, make_segments

WIDTH = 64  # WGMMA tiles: the smallest head width and block the kernels take
BLOCKS = tiling.BlockSizes(block_q=64, block_k=64)

# (coefficient, span, batch, T, H, H_kv, blocks, heads_per_program, segments): both spans, both
# coefficient kinds, GQA, segments, T not a block multiple (150: three key blocks, so the exact
# span's prefix S runs across blocks), Bq != Bk, T = 1, heads padded to a multiple of the group.
CASES = {
    "exact-bilinear-gqa-segments-3-blocks": ("bilinear", "exact", 2, 150, 4, 2, BLOCKS, 2, True),
    "prefix-dot-gqa-segments-padded-heads": ("dot", "prefix", 2, 19, 4, 2, BLOCKS, 3, True),
    "exact-dot-unequal-blocks": ("dot", "exact", 1, 100, 2, 2,
                                 tiling.BlockSizes(block_q=128, block_k=64), None, False),
    "prefix-bilinear-T1": ("bilinear", "prefix", 2, 1, 2, 1, BLOCKS, None, False),
}


def kernel_forward(inputs, segments, *, blocks=BLOCKS, beta=0.8, coefficient="bilinear",
                   span="exact", heads_per_program=None, window=None, cap=None, lengths=None,
                   runway=None):
    """Public layout in, ``(out [B, Tq, H, d], kernel outputs, kernel inputs, plan)`` out."""
    query, key = inputs[0], inputs[1]
    plan = mosaic_gpu.plan(query.shape[1], blocks, key_length=key.shape[1], window=window,
                           ragged=lengths is not None)
    if segments is None:
        segments = jnp.zeros(key.shape[:2], jnp.int32)
    arrays = layouts.to_kernel_layout(*inputs, segments, plan, lengths)
    got = mosaic_gpu.forward(*arrays, plan=plan, beta=beta, runway_coefficient=coefficient,
                             runway_span=span, scale=query.shape[-1] ** -0.5, cap=cap,
                             runway=runway, heads_per_program=heads_per_program,
                             interpret=True)
    return layouts.from_kernel_layout(got[0], query.shape[1]), got, arrays, plan


def assert_residuals_equal_the_twin(got, arrays, plan, *, coefficient, span, beta=0.8,
                                    cap=None):
    """out, lse, lse^r and u against the reference twin (the same tiles, the same order)."""
    want = reference.batched_rewired_forward(
        *arrays, plan=plan, beta=beta, runway_coefficient=coefficient, runway_span=span,
        scale=arrays[0].shape[-1] ** -0.5, cap=cap)
    rows = np.arange(plan.padded_query_length) < plan.query_length  # padded rows: anything
    for name, g, w in zip(["out", "lse", "runway_lse", "u"], got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(np.compress(rows, g, axis=-2), np.compress(rows, w, axis=-2),
                                   atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_forward_matches_direct_evaluation_and_the_twin(case):
    """Invariant 4: outputs within 1e-5 of eqs. (2)-(3); residuals equal the twin's."""
    coefficient, span, batch, length, heads, kv_heads, blocks, group, segmented = CASES[case]
    inputs = make_inputs(40, batch, length, heads, kv_heads, WIDTH)
    segments = make_segments(40, batch, length) if segmented else None
    out, got, arrays, plan = kernel_forward(inputs, segments, blocks=blocks,
                                            coefficient=coefficient, span=span,
                                            heads_per_program=group)
    want, _ = direct(*inputs, beta=0.8, runway_coefficient=coefficient, runway_span=span,
                     segment_ids=segments)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
    assert_residuals_equal_the_twin(got, arrays, plan, coefficient=coefficient, span=span)


@pytest.mark.parametrize("coefficient,span", [("bilinear", "exact"), ("dot", "prefix")])
def test_bfloat16_within_tolerance(coefficient, span):
    """Invariant 4 for bfloat16 inputs (the WGMMA operands, rho's included, in bfloat16)."""
    inputs = make_inputs(41, 2, 70, 2, 1, WIDTH, dtype=jnp.bfloat16)
    out, *_ = kernel_forward(inputs, None, beta=1.0, coefficient=coefficient, span=span)
    assert out.dtype == jnp.bfloat16
    want, _ = direct(*inputs, beta=1.0, runway_coefficient=coefficient, runway_span=span)
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=2e-2, rtol=0)


def test_beta_zero_is_standard_attention():
    """Invariant 1: ``beta = 0`` (the runway head skipped) is standard causal attention."""
    inputs = make_inputs(42, 1, 37, 2, 1, WIDTH)
    segments = make_segments(42, 1, 37)
    out, *_ = kernel_forward(inputs, segments, beta=0.0)
    want, _ = direct(*inputs, beta=0.0, runway_coefficient="bilinear", runway_span="exact",
                     segment_ids=segments)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)


def test_options_of_method_7_match_the_twin():
    """A window, a soft cap and 70 queries over 150 keys with per-row lengths (one row shorter
    than the queries): every residual equals the twin's."""
    keys = make_inputs(43, 2, 150, 2, 1, WIDTH)
    inputs = [keys[0][:, -70:]] + keys[1:]
    lengths = jnp.array([150, 60], jnp.int32)
    _, got, arrays, plan = kernel_forward(inputs, make_segments(43, 2, 150), window=50,
                                          cap=5.0, lengths=lengths)
    assert_residuals_equal_the_twin(got, arrays, plan, coefficient="bilinear", span="exact",
                                    cap=5.0)


def test_flop_ratio_to_standard_attention():
    """METHOD (3c): rho once per tile for all 15 rewired heads is about 1.16x standard attention
    at H = 16; one program per head re-forms it (about 3.3x with these tiles)."""
    assert mosaic_gpu.flop_ratio(16, runway_span="exact") == pytest.approx(37 / 32)
    assert mosaic_gpu.flop_ratio(16, runway_span="prefix") == pytest.approx(33 / 32)
    assert mosaic_gpu.flop_ratio(16, heads_per_program=1) == pytest.approx(107 / 32)


def test_plan_takes_wgmma_sized_blocks_and_16_bit_inputs_on_hardware():
    plan = mosaic_gpu.plan(19, tiling.BlockSizes(block_q=16, block_k=8))
    assert (plan.block_q, plan.block_k, plan.padded_query_length) == (64, 64, 64)
    options = dict(beta=1.0, runway_coefficient="bilinear", runway_span="exact", scale=1.0)
    small = tiling.plan(19, BLOCKS)  # 32-row blocks: too small for WGMMA
    with pytest.raises(ValueError, match="multiples of 64"):
        mosaic_gpu.forward(*layouts.to_kernel_layout(*make_inputs(44, 1, 19, 2, 1, 8), None,
                                                    small), plan=small, interpret=True, **options)
    with pytest.raises(ValueError, match="interpret mode only"):  # WGMMA would take tf32
        mosaic_gpu.forward(*layouts.to_kernel_layout(*make_inputs(44, 1, 19, 2, 1, WIDTH), None,
                                                    plan), plan=plan, **options)


@pytest.mark.parametrize("span", ["exact", "prefix"])
def test_lowers_for_cuda_at_training_shapes(span):
    """``jax.export`` for ``platforms=[cuda]`` (Mosaic GPU lowers on the host, no device needed),
    B=4 T=4096 H=16 d=128 bfloat16, two heads per program (what fits an H100's 227 KiB of SMEM
    at d = 128, see the module docstring)."""
    b, t, h, d = 4, 4096, 16, 128
    shape = jax.ShapeDtypeStruct
    args = ([shape((b, t, h, d), jnp.bfloat16)] * 3 + [shape((b, t, d), jnp.bfloat16)] * 2
            + [shape((b, t), jnp.int32)])
    plan = mosaic_gpu.plan(t, BLOCKS)

    def forward(q, k, v, rq, rk, segments):
        arrays = layouts.to_kernel_layout(q, k, v, rq, rk, segments, plan)
        out, *_ = mosaic_gpu.forward(*arrays, plan=plan, beta=1.0,
                                     runway_coefficient="bilinear", runway_span=span,
                                     scale=d ** -0.5, heads_per_program=2)
        return layouts.from_kernel_layout(out, t)

    text = jax.export.export(jax.jit(forward), platforms=["cuda"])(*args).mlir_module()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 2  # the two passes
