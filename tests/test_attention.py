"""METHOD eq. (6) invariants for every implementation that runs on CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from method_direct import direct, triple_loop
from runway_jax import attention, blockwise

CPU_IMPLEMENTATIONS = ("reference", "xla")
OPTIONS = [(c, s) for c in attention.RUNWAY_COEFFICIENTS for s in attention.RUNWAY_SPANS]
# For the costlier checks: both spans and both coefficient kinds, in two compilations per path.
PAIRED_OPTIONS = [("bilinear", "exact"), ("dot", "prefix")]


def make_inputs(seed, batch, length, heads, kv_heads, width, dtype=jnp.float32, spread=1.0):
    keys = jax.random.split(jax.random.key(seed), 5)
    shapes = [(batch, length, heads, width), (batch, length, kv_heads, width),
              (batch, length, kv_heads, width), (batch, length, width), (batch, length, width)]
    return [(spread * jax.random.normal(k, s)).astype(dtype) for k, s in zip(keys, shapes)]


def make_segments(seed, batch, length, count=3):
    """Sorted (contiguous) document ids, as packing produces them."""
    ids = np.sort(np.random.default_rng(seed).integers(0, count, size=(batch, length)), axis=1)
    return jnp.asarray(ids, jnp.int32)


def run(implementation, inputs, **options):
    """rewired_attention through the public API, or the blockwise path with tiny blocks so that
    short test sequences still span many query and key blocks."""
    if implementation == "xla_small_blocks":
        options = {"segment_ids": None, "alibi_slopes": None, "runway_alibi_slope": None,
                   "beta": 1.0, "runway_coefficient": "bilinear", "runway_span": "exact",
                   "scale": 1.0 / np.sqrt(inputs[0].shape[-1]), **options}
        return blockwise.rewired_attention(*inputs, query_block=8, key_block=4, **options)
    return attention.rewired_attention(*inputs, implementation=implementation, **options)


ALL_PATHS = CPU_IMPLEMENTATIONS + ("xla_small_blocks",)


@st.composite
def problems(draw):
    kv_heads = draw(st.sampled_from([1, 2]))
    return dict(
        batch=draw(st.integers(1, 2)),
        length=draw(st.sampled_from([1, 2, 3, 5, 9, 13, 17])),
        heads=kv_heads * draw(st.sampled_from([1, 2])),
        kv_heads=kv_heads,
        width=draw(st.sampled_from([4, 8])),
        seed=draw(st.integers(0, 2**16)),
        coefficient=draw(st.sampled_from(attention.RUNWAY_COEFFICIENTS)),
        span=draw(st.sampled_from(attention.RUNWAY_SPANS)),
        segments=draw(st.booleans()),
        beta=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
    )


@settings(max_examples=15)
@given(problems())
def test_matches_triple_loop_float32(problem):
    """Invariant 4 (forward): every path within 1e-5 of a term-by-term evaluation of (2)-(3)."""
    p = problem
    inputs = make_inputs(p["seed"], p["batch"], p["length"], p["heads"], p["kv_heads"], p["width"])
    segments = make_segments(p["seed"], p["batch"], p["length"]) if p["segments"] else None
    options = dict(beta=p["beta"], runway_coefficient=p["coefficient"], runway_span=p["span"])
    want, want_rho = triple_loop(*inputs, segment_ids=None if segments is None else np.asarray(segments), **options)
    for path in ALL_PATHS:
        got = run(path, inputs, segment_ids=segments, **options)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=path)
    rho = attention.runway_coefficients(*inputs[3:], runway_coefficient=p["coefficient"],
                                        runway_span=p["span"], segment_ids=segments)
    assert rho.dtype == jnp.float32
    np.testing.assert_allclose(rho, want_rho, atol=1e-5, rtol=0)


@pytest.mark.parametrize("coefficient,span", OPTIONS)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_gradients_match_direct_evaluation(path, coefficient, span):
    """Invariant 4 (backward): gradients w.r.t. all five inputs within 1e-4, segments and GQA on."""
    inputs = make_inputs(1, 2, 19, 4, 2, 8)
    segments = make_segments(1, 2, 19)
    options = dict(beta=0.8, runway_coefficient=coefficient, runway_span=span)
    cotangent = jax.random.normal(jax.random.key(9), inputs[0].shape)

    def loss(fn, *args):
        return jnp.sum(fn(*args) * cotangent)

    want = jax.grad(lambda *a: loss(lambda *b: direct(*b, segment_ids=segments, **options)[0], *a),
                    argnums=range(5))(*inputs)
    got = jax.grad(lambda *a: loss(lambda *b: run(path, b, segment_ids=segments, **options), *a),
                   argnums=range(5))(*inputs)
    for name, g, w in zip(["query", "key", "value", "runway_query", "runway_key"], got, want):
        assert float(jnp.abs(w).max()) > 1e-3, name  # the gradient is really exercised
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=f"{path} d{name}")


@pytest.mark.parametrize("coefficient,span", PAIRED_OPTIONS)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_bfloat16_within_tolerance(path, coefficient, span):
    """Invariant 4 (bfloat16): output in bfloat16, within 2e-2 of float32 math on the same values;
    gradients too."""
    inputs = make_inputs(2, 2, 21, 4, 4, 8, dtype=jnp.bfloat16)
    options = dict(beta=1.0, runway_coefficient=coefficient, runway_span=span)
    got = run(path, inputs, **options)
    assert got.dtype == jnp.bfloat16
    want, _ = direct(*inputs, **options)
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2, rtol=0)
    got_grads = jax.grad(lambda *a: run(path, a, **options).astype(jnp.float32).sum(), argnums=range(5))(*inputs)
    want_grads = jax.grad(lambda *a: direct(*a, **options)[0].sum(), argnums=range(5))(*inputs)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == jnp.bfloat16
        scale = max(1.0, float(jnp.abs(w).max()))
        np.testing.assert_allclose(g.astype(jnp.float32) / scale, w / scale, atol=2e-2, rtol=0)


@pytest.mark.parametrize("path", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("segments", [False, True])
def test_beta_zero_is_standard_attention(path, segments):
    """Invariant 1: beta = 0 equals causal_attention and jax.nn.dot_product_attention."""
    query, key, value, runway_query, runway_key = make_inputs(3, 2, 23, 4, 2, 8)
    segment_ids = make_segments(3, 2, 23) if segments else None
    rewired = attention.rewired_attention(query, key, value, runway_query, runway_key, beta=0.0,
                                          segment_ids=segment_ids, implementation=path)
    causal = attention.causal_attention(query, key, value, segment_ids=segment_ids, implementation=path)
    np.testing.assert_allclose(rewired, causal, atol=1e-6, rtol=0)
    if segment_ids is None:
        jax_attention = jax.nn.dot_product_attention(query, key, value, is_causal=True)
    else:
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        jax_attention = jax.nn.dot_product_attention(
            query, key, value, mask=same & jnp.tril(jnp.ones((23, 23), bool)))
    np.testing.assert_allclose(causal, jax_attention, atol=1e-5, rtol=0)


def test_xla_causal_attention_is_dense_within_the_limit_and_blockwise_beyond(monkeypatch):
    """causal_attention("xla") is XLA's dense attention while B x H x Tq x Tk fit
    DENSE_LOGITS_LIMIT and blockwise beyond; both agree with the reference evaluation, forward
    and backward, with segments, GQA and Tq < Tk."""
    query, key, value, _, _ = make_inputs(21, 2, 37, 4, 2, 8)
    query = query[:, 5:]  # the last 32 positions
    segment_ids = make_segments(21, 2, 37)
    logits = 2 * 4 * 32 * 37

    def run_with(path, limit):
        monkeypatch.setattr(attention, "DENSE_LOGITS_LIMIT", limit)

        def loss(q, k, v):
            out = attention.causal_attention(q, k, v, segment_ids=segment_ids, implementation=path)
            return jnp.sum(out * jnp.cos(out)), out
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            query, key, value)
        return out, grads

    reference = run_with("reference", logits)
    dense = run_with("xla", logits)
    blocks = run_with("xla", logits - 1)
    scale = 8 ** -0.5
    options = dict(mask=None, segment_ids=segment_ids, local_window_size=None,
                   logits_soft_cap=None, key_value_seq_lengths=None, scale=scale, alibi_slopes=None)
    np.testing.assert_array_equal(
        dense[0], attention._dense_causal_attention(query, key, value, **options))
    direct = blockwise.causal_attention(query, key, value, segment_ids=segment_ids, scale=scale,
                                        alibi_slopes=None)
    np.testing.assert_array_equal(blocks[0], direct)
    for path in (dense, blocks):
        for got, want in zip(jax.tree.leaves(path), jax.tree.leaves(reference)):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_causal_attention_implementations_agree_with_alibi():
    query, key, value, _, _ = make_inputs(4, 1, 300, 4, 2, 8)
    slopes = jnp.array([0.5, 0.25, 0.125, 0.0625])
    ref = attention.causal_attention(query, key, value, alibi_slopes=slopes, implementation="reference")
    xla = attention.causal_attention(query, key, value, alibi_slopes=slopes, implementation="xla")
    np.testing.assert_allclose(xla, ref, atol=1e-5, rtol=0)
    blocks = blockwise.causal_attention(query, key, value, segment_ids=None, scale=8 ** -0.5,
                                        alibi_slopes=slopes)
    np.testing.assert_allclose(blocks, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("span", attention.RUNWAY_SPANS)
def test_default_blocks_over_many_blocks(span):
    """T = 600 spans two default query blocks (of 320, padded) and ten key blocks; ALiBi on."""
    assert blockwise.block_plan(600) == (320, 64, 640)
    inputs = make_inputs(5, 1, 600, 2, 2, 8)
    options = dict(beta=1.5, runway_span=span, alibi_slopes=jnp.array([0.3, 0.1]),
                   runway_alibi_slope=0.2, segment_ids=make_segments(5, 1, 600, count=4))
    ref = attention.rewired_attention(*inputs, implementation="reference", **options)
    xla = attention.rewired_attention(*inputs, implementation="xla", **options)
    np.testing.assert_allclose(xla, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("length", [1, 5, 63, 64, 65, 512, 513, 1500, 8192])
def test_block_plan_covers_the_sequence_with_little_padding(length):
    query_block, key_block, padded = blockwise.block_plan(length)
    assert query_block % key_block == 0 and padded % query_block == 0
    assert length <= padded < length + query_block and query_block <= blockwise.QUERY_BLOCK
    assert padded - length < max(key_block, 1) * (padded // query_block)


@pytest.mark.parametrize("coefficient,span", PAIRED_OPTIONS)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_causality_by_perturbation(path, coefficient, span):
    """Invariant 2: outputs at positions <= t ignore every input at positions > t."""
    length, cut = 20, 11
    inputs = make_inputs(6, 1, length, 2, 2, 8)
    noise = make_inputs(7, 1, length, 2, 2, 8, spread=3.0)
    perturbed = [x.at[:, cut + 1:].add(n[:, cut + 1:]) for x, n in zip(inputs, noise)]
    options = dict(beta=1.0, runway_coefficient=coefficient, runway_span=span)
    before, after = run(path, inputs, **options), run(path, perturbed, **options)
    np.testing.assert_allclose(before[:, : cut + 1], after[:, : cut + 1], atol=1e-6, rtol=0)
    assert float(jnp.abs(before[:, cut + 1:] - after[:, cut + 1:]).max()) > 1e-2  # later ones do change


@pytest.mark.parametrize("coefficient", attention.RUNWAY_COEFFICIENTS)
def test_exact_rho_vanishes_without_runway(coefficient):
    """Invariant 3: exact span rho_ij = 0 for i - j <= 1; row 0 is zero in both spans."""
    _, _, _, runway_query, runway_key = make_inputs(8, 2, 16, 1, 1, 8)
    exact = attention.runway_coefficients(runway_query, runway_key, runway_coefficient=coefficient)
    i, j = np.indices((16, 16))
    assert np.all(np.asarray(exact)[:, i - j <= 1] == 0)
    assert np.any(np.asarray(exact)[:, i - j >= 2] != 0)
    prefix = attention.runway_coefficients(runway_query, runway_key, runway_coefficient=coefficient,
                                           runway_span="prefix")
    assert np.all(np.asarray(prefix)[:, 0] == 0) and np.all(np.asarray(prefix)[:, j > i] == 0)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_no_nan_for_extreme_inputs_and_padding(path, dtype):
    """Invariant 3: finite outputs and gradients with huge logits and padding segments, T = 1 too."""
    for length in (1, 29):
        inputs = make_inputs(9, 2, length, 2, 1, 8, dtype=dtype, spread=60.0)
        # Row 1 is a short document followed by padding in a segment of its own (id -1).
        segments = jnp.stack([jnp.zeros(length, jnp.int32),
                              jnp.where(jnp.arange(length) < 3, 0, -1).astype(jnp.int32)])
        for span in attention.RUNWAY_SPANS:
            options = dict(beta=4.0, runway_span=span, segment_ids=segments)
            out = run(path, inputs, **options)
            grads = jax.grad(lambda *a: run(path, a, **options).astype(jnp.float32).sum(),
                             argnums=range(5))(*inputs)
            assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in [out, *grads])


@pytest.mark.parametrize("path", CPU_IMPLEMENTATIONS)
def test_packed_rows_equal_separate_documents(path):
    """Invariant 7: no attention and no runway crosses a segment boundary."""
    inputs = make_inputs(10, 1, 24, 2, 2, 8)
    lengths = [7, 12, 5]
    segments = jnp.asarray(np.repeat(np.arange(3), lengths)[None], jnp.int32)
    for span in attention.RUNWAY_SPANS:
        packed = attention.rewired_attention(*inputs, runway_span=span, segment_ids=segments,
                                             implementation=path)
        start = 0
        for n in lengths:
            alone = attention.rewired_attention(*[x[:, start:start + n] for x in inputs],
                                                runway_span=span, implementation=path)
            np.testing.assert_allclose(packed[:, start:start + n], alone, atol=1e-5, rtol=0)
            start += n


def test_blockwise_backward_memory_grows_linearly_in_length():
    """The xla path's forward+backward never stores the per-block T x T arrays (blocks are
    rematerialized), so its compiled memory grows like T, while the dense reference's grows
    like T^2: doubling T from 1024 to 2048 doubles the first and about triples the second (its
    linear terms still weigh at this size)."""

    def temp_bytes(implementation, length):
        inputs = make_inputs(11, 1, length, 2, 2, 16)

        def loss(*a):
            return attention.rewired_attention(*a, implementation=implementation).sum()
        compiled = jax.jit(jax.grad(loss, argnums=range(5))).lower(*inputs).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    xla_growth = temp_bytes("xla", 2048) / temp_bytes("xla", 1024)
    reference_growth = temp_bytes("reference", 2048) / temp_bytes("reference", 1024)
    assert xla_growth < 2.2 and reference_growth > 2.8, (xla_growth, reference_growth)


BAD_CALLS = [
    ("query.shape", lambda q, k, v, rq, rk: attention.rewired_attention(q[0], k, v, rq, rk)),
    ("H_kv=3", lambda q, k, v, rq, rk: attention.rewired_attention(
        q, jnp.zeros((2, 5, 3, 8)), jnp.zeros((2, 5, 3, 8)), rq, rk)),
    ("runway_query.shape", lambda q, k, v, rq, rk: attention.rewired_attention(q, k, v, rq[:, :3], rk)),
    ("beta=-1", lambda q, k, v, rq, rk: attention.rewired_attention(q, k, v, rq, rk, beta=-1)),
    ("runway_span='full'", lambda q, k, v, rq, rk: attention.rewired_attention(
        q, k, v, rq, rk, runway_span="full")),
    ("runway_coefficient='cosine'", lambda q, k, v, rq, rk: attention.rewired_attention(
        q, k, v, rq, rk, runway_coefficient="cosine")),
    ("implementation='cuda'", lambda q, k, v, rq, rk: attention.rewired_attention(
        q, k, v, rq, rk, implementation="cuda")),
    ("segment_ids.shape", lambda q, k, v, rq, rk: attention.rewired_attention(
        q, k, v, rq, rk, segment_ids=jnp.zeros((2, 4), jnp.int32))),
    ("segment_ids.dtype", lambda q, k, v, rq, rk: attention.rewired_attention(
        q, k, v, rq, rk, segment_ids=jnp.zeros((2, 5)))),
    ("key.dtype", lambda q, k, v, rq, rk: attention.rewired_attention(
        q, k.astype(jnp.bfloat16), v, rq, rk)),
    ("query.dtype=int32", lambda q, k, v, rq, rk: attention.causal_attention(
        q.astype(jnp.int32), k, v)),
    ("scale=0", lambda q, k, v, rq, rk: attention.causal_attention(q, k, v, scale=0)),
    ("alibi_slopes.shape", lambda q, k, v, rq, rk: attention.causal_attention(
        q, k, v, alibi_slopes=jnp.ones(3))),
]


@pytest.mark.parametrize("needle,call", BAD_CALLS, ids=[n for n, _ in BAD_CALLS])
def test_bad_input_raises_one_line_value_error(needle, call):
    inputs = make_inputs(12, 2, 5, 4, 2, 8)
    with pytest.raises(ValueError) as error:
        call(*inputs)
    message = str(error.value)
    assert needle in message and "\n" not in message


@pytest.mark.parametrize("implementation", ["pallas_gpu", "pallas_tpu"])
def test_pallas_implementations_need_their_accelerator_or_interpret_mode(implementation):
    """On CPU the kernels run only in interpret mode (tests/test_kernels.py tests them); the error
    names the implementation that does."""
    inputs = make_inputs(13, 1, 4, 2, 2, 8)
    with pytest.raises(ValueError, match=f"{implementation}.*'{implementation}_interpret'"):
        attention.rewired_attention(*inputs, implementation=implementation)


def test_jit_and_default_implementation():
    inputs = make_inputs(15, 1, 9, 2, 2, 8)
    fn = jax.jit(functools.partial(attention.rewired_attention, beta=0.5))
    np.testing.assert_allclose(
        fn(*inputs), attention.rewired_attention(*inputs, beta=0.5, implementation="reference"),
        atol=1e-5, rtol=0)
    assert attention.default_implementation() in attention.IMPLEMENTATIONS


def test_masked_softmax_fully_masked_rows_are_zero_and_differentiable():
    """Invariant 3 for rows with no visible key at all: zeros, never NaN, finite gradients."""
    from runway_jax.masking import masked_softmax

    logits = jnp.array([[1.0, 2.0, 3.0], [5.0, -1e30, 7.0]])
    mask = jnp.array([[False, False, False], [True, False, True]])
    probs = masked_softmax(logits, mask)
    np.testing.assert_array_equal(probs[0], 0.0)
    np.testing.assert_allclose(probs[1], jax.nn.softmax(jnp.array([5.0, -jnp.inf, 7.0])), rtol=1e-6)
    grad = jax.grad(lambda x: (masked_softmax(x, mask) * jnp.arange(3.0)).sum())(logits)
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad[0]).max()) == 0.0
