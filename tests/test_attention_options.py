"""The drop-in options of METHOD (7): mask, local_window_size, logits_soft_cap, fewer queries than
keys (bottom-right), key_value_seq_lengths, boolean segment ids and a traced beta, for every
implementation that takes them, against the spec evaluated term by term."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from method_direct import direct_options, spec_loop
from runway_jax import attention, blockwise

BATCH, KEYS, HEADS, KV_HEADS, WIDTH = 2, 11, 4, 2, 8


def make_inputs(seed, queries=KEYS, keys=KEYS, dtype=jnp.float32):
    parts = jax.random.split(jax.random.key(seed), 5)
    shapes = [(BATCH, queries, HEADS, WIDTH), (BATCH, keys, KV_HEADS, WIDTH),
              (BATCH, keys, KV_HEADS, WIDTH), (BATCH, keys, WIDTH), (BATCH, keys, WIDTH)]
    return [jax.random.normal(p, s).astype(dtype) for p, s in zip(parts, shapes)]


def key_padding_mask(queries=KEYS, keys=KEYS):
    """Row 0 sees every key, row 1 has its first three keys padded (a left-padded prompt)."""
    allowed = np.ones((BATCH, 1, keys), bool)
    allowed[1, 0, :3] = False
    return jnp.asarray(np.broadcast_to(allowed, (BATCH, queries, keys)))


def random_mask(seed, queries=KEYS, keys=KEYS):
    return jnp.asarray(np.random.default_rng(seed).random((BATCH, queries, keys)) < 0.7)


def segments(dtype=jnp.int32):
    ids = np.zeros((BATCH, KEYS), np.int32)
    ids[0, 6:] = 1
    ids[1, 4:] = 1
    return jnp.asarray(ids).astype(dtype)


def run(path, inputs, **options):
    """The public API, or the blockwise path with tiny blocks (many query and key blocks)."""
    if path == "xla_small_blocks":
        defaults = dict(segment_ids=None, alibi_slopes=None, runway_alibi_slope=None, beta=1.0,
                        runway_coefficient="bilinear", runway_span="exact", scale=WIDTH ** -0.5)
        checked = attention._check_options(
            "test", inputs[0].shape[:2], inputs[1].shape[1],
            **{name: options.pop(name, None) for name in (
                "mask", "segment_ids", "local_window_size", "logits_soft_cap",
                "key_value_seq_lengths")})
        return blockwise.rewired_attention(*inputs, query_block=4, key_block=2,
                                           **{**defaults, **checked, **options})
    return attention.rewired_attention(*inputs, implementation=path, **options)


PATHS = ("reference", "xla", "xla_small_blocks")
CASES = {
    "mask": dict(mask=key_padding_mask()),
    "random_mask": dict(mask=random_mask(3)),
    "window": dict(local_window_size=3),
    "window_0": dict(local_window_size=0),
    "soft_cap": dict(logits_soft_cap=1.5),
    "bool_segments_window_cap": dict(segment_ids=segments(jnp.bool_), local_window_size=4,
                                     logits_soft_cap=2.0),
    "everything": dict(mask=random_mask(4), segment_ids=segments(), local_window_size=5,
                       logits_soft_cap=3.0),
}
SPANS = [("bilinear", "exact"), ("dot", "prefix"), ("bilinear", "prefix"), ("dot", "exact")]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("path", PATHS)
def test_forward_matches_the_spec_loop(path, case):
    """Invariant 4 with every option of (7): outputs and rho within 1e-5 of (2), (3), (7)."""
    inputs = make_inputs(1)
    for coefficient, span in SPANS[:2] if path != "reference" else SPANS:
        options = dict(beta=1.3, runway_coefficient=coefficient, runway_span=span, **CASES[case])
        want, want_rho = spec_loop(*inputs, **options)
        got = run(path, inputs, **options)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"{coefficient} {span}")
    if path == "xla":
        rho_options = {k: v for k, v in options.items() if k != "beta"}
        rho = attention.runway_coefficients(*inputs[3:], **rho_options)
        np.testing.assert_allclose(rho, want_rho, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lengths", [None, (11, 7)], ids=["full", "ragged"])
@pytest.mark.parametrize("path", PATHS)
def test_fewer_queries_than_keys_match_the_spec_loop(path, lengths):
    """Tq < Tk: the queries are the last Tq positions (of each row's L_b keys when given)."""
    inputs = make_inputs(2, queries=4)
    options = dict(beta=0.9, runway_coefficient="bilinear", runway_span="exact",
                   local_window_size=6, logits_soft_cap=2.5,
                   key_value_seq_lengths=None if lengths is None else jnp.asarray(lengths))
    want, _ = spec_loop(*inputs, **options)
    for span in attention.RUNWAY_SPANS:
        options["runway_span"] = span
        want, _ = spec_loop(*inputs, **options)
        np.testing.assert_allclose(run(path, inputs, **options), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", ("reference", "xla"))
def test_query_rows_equal_the_last_rows_of_the_full_pass(path):
    """(7): with Tq < Tk (and per-row lengths) the rows equal the full computation's last rows."""
    inputs = make_inputs(3)
    options = dict(beta=1.1, segment_ids=segments(), logits_soft_cap=4.0)
    full = attention.rewired_attention(*inputs, implementation=path, **options)
    tail = attention.rewired_attention(inputs[0][:, -3:], *inputs[1:], implementation=path,
                                       **options)
    np.testing.assert_allclose(tail, full[:, -3:], atol=1e-6, rtol=0)
    # Row b holds L_b real keys followed by garbage; its queries are the positions L_b - 3 ..
    lengths = [11, 6]
    garbage = [x.at[1, 6:].set(7.0) for x in inputs[1:]]
    queries = jnp.stack([inputs[0][0, 8:11], inputs[0][1, 3:6]])
    ragged = attention.rewired_attention(
        queries, *garbage, implementation=path, key_value_seq_lengths=jnp.asarray(lengths),
        **options)
    np.testing.assert_allclose(ragged[0], full[0, 8:11], atol=1e-6, rtol=0)
    short = attention.rewired_attention(*(x[1:2, :6] for x in inputs), implementation=path,
                                        beta=1.1, segment_ids=segments()[1:2, :6],
                                        logits_soft_cap=4.0)
    np.testing.assert_allclose(ragged[1], short[0, 3:6], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["mask", "window", "everything"])
@pytest.mark.parametrize("path", PATHS)
def test_gradients_match_the_direct_evaluation(path, case):
    """Invariant 4 (gradients): all five input gradients within 1e-4 of autodiff of the spec."""
    inputs = make_inputs(4, queries=7)
    options = dict(beta=0.8, runway_coefficient="bilinear", runway_span="exact")
    case_options = dict(CASES[case])
    if "mask" in case_options:
        case_options["mask"] = case_options["mask"][:, -7:]
    weights = jax.random.normal(jax.random.key(9), inputs[0].shape)
    loss = lambda f: lambda *x: jnp.sum(weights * f(*x))
    want = jax.grad(loss(lambda *x: direct_options(*x, **options, **case_options)[0]),
                    argnums=range(5))(*inputs)
    got = jax.grad(loss(lambda *x: run(path, x, **options, **case_options)), argnums=range(5))(*inputs)
    for name, g, w in zip(("query", "key", "value", "runway_query", "runway_key"), got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("path", ("reference", "xla"))
def test_bfloat16_with_options_within_tolerance(path):
    inputs = make_inputs(5, dtype=jnp.bfloat16)
    options = dict(beta=1.0, runway_coefficient="dot", runway_span="exact", **CASES["everything"])
    want, _ = spec_loop(*inputs, **options)
    got = run(path, inputs, **options)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2, rtol=0)


@pytest.mark.parametrize("path", ("reference", "xla", "xla_blockwise"))
def test_beta_zero_equals_jax_dot_product_attention(path, monkeypatch):
    """Invariant 1 with a mask and a window: beta = 0 (and causal_attention) equal XLA's own
    jax.nn.dot_product_attention with the same mask and local_window_size."""
    inputs = make_inputs(6)
    mask = random_mask(7)
    want = jax.nn.dot_product_attention(*inputs[:3], mask=mask[:, None], is_causal=True,
                                        local_window_size=(4, 0))
    if path == "xla_blockwise":  # the "xla" causal path beyond its dense limit
        monkeypatch.setattr(attention, "DENSE_LOGITS_LIMIT", 0)
        path = "xla"
    options = dict(mask=mask, local_window_size=4, implementation=path)
    rewired = attention.rewired_attention(*inputs, beta=0.0, **options)
    causal = attention.causal_attention(*inputs[:3], **options)
    # jax gives a fully masked row the mean of the values; ours gives 0 (invariant 3).
    seen = np.asarray(mask & np.tril(np.ones((KEYS, KEYS), bool)) & ~np.tril(
        np.ones((KEYS, KEYS), bool), -5)).any(-1)[..., None, None]
    np.testing.assert_allclose(np.where(seen, rewired, 0), np.where(seen, want, 0), atol=1e-5)
    np.testing.assert_allclose(np.where(seen, causal, 0), np.where(seen, want, 0), atol=1e-5)
    assert float(jnp.abs(jnp.where(seen, 0, rewired)).max()) == 0.0


@pytest.mark.parametrize("path", ("reference", "xla"))
def test_traced_beta_gradient_equals_finite_differences(path):
    inputs = make_inputs(7)
    weights = jax.random.normal(jax.random.key(8), inputs[0].shape)

    def loss(beta):
        out = attention.rewired_attention(*inputs, beta=beta, implementation=path,
                                          local_window_size=5)
        return jnp.sum(weights * out)

    grad = jax.jit(jax.grad(loss))(jnp.float32(0.7))
    epsilon = 1e-2
    numeric = (loss(0.7 + epsilon) - loss(0.7 - epsilon)) / (2 * epsilon)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-3)
    assert abs(float(grad)) > 1e-3  # beta really moves the output
    # A schedule under jit: the traced value equals the same Python float.
    traced = jax.jit(lambda b: attention.rewired_attention(*inputs, beta=b, implementation=path))
    np.testing.assert_allclose(traced(0.7), attention.rewired_attention(
        *inputs, beta=0.7, implementation=path), atol=1e-6, rtol=0)


@pytest.mark.parametrize("path", ("reference", "xla"))
def test_boolean_segment_ids_equal_integer_ones(path):
    inputs = make_inputs(8)
    as_int = attention.rewired_attention(*inputs, segment_ids=segments(), implementation=path)
    as_bool = attention.rewired_attention(*inputs, segment_ids=segments(jnp.bool_),
                                          implementation=path)
    np.testing.assert_array_equal(as_bool, as_int)


@pytest.mark.parametrize("path", ("reference", "xla"))
def test_nan_outside_the_mask_or_window_reaches_no_row(path):
    """Invariant 3 with (7): a NaN key in left padding, or outside every later row's window,
    poisons exactly the rows that see it."""
    inputs = make_inputs(9)
    key = inputs[1].at[1, 1].set(jnp.nan)
    runway_key = inputs[4].at[1, 1].set(jnp.nan)
    poisoned = [inputs[0], key, inputs[2], inputs[3], runway_key]
    masked = attention.rewired_attention(*poisoned, mask=key_padding_mask(), implementation=path)
    clean = attention.rewired_attention(*inputs, mask=key_padding_mask(), implementation=path)
    np.testing.assert_allclose(masked, clean, atol=1e-6, rtol=0)
    windowed = attention.rewired_attention(*poisoned, local_window_size=2, implementation=path)
    clean = attention.rewired_attention(*inputs, local_window_size=2, implementation=path)
    assert bool(jnp.isnan(windowed[1, 1:4]).all())  # rows 1..3 see key 1
    np.testing.assert_allclose(windowed[1, 4:], clean[1, 4:], atol=1e-6, rtol=0)
    np.testing.assert_allclose(windowed[0], clean[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("implementation", ["pallas_tpu_interpret", "pallas_gpu_interpret"])
def test_kernels_fall_back_or_say_what_they_lack(implementation):
    """None falls back to "xla" for an option the kernels lack (a dense mask; the other options
    of (7) run on the kernels, tests/test_kernel_options.py); naming a kernel raises one line."""
    inputs = make_inputs(10)
    for options in (dict(mask=key_padding_mask()), dict(mask=key_padding_mask(),
                                                         local_window_size=3)):
        with pytest.raises(ValueError) as error:
            attention.rewired_attention(*inputs, implementation=implementation, **options)
        message = str(error.value)
        assert "not supported by the pallas kernels" in message and "\n" not in message
        fallback = attention.rewired_attention(*inputs, implementation=(implementation, "xla"),
                                               **options)
        np.testing.assert_allclose(fallback, attention.rewired_attention(
            *inputs, implementation="xla", **options), atol=0, rtol=0)


BAD = [
    ("mask.shape", dict(mask=jnp.ones((3, KEYS, KEYS), bool))),
    ("mask.dtype", dict(mask=jnp.ones((KEYS, KEYS)))),
    ("local_window_size", dict(local_window_size=-1)),
    ("local_window_size", dict(local_window_size=(2, 1))),
    ("logits_soft_cap", dict(logits_soft_cap=0.0)),
    ("key_value_seq_lengths", dict(key_value_seq_lengths=jnp.ones((3,), jnp.int32))),
    ("segment_ids.dtype", dict(segment_ids=jnp.zeros((BATCH, KEYS)))),
    ("beta", dict(beta=jnp.ones(2))),
]


@pytest.mark.parametrize("needle,options", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_options_raise_one_line_errors(needle, options):
    with pytest.raises(ValueError) as error:
        attention.rewired_attention(*make_inputs(11), **options)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_shape_errors_for_fewer_queries_than_keys():
    q, k, v, rq, rk = make_inputs(12)
    with pytest.raises(ValueError, match=r"Tq <= Tk"):
        attention.rewired_attention(q, k[:, :5], v[:, :5], rq[:, :5], rk[:, :5])
    with pytest.raises(ValueError, match=r"every key position"):
        attention.rewired_attention(q[:, :3], k, v, rq[:, -3:], rk[:, -3:])
