"""The fused kernels (pallas_tpu, pallas_gpu) with the options of METHOD (7): local_window_size,
logits_soft_cap, fewer queries than keys (bottom-right), key_value_seq_lengths and a traced beta,
forward and backward, in interpret mode against the direct evaluations of tests/method_direct.py
(float64 spec_loop for outputs, autodiff of direct_options for gradients).

Interpret mode compiles every kernel into a large XLA program, so each case here is one jitted
forward+backward per target and the cases combine options: together they cover every option on
both targets, both spans and both coefficient kinds, GQA, segments and skipped key blocks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from method_direct import direct_options, spec_loop
from runway_jax import attention, kernels
from runway_jax.kernels import cost_model, tiling

# The 8-row-tile kernels; the Mosaic GPU kernel (64-row tiles, d a multiple of 64, a slow
# interpreter) has its own files: tests/test_kernel_mosaic_gpu*.py.
TARGETS = ("pallas_tpu", "pallas_gpu")
NAMES = ("query", "key", "value", "runway_query", "runway_key", "beta")
BLOCKS = tiling.BlockSizes(block_q=8, block_k=8, heads_per_program=2)
WIDTH = 8


def normal(seed, shape, spread=1.0, dtype=jnp.float32):
    """NumPy's generator: no JAX program to compile per shape."""
    return jnp.asarray(spread * np.random.default_rng(seed).standard_normal(shape), dtype)


def make_inputs(seed, batch, queries, keys, heads, kv_heads, dtype=jnp.float32, spread=1.0):
    shapes = [(batch, queries, heads, WIDTH), (batch, keys, kv_heads, WIDTH),
              (batch, keys, kv_heads, WIDTH), (batch, keys, WIDTH), (batch, keys, WIDTH)]
    return [normal(seed * 10 + n, s, spread, dtype) for n, s in enumerate(shapes)]


def two_documents(batch, keys, boundary):
    """Segment ids ``[B, Tk]``: positions ``>= boundary`` are the second document."""
    return np.broadcast_to(np.arange(keys) >= boundary, (batch, keys)).astype(np.int32)


# name: (seed, (B, Tq, Tk, H, H_kv), input dtype and spread, beta, options). Together: a window
# much shorter than T (8 x 8 tiles, whole key blocks skipped), the soft cap, Tq < Tk with and
# without ragged lengths (rows before their first key), segments, GQA, both spans, both
# coefficient kinds, bfloat16.
CASES = {
    # T = 40 in 8 x 8 tiles, window 5: 9 of the 15 causal tiles run.
    "window": (1, (1, 40, 40, 2, 1), (jnp.float32, 1.0), 0.9,
               dict(runway_coefficient="bilinear", runway_span="exact", local_window_size=5)),
    # The last 7 of 21 positions as queries; inputs large enough that the cap bends the logits.
    "soft_cap_fewer_queries": (2, (2, 7, 21, 2, 1), (jnp.float32, 2.0), 1.2,
                               dict(runway_coefficient="dot", runway_span="exact",
                                    logits_soft_cap=1.5)),
    # Lengths [24, 6] with 9 queries: row 1's first 3 queries sit before its first key.
    "ragged_window_cap_segments_gqa": (3, (2, 9, 24, 4, 2), (jnp.float32, 1.0), 0.8,
                                       dict(runway_coefficient="dot", runway_span="prefix",
                                            local_window_size=6, logits_soft_cap=2.5,
                                            segment_ids=two_documents(2, 24, 19),
                                            key_value_seq_lengths=np.array([24, 6], np.int32))),
    "bfloat16": (4, (1, 11, 19, 2, 1), (jnp.bfloat16, 1.0), 1.0,
                 dict(runway_coefficient="bilinear", runway_span="prefix", local_window_size=7,
                      logits_soft_cap=3.0)),
}


@functools.lru_cache(maxsize=None)
def case_inputs(case):
    seed, shape, (dtype, spread), beta, options = CASES[case]
    inputs = make_inputs(seed, *shape, dtype=dtype, spread=spread)
    cotangent = normal(seed + 100, inputs[0].shape)
    return inputs, jnp.float32(beta), cotangent, options


@functools.lru_cache(maxsize=None)
def kernel_forward_and_grads(target, case):
    """One compiled program per target and case: ``(out, (d query, d key, d value,
    d runway_query, d runway_key, d beta))`` of the kernel at the inputs, a traced ``beta`` and a
    cotangent (all arguments, so every test of the case re-uses it)."""
    options = {"segment_ids": None, **case_inputs(case)[3]}

    def run(query, key, value, runway_query, runway_key, beta, cotangent):
        out, vjp = jax.vjp(lambda *a: kernels.rewired_attention(
            *a[:5], beta=a[5], implementation=target + kernels.INTERPRET_SUFFIX,
            block_sizes=BLOCKS, scale=None, **options), query, key, value, runway_query, runway_key, beta)
        return out, vjp(cotangent.astype(out.dtype))
    return jax.jit(run)


@functools.lru_cache(maxsize=None)
def expected(case):
    """The float64 spec loop's output and autodiff of the direct evaluation (all six
    gradients) for the case's inputs and cotangent."""
    inputs, beta, cotangent, options = case_inputs(case)
    want, _ = spec_loop(*inputs, beta=float(beta), **options)

    def grads(*arrays):
        _, vjp = jax.vjp(lambda *a: direct_options(*a[:5], beta=a[5], **options)[0], *arrays)
        return vjp(cotangent)
    return want, jax.jit(grads)(*(x.astype(jnp.float32) for x in inputs), beta)


# --------------------------------------------------------------------------------------------
# Forward and all gradients against the direct evaluation.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c != "bfloat16"])
@pytest.mark.parametrize("target", TARGETS)
def test_forward_and_gradients_match_the_direct_evaluation(target, case):
    """Invariant 4: output within 1e-5 of the float64 spec loop, the five input gradients within
    1e-4 of autodiff of the direct evaluation, and d beta (a traced beta: ``d s~/d beta = -rho``)
    within 1e-4 relative."""
    inputs, beta, cotangent, _ = case_inputs(case)
    out, grads = kernel_forward_and_grads(target, case)(*inputs, beta, cotangent)
    want, want_grads = expected(case)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
    for name, got, wanted in zip(NAMES, grads, want_grads):
        assert float(jnp.abs(wanted).max()) > 1e-2, name  # the case really reaches this input
        np.testing.assert_allclose(got, wanted, atol=1e-4, rtol=1e-4 if name == "beta" else 0,
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("target", TARGETS)
def test_bfloat16_within_tolerance(target):
    """Invariant 4 for bfloat16 inputs: output and gradients within 2e-2 of float32 math, with
    fewer queries than keys, a window and a soft cap; prefix span, bilinear."""
    inputs, beta, cotangent, _ = case_inputs("bfloat16")
    out, grads = kernel_forward_and_grads(target, "bfloat16")(*inputs, beta, cotangent)
    assert out.dtype == jnp.bfloat16
    want, want_grads = expected("bfloat16")
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2, rtol=0)
    for name, got, wanted in zip(NAMES, grads, want_grads):
        assert got.dtype == (jnp.float32 if name == "beta" else jnp.bfloat16), name
        bound = max(1.0, float(jnp.abs(wanted).max()))
        np.testing.assert_allclose(np.asarray(got, np.float32) / bound, wanted / bound,
                                   atol=2e-2, rtol=0, err_msg=f"d{name}")


def test_window_skips_whole_key_blocks():
    """The window case's plan: a key grid of 3 steps instead of 5 key blocks, 9 of the 15 causal
    tiles; the key-major backward visits the same 9."""
    plan = tiling.plan(40, BLOCKS, window=5)
    assert (plan.key_steps, plan.num_key_blocks, plan.query_steps) == (3, 5, 3)
    assert cost_model.tiles_that_run(plan) == 9 < cost_model.computed_tiles(40, 8, 8)[0] == 15
    by_keys = [tiling.key_block_query_range(j, 0, plan) for j in range(plan.num_key_blocks)]
    assert sum(last - first + 1 for first, last in by_keys) == 9


# --------------------------------------------------------------------------------------------
# A traced beta: the compiled gradient against central differences; the public API.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_traced_beta_gradient_equals_finite_differences(target):
    """The window case's jitted vjp with beta as an argument: d <cotangent, out> / d beta equals
    central differences of the same compiled program (METHOD (7): d s~/d beta = -rho)."""
    inputs, beta, cotangent, _ = case_inputs("window")
    run = kernel_forward_and_grads(target, "window")
    loss = lambda b: np.sum(np.float64(cotangent) * run(*inputs, jnp.float32(b), cotangent)[0])
    epsilon = 5e-2
    numeric = (loss(float(beta) + epsilon) - loss(float(beta) - epsilon)) / (2 * epsilon)
    grad = run(*inputs, beta, cotangent)[1][5]
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-3)
    assert abs(float(grad)) > 1e-1  # beta really moves the output


def test_public_api_runs_the_kernel_with_every_option_and_a_traced_beta():
    """``attention.rewired_attention`` passes the window, the soft cap, per-row lengths, segments
    and a traced beta through to the kernel (its default blocks): ``jax.jit(jax.value_and_grad)``
    w.r.t. beta equals the direct evaluation. The dispatch is the same code for both targets, so
    one (the cheaper to interpret) is run."""
    inputs = make_inputs(5, 2, 6, 13, 2, 1)
    options = dict(runway_coefficient="bilinear", runway_span="exact", local_window_size=8,
                   logits_soft_cap=4.0, segment_ids=two_documents(2, 13, 10),
                   key_value_seq_lengths=np.array([13, 9], np.int32))
    weights = normal(6, inputs[0].shape)

    def loss(beta, implementation):
        out = attention.rewired_attention(*inputs, beta=beta, implementation=implementation,
                                          **options)
        return jnp.sum(weights * out)

    value, grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)(0.7, "pallas_gpu_interpret")
    want_value, want_grad = jax.jit(jax.value_and_grad(
        lambda b: jnp.sum(weights * direct_options(*inputs, beta=b, **options)[0])))(0.7)
    np.testing.assert_allclose(value, want_value, rtol=0, atol=1e-4)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# NaN hygiene with the new visibility.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_nan_outside_a_window_or_length_reaches_no_row(target):
    """Invariant 3 with (7), on the ragged case (9 queries over 24 keys, lengths [24, 6], window 6,
    documents [0, 19) and [19, 24), 2 key/value heads for 4 heads). Batch row 0 (rows at 15..23):
    a NaN key of key/value head 0 at 12 reaches the rows at 15..18 in heads 0, 1; a NaN runway
    query at 20 the rows at 20..23. Batch row 1 (rows at -3..5): a NaN value at 10 is padding,
    seen by nobody; an Inf runway key at 1 reaches the rows at 1..5; a NaN query reaches only its
    own row and head. Rows that cannot see a poison equal the clean run, forward and backward."""
    case = "ragged_window_cap_segments_gqa"
    inputs, beta, cotangent, _ = case_inputs(case)
    sees = np.zeros((2, 9, 4), bool)
    sees[0, 0:4, 0:2] = True
    sees[0, 5:9] = True
    sees[1, 4:9] = True
    sees[1, 1, 2] = True
    unseen = jnp.asarray(~sees)
    cotangent = jnp.where(unseen[..., None], cotangent, 0.0)  # a loss over the unseen rows
    run = kernel_forward_and_grads(target, case)
    clean_out, clean_grads = run(*inputs, beta, cotangent)
    bad = [np.array(x) for x in inputs]
    bad[1][0, 12, 0] = np.nan
    bad[3][0, 20] = np.nan
    bad[2][1, 10, 1] = np.nan
    bad[4][1, 1] = np.inf
    bad[0][1, 1, 2] = np.nan
    out, grads = run(*map(jnp.asarray, bad), beta, cotangent)
    np.testing.assert_allclose(out[unseen], clean_out[unseen], atol=1e-6, rtol=1e-6)
    assert bool(jnp.isnan(out[sees]).all()), "a row that sees the poison must be NaN"
    for name, grad, clean_grad in zip(NAMES, grads, clean_grads):
        assert bool(jnp.isfinite(grad).all()), f"d{name} is not finite"
        np.testing.assert_allclose(grad, clean_grad, atol=1e-6, rtol=1e-5, err_msg=f"d{name}")


def test_seen_by_rows_with_a_window_matches_the_visibility_mask():
    """The O(T log T) windowed scan equals ``any_j V_ij & bad_j`` (causal, window, same segment),
    also for repeated, unsorted segment ids."""
    from runway_jax.masking import seen_by_rows, visible_keys

    rng = np.random.default_rng(0)
    segments = jnp.asarray(rng.integers(0, 3, (3, 29)), jnp.int32)
    bad = jnp.asarray(rng.random((3, 29, 2)) < 0.1)
    positions = jnp.arange(29)
    scan = jax.jit(seen_by_rows, static_argnums=2)
    for window in (1, 40):
        for ids in (segments, None):
            visible = visible_keys(positions[None], positions, query_segments=ids,
                                   key_segments=ids, local_window_size=window)
            want = jnp.any(visible[..., None] & bad[:, None], axis=2)
            np.testing.assert_array_equal(scan(bad, ids, window), want)


# --------------------------------------------------------------------------------------------
# Selection, skipping and the cost model (no kernel runs).
# --------------------------------------------------------------------------------------------


def uses_kernel(fn, *args):
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_selection_takes_the_kernels_with_the_new_options():
    """implementation=None on CPU still picks "xla"; a kernel (interpret mode) takes the window,
    the soft cap, fewer queries than keys and per-row lengths, also for causal_attention."""
    inputs = make_inputs(9, 2, 5, 12, 2, 1)
    options = dict(local_window_size=3, logits_soft_cap=2.0,
                   key_value_seq_lengths=jnp.asarray([12, 7], jnp.int32))
    call = lambda implementation, **kw: functools.partial(
        attention.rewired_attention, implementation=implementation, **options, **kw)
    assert not uses_kernel(call(None), *inputs)  # None on CPU: xla
    for target in TARGETS:
        assert uses_kernel(call((target + kernels.INTERPRET_SUFFIX, "xla")), *inputs)
    causal = functools.partial(attention.causal_attention,
                               implementation="pallas_gpu_interpret", **options)
    assert uses_kernel(causal, *inputs[:3])


@pytest.mark.parametrize("target", TARGETS)
def test_a_mask_is_still_a_one_line_error_for_the_kernels(target):
    inputs = make_inputs(10, 1, 5, 5, 2, 1)
    with pytest.raises(ValueError) as error:
        attention.rewired_attention(*inputs, implementation=target + kernels.INTERPRET_SUFFIX,
                                    local_window_size=2, mask=jnp.ones((5, 5), bool))
    message = str(error.value)
    assert "mask is not supported by the pallas kernels" in message and "\n" not in message


def pallas_flops(fn, *args):
    import re

    text = str(jax.make_jaxpr(fn)(*args))
    return [int(f) for f in re.findall(r"cost_estimate=CostEstimate\(flops=(\d+)", text)]


@pytest.mark.parametrize("target", TARGETS)
def test_cost_estimates_count_only_the_tiles_that_run(target):
    """A window over a long sequence, or one query row, costs a fraction of full causal
    attention: the pallas_calls' estimates follow ``tiles_that_run``."""
    shape = jax.ShapeDtypeStruct
    args = [shape((1, 1024, 2, 8), jnp.float32)] * 3 + [shape((1, 1024, 8), jnp.float32)] * 2

    def forward_flops(query_length=1024, **options):
        fn = lambda q, *a: kernels.rewired_attention(
            q[:, 1024 - query_length:], *a, implementation=target, beta=1.0,
            runway_coefficient="bilinear", runway_span="exact", segment_ids=None, scale=None,
            block_sizes=tiling.BlockSizes(64, 64), **options)
        return sum(pallas_flops(fn, *args))

    full = forward_flops()
    plan = tiling.plan(1024, tiling.BlockSizes(64, 64), window=100)
    assert cost_model.tiles_that_run(plan) == 1 + 2 + 14 * 3  # of 16 * 17 / 2 = 136 causal tiles
    assert forward_flops(local_window_size=100) / full == pytest.approx(45 / 136)
    # Decoding: one 8-row query block over the 16 key blocks, 16 * 8 / (136 * 64) of the work.
    assert forward_flops(query_length=1) / full == pytest.approx(16 * 8 / (136 * 64))
