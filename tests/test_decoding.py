"""Invariant 8: cached decoding reproduces the full forward pass (METHOD (4))."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from runway_jax.config import model_preset
from runway_jax.decoding import decode_step, generate, init_cache
from runway_jax.model import TransformerLM


@pytest.mark.parametrize("overrides", [
    {"runway_span": "exact"},
    {"runway_span": "prefix", "runway_coefficient": "dot"},
    {"rewire": False},
    {"position": "alibi", "keep_runway_head_output": True},
    {"num_kv_heads": 1, "rewire_layers": (1,), "beta": 2.0},
])
def test_cached_decoding_matches_the_full_forward(overrides):
    config = model_preset("tiny", **overrides)
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, config.vocab_size)
    full = model(tokens)  # [B, T, V]
    step = nnx.jit(decode_step)
    cache = init_cache(model, batch=2, length=16)
    for position in range(tokens.shape[1]):
        logits, cache = step(model, cache, tokens[:, position], position)
        np.testing.assert_allclose(logits, full[:, position], atol=2e-5, rtol=0,
                                   err_msg=f"position {position}")


def test_greedy_generation_equals_argmax_over_full_forward_passes():
    config = model_preset("tiny")
    model = TransformerLM(config, rngs=nnx.Rngs(3))
    prompt = jax.random.randint(jax.random.key(4), (2, 5), 0, config.vocab_size)
    generated = generate(model, prompt, max_new_tokens=6)
    naive = prompt
    for _ in range(6):
        naive = jnp.concatenate([naive, jnp.argmax(model(naive)[:, -1], -1)[:, None]], axis=1)
    np.testing.assert_array_equal(generated, naive)


def test_sampling_is_seeded_and_truncation_limits_the_choices():
    config = model_preset("tiny")
    model = TransformerLM(config, rngs=nnx.Rngs(5))
    prompt = jnp.zeros((3, 4), jnp.int32)
    greedy = generate(model, prompt, max_new_tokens=5)
    key = jax.random.key(7)
    sampled = generate(model, prompt, max_new_tokens=5, temperature=1.0, rng=key)
    np.testing.assert_array_equal(sampled, generate(model, prompt, max_new_tokens=5, temperature=1.0, rng=key))
    assert not np.array_equal(sampled, greedy)  # 15 draws from ~512 tokens
    np.testing.assert_array_equal(generate(model, prompt, max_new_tokens=5, temperature=1.0, top_k=1, rng=key), greedy)
    np.testing.assert_array_equal(generate(model, prompt, max_new_tokens=5, temperature=1.0, top_p=1e-6, rng=key), greedy)
    with pytest.raises(ValueError, match="cache_length"):
        generate(model, prompt, max_new_tokens=5, cache_length=6)
