"""Invariant 8: cached decoding reproduces the full forward pass (METHOD (4)), for ragged batches
padded on either side; generation stops at an end token; decoding is the library's attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from runway_jax import attention
from runway_jax.config import model_preset
from runway_jax.decoding import decode_step, generate, init_cache, prefill
from runway_jax.model import TransformerLM


def _model(seed=0, **overrides):
    config = model_preset("tiny", **overrides)
    return config, TransformerLM(config, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("overrides", [
    {"runway_span": "exact"},
    {"runway_span": "prefix", "runway_coefficient": "dot"},
    {"rewire": False},
    {"position": "alibi", "keep_runway_head_output": True},
    {"num_kv_heads": 1, "rewire_layers": (1,), "beta": 2.0},
])
def test_prefill_and_decode_steps_match_the_full_forward_for_ragged_rows(overrides):
    config, model = _model(**overrides)
    tokens = jax.random.randint(jax.random.key(1), (3, 13), 0, config.vocab_size)
    full = model(tokens)  # [B, T, V]; row b's first lengths[b] tokens are its prompt
    lengths = jnp.array([6, 2, 4])
    logits, cache = nnx.jit(prefill)(model, init_cache(model, batch=3, length=16), tokens[:, :6],
                                     lengths)
    step = nnx.jit(decode_step)
    for t in range(7):
        rows = lengths + t  # the position each row has reached
        np.testing.assert_allclose(logits, full[jnp.arange(3), rows - 1], atol=2e-5, rtol=0,
                                   err_msg=f"step {t}")
        logits, cache = step(model, cache, tokens[jnp.arange(3), rows])
    np.testing.assert_array_equal(cache[0]["heads"].lengths, lengths + 7)


@nnx.jit
def _last_logits(model, tokens):
    return model(tokens)[:, -1]


def _naive_greedy(model, prompt, steps):
    """Greedy decoding by full forward passes, one per new token (no cache)."""
    for _ in range(steps):
        prompt = jnp.concatenate([prompt, jnp.argmax(_last_logits(model, prompt), -1)[:, None]],
                                 axis=1)
    return prompt


def test_greedy_generation_equals_argmax_over_full_forward_passes():
    config, model = _model(3)
    prompt = jax.random.randint(jax.random.key(4), (2, 5), 0, config.vocab_size)
    np.testing.assert_array_equal(generate(model, prompt, max_new_tokens=6),
                                  _naive_greedy(model, prompt, 6))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_ragged_prompts_padded_on_either_side_continue_each_row_alone(padding_side):
    config, model = _model(6)
    prompts = [jax.random.randint(jax.random.key(7 + n), (1, n), 1, config.vocab_size) for n in (5, 2)]
    pad = 0
    padded = jnp.concatenate([jnp.pad(p, ((0, 0), (0, 5 - p.shape[1]) if padding_side == "right"
                                             else (5 - p.shape[1], 0)), constant_values=pad)
                              for p in prompts])
    out = generate(model, padded, max_new_tokens=4, prompt_lengths=jnp.array([5, 2]),
                   padding_side=padding_side, pad_token=pad)
    assert out.shape == (2, 9)
    for b, p in enumerate(prompts):
        alone = _naive_greedy(model, p, 4)[0]  # 5 + 4 or 2 + 4 tokens
        padding = jnp.full((9 - alone.shape[0],), pad, alone.dtype)
        expected = jnp.concatenate([alone, padding] if padding_side == "right" else [padding, alone])
        np.testing.assert_array_equal(out[b], expected, err_msg=f"row {b}")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_a_row_stops_after_its_end_token(padding_side):
    config, model = _model(8)
    prompt = jax.random.randint(jax.random.key(9), (2, 4), 1, config.vocab_size)
    sample = dict(max_new_tokens=6, temperature=1.0, rng=jax.random.key(12))
    free = np.asarray(generate(model, prompt, **sample))
    # The end token: a token of row 0's continuation that is new there and absent from row 1's.
    stop = next(t for t in range(5, 9) if free[0, t] not in free[0, 4:t] and free[0, t] not in free[1, 4:])
    out = np.asarray(generate(model, prompt, **sample, end_token=int(free[0, stop]), pad_token=-1,
                              padding_side=padding_side))
    row0 = np.concatenate([free[0, :stop + 1], np.full(9 - stop, -1)])
    np.testing.assert_array_equal(out[0], row0 if padding_side == "right" else np.roll(row0, 9 - stop))
    np.testing.assert_array_equal(out[1], free[1])


def test_sampling_is_seeded_and_truncation_limits_the_choices():
    _, model = _model(5)
    prompt = jnp.zeros((3, 4), jnp.int32)
    greedy = generate(model, prompt, max_new_tokens=5)
    key = jax.random.key(7)
    sampled = generate(model, prompt, max_new_tokens=5, temperature=1.0, rng=key)
    np.testing.assert_array_equal(sampled, generate(model, prompt, max_new_tokens=5, temperature=1.0, rng=key))
    assert not np.array_equal(sampled, greedy)  # 15 draws from ~512 tokens
    np.testing.assert_array_equal(generate(model, prompt, max_new_tokens=5, temperature=1.0, top_k=1, rng=key), greedy)
    np.testing.assert_array_equal(generate(model, prompt, max_new_tokens=5, temperature=1.0, top_p=1e-6, rng=key), greedy)


def test_bad_generation_arguments_are_one_line_errors():
    _, model = _model()
    prompt = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="cache_length"):
        generate(model, prompt, max_new_tokens=5, cache_length=6)
    with pytest.raises(ValueError, match=r"prompt length must be in \[1, 4\]"):
        generate(model, prompt, max_new_tokens=2, prompt_lengths=jnp.array([4, 5]))
    with pytest.raises(ValueError, match="padding_side='middle'"):
        generate(model, prompt, max_new_tokens=2, padding_side="middle")
    with pytest.raises(ValueError, match="segment_ids cannot be combined with a cache"):
        model(prompt, segment_ids=jnp.zeros_like(prompt), cache=model.init_cache(2, 4),
              prompt_lengths=jnp.array([4, 4]))


def test_decoding_runs_the_librarys_attention(monkeypatch):
    """Changing nothing but runway_jax.attention.rewired_attention changes the decoded logits."""
    _, model = _model(10)
    prompt = jax.random.randint(jax.random.key(11), (2, 5), 0, 512)
    original = attention.rewired_attention
    before, _ = prefill(model, init_cache(model, 2, 6), prompt)
    calls = []

    def halved(*args, **kwargs):
        calls.append(kwargs.get("key_value_seq_lengths") is not None)
        return 0.5 * original(*args, **kwargs)

    monkeypatch.setattr(attention, "rewired_attention", halved)
    after, cache = prefill(model, init_cache(model, 2, 6), prompt)
    stepped, _ = decode_step(model, cache, prompt[:, 0])
    assert calls and calls[0] is False and calls[-1] is True  # prefill, then a cached step
    assert float(jnp.abs(after - before).max()) > 1e-3
    monkeypatch.setattr(attention, "rewired_attention", original)
    unchanged, _ = decode_step(model, prefill(model, init_cache(model, 2, 6), prompt)[1], prompt[:, 0])
    assert float(jnp.abs(stepped - unchanged).max()) > 1e-3
