"""The "xla" path with a local window reads only the keys a query block can see (a slice of
``round_up(Bq + w, Bk) + Bk`` keys, runway_jax.blockwise): the same numbers as the reference
evaluation of METHOD (7) (forward and all five gradients, both spans, with segments, a mask, a
soft cap, ALiBi, fewer queries than keys and ragged rows), and less work than the whole keys."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runway_jax import attention, blockwise

NAMES = ["query", "key", "value", "runway_query", "runway_key"]
BATCH, HEADS, KV_HEADS, WIDTH, WINDOW = 2, 2, 1, 8, 5
BLOCKS = dict(query_block=8, key_block=4)  # 48 keys: 12 key blocks, a slice is 4 of them


def inputs(seed, queries, keys):
    parts = jax.random.split(jax.random.key(seed), 5)
    shapes = [(BATCH, queries, HEADS, WIDTH), (BATCH, keys, KV_HEADS, WIDTH),
              (BATCH, keys, KV_HEADS, WIDTH), (BATCH, keys, WIDTH), (BATCH, keys, WIDTH)]
    return [jax.random.normal(p, s) for p, s in zip(parts, shapes)]


def sliced(arrays, **options):
    """blockwise.rewired_attention with small blocks, so that whole key blocks are skipped."""
    query, key = arrays[0], arrays[1]
    checked = attention._check_options(
        "test", query.shape[:2], key.shape[1],
        **{name: options.pop(name, None) for name in (
            "mask", "segment_ids", "local_window_size", "logits_soft_cap",
            "key_value_seq_lengths")})
    defaults = dict(alibi_slopes=None, runway_alibi_slope=None, beta=0.7,
                    runway_coefficient="bilinear", runway_span="exact", scale=WIDTH ** -0.5)
    return blockwise.rewired_attention(*arrays, **BLOCKS, **{**defaults, **checked, **options})


def reference(arrays, **options):
    defaults = dict(beta=0.7, runway_coefficient="bilinear", runway_span="exact")
    return attention.rewired_attention(*arrays, implementation="reference",
                                       **{**defaults, **options})


def two_documents(length):
    ids = np.zeros((BATCH, length), np.int32)
    ids[0, 20:] = 1
    ids[1, 33:] = 1
    return jnp.asarray(ids)


CASES = {
    "exact": dict(),
    "prefix-dot": dict(runway_span="prefix", runway_coefficient="dot"),
    "segments-cap-alibi": dict(segment_ids=two_documents(48), logits_soft_cap=2.0,
                               alibi_slopes=jnp.array([0.3, 0.1]), runway_alibi_slope=0.2),
    "mask": dict(mask=jnp.asarray(np.random.default_rng(0).random((BATCH, 48, 48)) < 0.8)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_window_slices_match_the_reference(case):
    arrays = inputs(1, 48, 48)
    options = dict(local_window_size=WINDOW, **CASES[case])
    got, got_vjp = jax.vjp(lambda *a: sliced(a, **dict(options)), *arrays)
    want, want_vjp = jax.vjp(lambda *a: reference(a, **dict(options)), *arrays)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    cotangent = jax.random.normal(jax.random.key(2), got.shape)
    for name, g, w in zip(NAMES, got_vjp(cotangent), want_vjp(cotangent)):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("queries", [3, 20], ids=["few_rows", "key_blocks"])
def test_window_slices_with_fewer_queries_and_ragged_rows(queries):
    """Rows at the end of ragged caches (lengths 48 and 37): the slice follows each row."""
    arrays = inputs(3, queries, 48)
    options = dict(local_window_size=WINDOW, key_value_seq_lengths=jnp.array([48, 37]))
    got = sliced(arrays, **dict(options))
    want = reference(arrays, **options)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_a_window_reads_a_slice_and_costs_less():
    """XLA's own FLOP count of forward + backward: a window of 5 over 256 keys costs less than a
    third of the full causal pass (the slice is 8 + 5 rounded to 20 keys, not 256)."""
    arrays = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs(4, 256, 256)]

    def flops(window):
        def loss(*a):
            return sliced(a, local_window_size=window, beta=0.7).sum()
        compiled = jax.jit(jax.grad(loss, argnums=range(5))).lower(*arrays).compile()
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        return analysis["flops"]

    layout = blockwise._Layout(*inputs(4, 256, 256)[:2], None, None, None, WINDOW, **BLOCKS)
    assert layout.key_span == 20 < layout.padded_key_length == 256
    assert flops(WINDOW) < flops(None) / 3
