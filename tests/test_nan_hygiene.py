"""NaN and Inf never cross a mask (METHOD (6) items 2, 3 and 7), in every implementation.

One position of one input is made NaN or +Inf. Rows that cannot see it (eqs. (1)-(3), (5)) must
equal the clean run exactly, forward and backward: a masked zero meeting the poisoned value inside
a product over positions (0 * NaN) is the bug this guards against. Rows that can see it must be
NaN (the poison is not hidden). Each call batches every case: batch row ``b`` poisons one input
(``CASES[b]``), and its rows either form one document poisoned at ``CAUSAL_POSITION`` or two
documents, the first poisoned at ``DOCUMENT_POSITION``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runway_jax import attention, blockwise, kernels
from runway_jax.kernels import tiling
from runway_jax.masking import seen_by_rows
from test_attention import make_inputs

NAMES = ("query", "key", "value", "runway_query", "runway_key")
LENGTH, HEADS, KV_HEADS, WIDTH = 13, 2, 1, 8  # T = 13: padded to 16 by 8-row kernel tiles
CAUSAL_POSITION = 9  # in the second 8-row tile, beside row 8 that cannot see it
SECOND_DOCUMENT = 7  # documents [0, 7) and [7, 13)
DOCUMENT_POSITION = 3
SMALL_BLOCKS = tiling.BlockSizes(block_q=8, block_k=8, heads_per_program=2)
# The 8-row-tile kernels; the Mosaic GPU kernel (64-row tiles, d a multiple of 64, a slow
# interpreter) has its own files: tests/test_kernel_mosaic_gpu*.py.
KERNELS = ("pallas_tpu", "pallas_gpu")
POISONS = (jnp.nan, jnp.inf)


def cases(names):
    """``(input index, poison, packed)`` per batch row: every input, poison and layout."""
    return [(n, poison, packed) for packed in (False, True) for poison in POISONS
            for n in range(len(names))]


def layout(case_list):
    """Segment ids ``[B, T]``, the poisoned position per row and the ``[B, T, H]`` rows that
    can see it (a query reaches only its own row; everything else, later rows of its document)."""
    positions = np.arange(LENGTH)
    segments = np.stack([(positions >= SECOND_DOCUMENT) if packed else np.zeros(LENGTH, bool)
                         for _, _, packed in case_list]).astype(np.int32)
    poisoned_at = [DOCUMENT_POSITION if packed else CAUSAL_POSITION for _, _, packed in case_list]
    sees = np.zeros((len(case_list), LENGTH, HEADS), bool)
    for b, ((n, _, _), p) in enumerate(zip(case_list, poisoned_at)):
        if NAMES[n] == "query":
            sees[b, p] = True
        else:
            sees[b] = ((positions >= p) & (segments[b] == segments[b, p]))[:, None]
    return jnp.asarray(segments), poisoned_at, sees


def poison(inputs, case_list, poisoned_at):
    inputs = [np.array(x) for x in inputs]
    for b, ((n, value, _), p) in enumerate(zip(case_list, poisoned_at)):
        inputs[n][b, p] = value
    return [jnp.asarray(x) for x in inputs]


def check(fn, names, seed=0):
    """``fn(*inputs, segment_ids)`` passes the hygiene checks for every input in ``names``."""
    case_list = cases(names)
    segments, poisoned_at, sees = layout(case_list)
    inputs = make_inputs(seed, len(case_list), LENGTH, HEADS, KV_HEADS, WIDTH)[:len(names)]
    unseen = ~sees
    cotangent = jax.random.normal(jax.random.key(seed + 1), inputs[0].shape)

    def loss(*arrays):  # a random linear function of the rows that cannot see the poison
        out = fn(*arrays, segments)
        return jnp.sum(jnp.where(unseen[..., None], out * cotangent, 0.0)), out

    run = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True))
    (_, clean_out), clean_grads = run(*inputs)
    bad_inputs = poison(inputs, case_list, poisoned_at)
    (_, out), grads = run(*bad_inputs)
    np.testing.assert_allclose(out[unseen], clean_out[unseen], atol=1e-6, rtol=1e-6)
    assert bool(jnp.isnan(out[sees]).all()), "a row that sees the poison must be NaN"
    for name, grad, clean_grad, bad in zip(names, grads, clean_grads, bad_inputs):
        assert bool(jnp.isfinite(grad).all()), f"d{name} is not finite"
        np.testing.assert_allclose(grad, clean_grad, atol=1e-6, rtol=1e-6, err_msg=f"d{name}")
        poisoned_entries = ~jnp.isfinite(bad)
        assert bool((grad[poisoned_entries] == 0).all()), f"d{name} at the poison is not 0"
    assert float(jnp.abs(clean_grads[2]).max()) > 1e-3  # the loss really reaches the inputs


def rewired(implementation, beta=0.8, **options):
    if implementation == "xla_small_blocks":
        return lambda *a: blockwise.rewired_attention(
            *a[:5], segment_ids=a[5], beta=beta, scale=WIDTH ** -0.5, alibi_slopes=None,
            runway_alibi_slope=None, query_block=8, key_block=4, **options)
    if implementation in KERNELS:
        return lambda *a: kernels.rewired_attention(
            *a[:5], segment_ids=a[5], implementation=implementation + kernels.INTERPRET_SUFFIX,
            beta=beta, scale=None, block_sizes=SMALL_BLOCKS, **options)
    return lambda *a: attention.rewired_attention(
        *a[:5], segment_ids=a[5], implementation=implementation, beta=beta, **options)


# Both spans with both coefficient kinds where it is cheap; the interpret-mode kernels pair them.
FAST = [(i, c, s) for i in ("reference", "xla", "xla_small_blocks")
        for c in ("bilinear", "dot") for s in ("exact", "prefix")]
KERNEL = [(t, c, s) for t in KERNELS for c, s in (("bilinear", "exact"), ("dot", "prefix"))]


@pytest.mark.parametrize("implementation,coefficient,span", FAST + KERNEL)
def test_rewired_attention_keeps_poison_behind_the_masks(implementation, coefficient, span):
    check(rewired(implementation, runway_coefficient=coefficient, runway_span=span), NAMES)


@pytest.mark.parametrize("implementation", ["reference", "xla", "pallas_tpu"])
def test_beta_zero_ignores_a_poisoned_runway_head(implementation):
    """With beta = 0 the runway head does not reach the output (invariant 1): its NaN neither."""
    inputs = make_inputs(3, 1, LENGTH, HEADS, KV_HEADS, WIDTH)
    fn = jax.jit(rewired(implementation, beta=0.0, runway_coefficient="bilinear",
                         runway_span="exact"))
    segments = jnp.zeros((1, LENGTH), jnp.int32)
    clean = fn(*inputs, segments)
    bad = list(inputs)
    bad[3] = bad[3].at[0, 2].set(jnp.nan)
    bad[4] = bad[4].at[0, 5].set(jnp.inf)
    np.testing.assert_array_equal(fn(*bad, segments), clean)


def causal(implementation):
    if implementation in KERNELS:
        return lambda q, k, v, s: kernels.causal_attention(
            q, k, v, segment_ids=s, implementation=implementation + kernels.INTERPRET_SUFFIX,
            scale=None, block_sizes=SMALL_BLOCKS)
    if implementation == "xla_blockwise":  # the "xla" path beyond its dense limit
        return lambda q, k, v, s: blockwise.causal_attention(
            q, k, v, segment_ids=s, scale=WIDTH ** -0.5, alibi_slopes=None, query_block=8,
            key_block=4)
    return lambda q, k, v, s: attention.causal_attention(q, k, v, segment_ids=s,
                                                         implementation=implementation)


@pytest.mark.parametrize("implementation", ["reference", "xla", "xla_blockwise", *KERNELS])
def test_causal_attention_keeps_poison_behind_the_masks(implementation):
    check(causal(implementation), NAMES[:3])


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_without_segment_ids_a_later_nan_stays_invisible(implementation):
    """The ``segment_ids=None`` path: NaN value at p leaves rows < p equal to the clean run."""
    inputs = make_inputs(4, 1, LENGTH, HEADS, KV_HEADS, WIDTH)
    fn = functools.partial(attention.rewired_attention, implementation=implementation)
    clean = fn(*inputs)
    bad = list(inputs)
    bad[2] = bad[2].at[0, CAUSAL_POSITION].set(jnp.nan)
    out = fn(*bad)
    np.testing.assert_array_equal(out[:, :CAUSAL_POSITION], clean[:, :CAUSAL_POSITION])
    assert bool(jnp.isnan(out[:, CAUSAL_POSITION:]).all())


def test_runway_coefficients_rows_that_cannot_see_a_nan_are_clean():
    inputs = make_inputs(5, 1, LENGTH, HEADS, KV_HEADS, WIDTH)[3:]
    segments = jnp.asarray((np.arange(LENGTH) >= SECOND_DOCUMENT)[None], jnp.int32)
    for n in range(2):
        bad = list(inputs)
        bad[n] = bad[n].at[0, DOCUMENT_POSITION].set(jnp.nan)
        clean, rho = (attention.runway_coefficients(*x, segment_ids=segments)
                      for x in (inputs, bad))
        rows = np.r_[:DOCUMENT_POSITION, SECOND_DOCUMENT:LENGTH]
        np.testing.assert_array_equal(rho[:, rows], clean[:, rows])
        assert bool(jnp.isnan(rho[:, DOCUMENT_POSITION:SECOND_DOCUMENT]).all())


def test_seen_by_rows_matches_the_visibility_mask():
    """The O(T log T) scan equals ``any_j mask_ij & bad_j`` also for repeated, unsorted ids."""
    rng = np.random.default_rng(0)
    segments = jnp.asarray(rng.integers(0, 3, (4, 17)), jnp.int32)
    bad = jnp.asarray(rng.random((4, 17, 2)) < 0.15)
    mask = attention.attention_mask(17, segments)
    want = jnp.any(mask[..., None] & bad[:, None], axis=2)
    np.testing.assert_array_equal(seen_by_rows(bad, segments), want)
    np.testing.assert_array_equal(seen_by_rows(bad), jnp.cumsum(bad, axis=1) > 0)
