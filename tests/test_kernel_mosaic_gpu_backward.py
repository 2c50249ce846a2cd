"""The Mosaic GPU backward kernels (runway_jax.kernels.mosaic_gpu_backward), METHOD (3d): the
Mosaic GPU interpreter on CPU against autodiff of METHOD's direct evaluation and the reference
twin, and the forward + backward lowered for CUDA (sm_90) from this CPU host at training
shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from method_direct import direct
from runway_jax.kernels import layouts, mosaic_gpu, mosaic_gpu_backward, reference, tiling
from test_attention import make_inputs, make_segments
from test_kernel_mosaic_gpu import BLOCKS, WIDTH

NAMES = ["query", "key", "value", "runway_query", "runway_key"]

# (coefficient, span, batch, T, H, H_kv, blocks, heads_per_program, segments): both spans, both
# coefficient kinds, GQA, segments, T not a block multiple (150: three query and key blocks, so
# the exact span's prefixes S and R run across blocks), two head groups whose runway terms must
# add up, heads padded to a multiple of the group, Bq != Bk, T = 1.
CASES = {
    "exact-bilinear-gqa-segments-3-blocks-2-groups": ("bilinear", "exact", 1, 150, 4, 2, BLOCKS,
                                                      2, True),
    "prefix-dot-gqa-segments-padded-heads": ("dot", "prefix", 2, 19, 4, 2, BLOCKS, 3, True),
    "exact-dot-unequal-blocks": ("dot", "exact", 1, 100, 2, 2,
                                 tiling.BlockSizes(block_q=128, block_k=64), None, False),
    "prefix-bilinear-T1": ("bilinear", "prefix", 2, 1, 2, 1, BLOCKS, None, False),
}


def kernel_layout_grad(cotangent, plan):
    """``[B, Tq, H, d]`` output gradient -> kernel layout ``[B, H, Tqp, d]``."""
    return layouts.pad_length(jnp.swapaxes(cotangent, 1, 2), plan.padded_query_length, axis=2)


def public_grads(grads, query_length, key_length):
    """Kernel-layout ``(dq, dk, dv, d runway_query, d runway_key, d beta)`` -> public layout."""
    dq, dk, dv, d_runway_query, d_runway_key, d_beta = grads
    return (layouts.from_kernel_layout(dq, query_length),
            layouts.from_kernel_layout(dk, key_length), layouts.from_kernel_layout(dv, key_length),
            d_runway_query[:, :key_length], d_runway_key[:, :key_length], d_beta)


def rewired(plan, segments, lengths=None, *, runway=None, forward_heads=None,
            backward_heads=None, interpret=True, **options):
    """``f(q, k, v, rq, rk, beta) -> out`` (public layout): the Mosaic GPU forward, and the
    backward under test as its ``custom_vjp`` rule (d beta included)."""

    def forward(q, k, v, rq, rk, beta):
        arrays = layouts.to_kernel_layout(q, k, v, rq, rk, segments, plan, lengths)
        residuals = mosaic_gpu.forward(*arrays, plan=plan, beta=beta, runway=runway,
                                       heads_per_program=forward_heads, interpret=interpret,
                                       **options)
        out = layouts.from_kernel_layout(residuals[0], q.shape[1])
        return out, (arrays, residuals, beta)

    def backward(saved, cotangent):
        arrays, residuals, beta = saved
        grads = mosaic_gpu_backward.backward(
            *arrays, *residuals, kernel_layout_grad(cotangent, plan), plan=plan, beta=beta,
            runway=runway, heads_per_program=backward_heads, interpret=interpret, **options)
        grads = public_grads(grads, plan.query_length, plan.key_length)
        return tuple(g.astype(x.dtype) for g, x in zip(grads[:5], arrays[:5])) + (grads[5],)

    attention = jax.custom_vjp(lambda *a: forward(*a)[0])
    attention.defvjp(forward, backward)
    return attention


def kernel_and_twin_grads(inputs, segments, *, blocks=BLOCKS, beta=0.8, coefficient, span,
                          heads_per_program=None, window=None, cap=None, lengths=None, seed=0):
    """The kernel backward and the reference twin's on the kernel forward's residuals, both in
    kernel layout, with a random output gradient (zero on padded rows)."""
    query, key = inputs[0], inputs[1]
    plan = mosaic_gpu.plan(query.shape[1], blocks, key_length=key.shape[1], window=window,
                           ragged=lengths is not None)
    if segments is None:
        segments = jnp.zeros(key.shape[:2], jnp.int32)
    arrays = layouts.to_kernel_layout(*inputs, segments, plan, lengths)
    options = dict(plan=plan, beta=beta, runway_coefficient=coefficient, runway_span=span,
                   scale=query.shape[-1] ** -0.5, cap=cap)
    residuals = mosaic_gpu.forward(*arrays, heads_per_program=heads_per_program,
                                   interpret=True, **options)
    cotangent = jax.random.normal(jax.random.key(seed), query.shape)
    out_grad = kernel_layout_grad(cotangent, plan)
    got = mosaic_gpu_backward.backward(*arrays, *residuals, out_grad, interpret=True,
                                       heads_per_program=heads_per_program, **options)
    want = jax.vmap(lambda *a: reference.rewired_backward(*a, **options))(*arrays, *residuals,
                                                                          out_grad)
    return got, want[:5] + (want[5].sum(),), cotangent, plan


def assert_close(got, want, relative, names=NAMES + ["beta"]):
    """Every gradient within ``relative`` times its largest magnitude (at least 1)."""
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, name
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        bound = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g / bound, w / bound, atol=relative, rtol=0,
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_gradients_match_direct_evaluation_and_the_twin(case):
    """Invariant 4: all five input gradients and d beta within 1e-5 (relative to their scale)
    of autodiff of eqs. (2)-(3), and of the twin that walks the same tiles."""
    coefficient, span, batch, length, heads, kv_heads, blocks, group, segmented = CASES[case]
    inputs = make_inputs(50, batch, length, heads, kv_heads, WIDTH)
    segments = make_segments(50, batch, length) if segmented else None
    got, want, cotangent, plan = kernel_and_twin_grads(
        inputs, segments, blocks=blocks, coefficient=coefficient, span=span,
        heads_per_program=group, seed=51)
    assert all(g.dtype == jnp.float32 for g in got)
    assert_close(got, want, 1e-5)
    _, direct_vjp = jax.vjp(
        lambda *a: direct(*a[:5], beta=a[5], runway_coefficient=coefficient, runway_span=span,
                          segment_ids=segments)[0], *inputs, jnp.float32(0.8))
    for name, w in zip(NAMES, direct_vjp(cotangent)):
        assert length == 1 or float(jnp.abs(w).max()) > 1e-3, name
    assert_close(public_grads(got, length, length), direct_vjp(cotangent), 1e-5)


def test_bfloat16_within_tolerance():
    """Invariant 4 for bfloat16 inputs (every WGMMA operand in bfloat16), through ``jax.vjp``:
    gradients within 2e-2 (relative to their scale) of float32 math."""
    inputs = make_inputs(52, 2, 70, 2, 1, WIDTH, dtype=jnp.bfloat16)
    plan = mosaic_gpu.plan(70, BLOCKS)
    options = dict(runway_coefficient="bilinear", runway_span="exact", scale=WIDTH ** -0.5)
    attention = rewired(plan, None, **options)
    got, vjp = jax.vjp(attention, *inputs, jnp.float32(1.0))
    want, want_vjp = jax.vjp(lambda *a: direct(
        *a[:5], beta=a[5], runway_coefficient="bilinear", runway_span="exact")[0],
        *inputs, jnp.float32(1.0))
    grads = vjp(jnp.ones(got.shape, jnp.bfloat16))
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 5 + [jnp.float32]
    assert_close(grads, want_vjp(jnp.ones(want.shape, jnp.float32)), 2e-2)


def test_beta_zero_is_standard_attention():
    """Invariant 1: with the runway head skipped (``beta = 0``) the gradients are those of
    standard causal attention."""
    inputs = make_inputs(53, 1, 37, 2, 1, WIDTH)
    segments = make_segments(53, 1, 37)
    attention = rewired(mosaic_gpu.plan(37, BLOCKS), segments, runway=False,
                        runway_coefficient="bilinear", runway_span="exact", scale=WIDTH ** -0.5)
    cotangent = jax.random.normal(jax.random.key(54), inputs[0].shape)
    _, vjp = jax.vjp(attention, *inputs, jnp.float32(0.0))
    _, want_vjp = jax.vjp(lambda *a: direct(*a, beta=0.0, runway_coefficient="bilinear",
                                            runway_span="exact", segment_ids=segments)[0],
                          *inputs)
    assert_close(vjp(cotangent)[:5], want_vjp(cotangent), 1e-5, names=NAMES)


@pytest.mark.parametrize("coefficient,span", [("bilinear", "exact"), ("dot", "prefix")])
def test_options_of_method_7_match_the_twin(coefficient, span):
    """A window, a soft cap and 70 queries over 150 keys with per-row lengths (one row shorter
    than the queries): every gradient equals the twin's."""
    keys = make_inputs(55, 2, 150, 2, 1, WIDTH)
    inputs = [keys[0][:, -70:]] + keys[1:]
    got, want, _, _ = kernel_and_twin_grads(
        inputs, make_segments(55, 2, 150), coefficient=coefficient, span=span, window=50,
        cap=5.0, lengths=jnp.array([150, 60], jnp.int32), seed=56)
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("span", ["exact", "prefix"])
def test_forward_and_backward_lower_for_cuda_at_training_shapes(span):
    """``jax.export`` for ``platforms=[cuda]`` of the loss gradients (d beta included),
    B=4 T=4096 H=16 d=128 bfloat16: the backward with ONE head group (rho once per tile for all
    15 rewired heads; lowering checks the SMEM budget), the forward with two heads per program
    (what its SMEM fits, see test_kernel_mosaic_gpu)."""
    b, t, h, d = 4, 4096, 16, 128
    shape = jax.ShapeDtypeStruct
    args = ([shape((b, t, h, d), jnp.bfloat16)] * 3 + [shape((b, t, d), jnp.bfloat16)] * 2
            + [shape((), jnp.float32), shape((b, t), jnp.int32)])
    plan = mosaic_gpu.plan(t, BLOCKS)

    def loss_gradients(q, k, v, rq, rk, beta, segments):
        attention = rewired(plan, segments, forward_heads=2, interpret=False,
                            runway_coefficient="bilinear", runway_span=span, scale=d ** -0.5)
        loss = lambda *a: attention(*a).astype(jnp.float32).sum()
        return jax.value_and_grad(loss, argnums=range(6))(q, k, v, rq, rk, beta)

    text = jax.export.export(jax.jit(loss_gradients), platforms=["cuda"])(*args).mlir_module()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 4  # two forward, two backward


def test_rejects_what_the_forward_rejects():
    """Blocks and widths that are not WGMMA tiles, and float32 inputs on hardware."""
    small = tiling.plan(19, BLOCKS)  # 32-row blocks: too small for WGMMA
    arrays = layouts.to_kernel_layout(*make_inputs(57, 1, 19, 2, 1, 8), None, small)
    residuals = [jnp.zeros(())] * 4
    options = dict(beta=1.0, runway_coefficient="bilinear", runway_span="exact", scale=1.0)
    backward = functools.partial(mosaic_gpu_backward.backward, *arrays, *residuals,
                                 jnp.zeros(()), **options)
    with pytest.raises(ValueError, match="multiples of 64"):
        backward(plan=small, interpret=True)
    plan = mosaic_gpu.plan(19, BLOCKS)
    arrays = layouts.to_kernel_layout(*make_inputs(57, 1, 19, 2, 1, WIDTH), None, plan)
    with pytest.raises(ValueError, match="interpret mode only"):
        mosaic_gpu_backward.backward(*arrays, *residuals, jnp.zeros(()), plan=plan, **options)


# --------------------------------------------------------------------------------------------
# The kernel as an implementation of the public functions, and its selection.
# --------------------------------------------------------------------------------------------


def test_public_functions_run_it_forward_and_backward():
    """implementation="pallas_mosaic_gpu_interpret" through attention.rewired_attention (the
    custom_vjp, 64-row tiles planned for T = 70, heads padded to the default pairs) equals the
    reference evaluation: output and all five gradients, with segments and GQA."""
    from runway_jax import attention

    inputs = make_inputs(31, 1, 70, 3, 3, WIDTH)
    segments = make_segments(31, 1, 70)

    def run(implementation):
        def loss(*arrays):
            out = attention.rewired_attention(*arrays, segment_ids=segments,
                                              implementation=implementation)
            return jnp.sum(out * jnp.cos(out)), out
        return jax.value_and_grad(loss, argnums=range(5), has_aux=True)(*inputs)

    (_, got), got_grads = run("pallas_mosaic_gpu_interpret")
    (_, want), want_grads = run("reference")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for name, g, w in zip(NAMES, got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=name)


def test_selection(monkeypatch):
    """None on a GPU tries the Mosaic GPU kernel first on Hopper or newer, then the Triton kernel,
    then "xla"; each reason it cannot run a call is one line naming the fix."""
    from runway_jax import attention, kernels

    assert "pallas_mosaic_gpu" in kernels.KERNELS
    assert kernels.default_block_sizes("pallas_mosaic_gpu_interpret").block_q == 64
    assert attention.default_implementations("gpu") == ("pallas_gpu", "xla")  # no GPU here
    assert attention.default_implementations("cpu") == ("xla",)
    monkeypatch.setattr(attention, "_hopper_or_newer", lambda: True)
    assert attention.default_implementations("gpu") == ("pallas_mosaic_gpu", "pallas_gpu", "xla")
    assert attention.default_implementation("gpu") == "pallas_mosaic_gpu"
    why = functools.partial(attention._why_not_runnable, "pallas_mosaic_gpu", unsupported=[])
    assert "multiple of 64" in why(width=96, dtype=jnp.bfloat16)
    assert "needs a GPU" in why(width=128, dtype=jnp.bfloat16)  # the CPU this runs on
    monkeypatch.setattr(attention, "target_backend", lambda: "gpu")
    assert why(width=128, dtype=jnp.bfloat16) is None
    assert "bfloat16 or float16" in why(width=128, dtype=jnp.float32)
    monkeypatch.setattr(attention, "_hopper_or_newer", lambda: False)
    assert "Hopper" in why(width=128, dtype=jnp.bfloat16)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="pallas_mosaic_gpu_interpret"):
        attention.rewired_attention(*make_inputs(3, 1, 8, 2, 2, WIDTH),
                                    implementation="pallas_mosaic_gpu")


def test_benchmark_compile_report_lowers_both_passes_for_cuda():
    """benchmarks/compile.py's Mosaic GPU rows: with the default BlockSizes every variant lowers
    for CUDA (shared memory fits) with 2 kernel calls forward and 4 with the backward, and the
    cost model puts the forward above standard attention's FLOPs, the exact span above prefix."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import compile as compile_benchmark  # benchmarks/compile.py

    rows = compile_benchmark.mosaic_gpu_rows([256], 1, 4, 64)
    assert [row["lowered"] for row in rows] == [True] * 4, rows
    assert [row["kernel_calls"] for row in rows] == [2, 4, 2, 4]
    ratios = {row["variant"]: row["forward_flop_ratio_cost_model"] for row in rows}
    assert ratios["pallas_mosaic_gpu_exact"] > ratios["pallas_mosaic_gpu_prefix"] > 1.0
