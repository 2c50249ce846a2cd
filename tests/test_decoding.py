"""Invariant 8: cached decoding reproduces the full forward pass (METHOD (4))."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from runway_jax.config import model_preset
from runway_jax.decoding import decode_step, init_cache
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
