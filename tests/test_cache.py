"""runway_jax.cache: prefill + decode_step of any layer equal the full pass (invariant 8, METHOD
(4), (7)), for ragged rows, grouped-query heads and the options of METHOD (7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runway_jax import attention, cache as kv_cache
from method_direct import spec_loop

BATCH, PROMPT, STEPS, HEADS, KV_HEADS, WIDTH = 2, 6, 5, 4, 2, 8


def _sequence(seed, length, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 5)
    shapes = [(BATCH, length, HEADS, WIDTH), (BATCH, length, KV_HEADS, WIDTH),
              (BATCH, length, KV_HEADS, WIDTH), (BATCH, length, WIDTH), (BATCH, length, WIDTH)]
    return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes)]


OPTIONS = [
    dict(beta=1.5),
    dict(beta=0.7, runway_span="prefix", runway_coefficient="dot"),
    dict(beta=1.0, local_window_size=3, logits_soft_cap=2.0),
]


@pytest.mark.parametrize("implementation", ["reference", "xla"])
@pytest.mark.parametrize("options", OPTIONS, ids=["exact", "prefix-dot", "window-cap"])
def test_prefill_then_decode_steps_equal_each_rows_full_pass(implementation, options):
    total = PROMPT + STEPS
    q, k, v, rq, rk = _sequence(0, total)
    lengths = np.array([PROMPT, 3])  # row 1's prompt is shorter: right padding after 3 tokens
    options = dict(options, implementation=implementation)
    cache = kv_cache.init_cache(BATCH, total + 2, kv_heads=KV_HEADS, head_width=WIDTH)
    # The prompts, right-padded: row 1's positions 3..5 hold tokens it has not reached yet.
    prompt_out, cache = kv_cache.prefill(cache, q[:, :PROMPT], k[:, :PROMPT], v[:, :PROMPT],
                                         rq[:, :PROMPT], rk[:, :PROMPT], lengths=lengths, **options)
    np.testing.assert_array_equal(cache.lengths, lengths)
    outputs = [[prompt_out[b, p] for p in range(lengths[b])] for b in range(BATCH)]
    for step in range(STEPS):
        rows = jnp.asarray(lengths + step)  # each row's next position
        pick = lambda x: jnp.take_along_axis(x, rows.reshape((BATCH, 1) + (1,) * (x.ndim - 2)), 1)
        out, cache = kv_cache.decode_step(cache, *(pick(x) for x in (q, k, v, rq, rk)), **options)
        for b in range(BATCH):
            outputs[b].append(out[b, 0])
    for b in range(BATCH):
        length = lengths[b] + STEPS
        row = lambda x: x[b:b + 1, :length]
        spec, _ = spec_loop(*(row(x) for x in (q, k, v, rq, rk)),
                            beta=options["beta"],
                            runway_coefficient=options.get("runway_coefficient", "bilinear"),
                            runway_span=options.get("runway_span", "exact"),
                            local_window_size=options.get("local_window_size"),
                            logits_soft_cap=options.get("logits_soft_cap"))
        np.testing.assert_allclose(np.stack(outputs[b]), spec[0], atol=3e-5, rtol=0,
                                   err_msg=f"row {b}")


def test_a_chunk_of_positions_per_step_and_bfloat16():
    q, k, v, rq, rk = _sequence(1, 12, jnp.bfloat16)
    full = attention.rewired_attention(q, k, v, rq, rk, beta=1.0, implementation="xla")
    cache = kv_cache.init_cache(BATCH, 12, kv_heads=KV_HEADS, head_width=WIDTH, dtype=jnp.bfloat16)
    _, cache = kv_cache.prefill(cache, *(x[:, :4] for x in (q, k, v, rq, rk)), beta=1.0)
    chunk, cache = kv_cache.decode_step(cache, *(x[:, 4:9] for x in (q, k, v, rq, rk)), beta=1.0)
    assert chunk.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(chunk), np.float32(full[:, 4:9]), atol=2e-2, rtol=0)


def test_a_cache_without_runway_head_is_standard_attention():
    q, k, v, _, _ = _sequence(2, 9)
    cache = kv_cache.init_cache(BATCH, 9, kv_heads=KV_HEADS, head_width=WIDTH, rewired=False)
    _, cache = kv_cache.prefill(cache, q[:, :8], k[:, :8], v[:, :8])
    last, cache = kv_cache.decode_step(cache, q[:, 8:], k[:, 8:], v[:, 8:], beta=2.0)
    expected = jax.nn.dot_product_attention(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2),
                                            is_causal=True)
    np.testing.assert_allclose(last, expected[:, 8:], atol=2e-6, rtol=0)


def test_misuse_is_one_line():
    q, k, v, rq, rk = _sequence(3, 4)
    cache = kv_cache.init_cache(BATCH, 3, kv_heads=KV_HEADS, head_width=WIDTH)
    with pytest.raises(ValueError, match="do not fit a cache of max_length=3"):
        kv_cache.prefill(cache, q, k, v, rq, rk)
    with pytest.raises(ValueError, match="rewired=True; pass runway_query"):
        kv_cache.decode_step(cache, q[:, :1], k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="batch, K, d must match"):
        kv_cache.decode_step(cache, q[:, :1], k[:, :1, :1], v[:, :1, :1], rq[:, :1], rk[:, :1])
    with pytest.raises(ValueError, match=r"lengths.shape=\(3,\)"):
        kv_cache.prefill(cache, *(x[:, :2] for x in (q, k, v, rq, rk)), lengths=jnp.ones(3, jnp.int32))
