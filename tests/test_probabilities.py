"""return_probabilities: the softmax weights (A~^h of METHOD eqs. (3)/(7c), A of (1)/(7b), rho of
(2)) from the same computation as the output, every option of (7) honoured, and the runway
analysis drawing its maps from the library attention through the layer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from method_direct import spec_loop
from runway_jax import attention
from runway_jax.attention_layer import (AttentionConfig, init_layer_cache, init_weights,
                                        multi_head_attention)
from runway_jax.config import model_preset
from runway_jax.evaluation import runway_analysis
from runway_jax.model import TransformerLM

BATCH, KEYS, HEADS, KV_HEADS, WIDTH = 2, 9, 4, 2, 8


# NumPy draws and "rbg" keys: each new shape of a threefry draw compiles for seconds on a CPU.
def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def fast_key(seed):
    return jax.random.key(seed, impl="rbg")


def make_inputs(seed, queries=KEYS):
    shapes = [(BATCH, queries, HEADS, WIDTH), (BATCH, KEYS, KV_HEADS, WIDTH),
              (BATCH, KEYS, KV_HEADS, WIDTH), (BATCH, KEYS, WIDTH), (BATCH, KEYS, WIDTH)]
    return [normal(seed * 10 + n, shape) for n, shape in enumerate(shapes)]


def segments():
    ids = np.zeros((BATCH, KEYS), np.int32)
    ids[0, 4:] = 1
    ids[1, 6:] = 1
    return jnp.asarray(ids)


def random_mask(seed, queries=KEYS):
    return jnp.asarray(np.random.default_rng(seed).random((BATCH, queries, KEYS)) < 0.7)


# Every option of METHOD (7), GQA (H = 4 over H_kv = 2) throughout, and ALiBi.
CASES = {
    "plain": dict(),
    "mask_window_cap_segments": dict(mask=random_mask(1), segment_ids=segments(),
                                     local_window_size=4, logits_soft_cap=2.0),
    "fewer_queries_ragged": dict(queries=4, key_value_seq_lengths=jnp.array([9, 6]),
                                 local_window_size=5, mask=random_mask(2, queries=4)),
    "alibi_prefix_dot": dict(alibi_slopes=jnp.array([0.5, 0.25, 0.125, 0.0625]),
                             runway_alibi_slope=0.3, runway_coefficient="dot",
                             runway_span="prefix", logits_soft_cap=3.0),
}


def visibility(queries, *, mask=None, segment_ids=None, local_window_size=None,
               key_value_seq_lengths=None):
    """``V`` [B, Tq, Tk] of METHOD eq. (7a), in NumPy."""
    ends = np.full(BATCH, KEYS) if key_value_seq_lengths is None else np.asarray(key_value_seq_lengths)
    i = (ends[:, None] - queries + np.arange(queries))[..., None]  # [B, Tq, 1] positions
    j = np.arange(KEYS)
    visible = (j <= i) & (i >= 0)
    if local_window_size is not None:
        visible &= i - j <= local_window_size
    if segment_ids is not None:
        ids = np.asarray(segment_ids)
        own = np.take_along_axis(ids, np.clip(i[..., 0], 0, KEYS - 1), axis=1)
        visible &= own[..., None] == ids[:, None, :]
    if mask is not None:
        visible &= np.asarray(mask)
    return visible


def assert_rows_are_distributions(probs, visible):
    """Zero on every key a row may not see; rows that see a key sum to 1, the others to 0."""
    probs = np.asarray(probs)
    visible = np.broadcast_to(visible, probs.shape)
    assert np.all(probs[~visible] == 0.0)
    np.testing.assert_allclose(probs.sum(-1), visible.any(-1).astype(float), atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_probabilities_match_the_spec_loop_and_come_with_the_same_output(case):
    options = dict(CASES[case])
    queries = options.pop("queries", KEYS)
    options.setdefault("runway_coefficient", "bilinear")
    options.setdefault("runway_span", "exact")
    inputs = make_inputs(3, queries)
    out, probs = attention.rewired_attention(*inputs, beta=1.3, return_probabilities=True,
                                             **options)
    want, want_rho, want_runway, want_heads = spec_loop(*inputs, beta=1.3,
                                                        return_probabilities=True, **options)
    np.testing.assert_allclose(probs.heads, want_heads, atol=1e-5, rtol=0)
    np.testing.assert_allclose(probs.runway, want_runway, atol=1e-5, rtol=0)
    np.testing.assert_allclose(probs.runway_coefficients, want_rho, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
    visible = visibility(queries, **{name: options.get(name) for name in (
        "mask", "segment_ids", "local_window_size", "key_value_seq_lengths")})
    assert_rows_are_distributions(probs.heads, visible[:, None])
    assert_rows_are_distributions(probs.runway, visible)
    assert np.all(np.asarray(probs.runway_coefficients)[~visible] == 0.0)
    # The very output of the call: the reference implementation's without the option (the other
    # implementations match it within 1e-5, tests/test_attention_options.py).
    np.testing.assert_allclose(out, attention.rewired_attention(
        *inputs, beta=1.3, implementation="reference", **options), atol=1e-6, rtol=0)

    causal_options = {name: value for name, value in options.items() if name not in (
        "runway_coefficient", "runway_span", "runway_alibi_slope")}
    causal_out, causal_probs = attention.causal_attention(*inputs[:3], return_probabilities=True,
                                                          **causal_options)
    _, _, _, standard = spec_loop(*inputs, beta=0.0, return_probabilities=True, **options)
    np.testing.assert_allclose(causal_probs, standard, atol=1e-5, rtol=0)  # invariant 1
    assert_rows_are_distributions(causal_probs, visible[:, None])
    np.testing.assert_allclose(causal_out, attention.causal_attention(
        *inputs[:3], implementation="reference", **causal_options), atol=1e-6, rtol=0)


def test_probability_rows_that_see_a_nonfinite_input_are_nan_like_their_outputs():
    query, key, value, runway_query, runway_key = make_inputs(4)
    key = key.at[0, 5, 1].set(jnp.nan)  # kv head 1: query heads 2 and 3, rows i >= 5 of batch 0
    out, probs = attention.rewired_attention(query, key, value, runway_query, runway_key,
                                             return_probabilities=True)
    nan_rows = np.isnan(np.asarray(probs.heads)).any(-1)  # [B, H, T]
    np.testing.assert_array_equal(nan_rows, np.isnan(np.asarray(out)).any(-1).transpose(0, 2, 1))
    assert nan_rows[0, 2:, 5:].all() and nan_rows.sum() == 2 * 4
    assert np.isfinite(np.asarray(probs.runway)).all()  # the runway head reads no value or key


@pytest.mark.parametrize("implementation", ["xla", "pallas_gpu", ("pallas_gpu", "xla")])
def test_probabilities_from_an_explicit_non_reference_implementation_are_one_line_errors(
        implementation):
    inputs = make_inputs(5)
    for name, call in (("rewired_attention", lambda **o: attention.rewired_attention(*inputs, **o)),
                       ("causal_attention", lambda **o: attention.causal_attention(*inputs[:3], **o))):
        with pytest.raises(ValueError, match=f"^{name}: return_probabilities=True is computed by "
                                             "implementation='reference' only") as error:
            call(implementation=implementation, return_probabilities=True)
        assert "\n" not in str(error.value)


LAYERS = {  # the default rewired layer: tests/test_analysis.py
    "standard_gqa_alibi": dict(rewire=False, num_kv_heads=2, position="alibi"),
    "keep_output_alibi_prefix": dict(rewire=True, keep_runway_head_output=True, position="alibi",
                                     runway_span="prefix", beta=0.5),
    "group_runway_key_window_cap": dict(rewire=True, num_kv_heads=2, runway_key="group",
                                        local_window_size=3, logits_soft_cap=4.0),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_the_layer_returns_its_output_and_the_probabilities_behind_it(layer):
    # The "xla" the layer names is overridden: the probabilities come from "reference", and
    # the output with them is that implementation's (the same numbers within 1e-5).
    config = AttentionConfig(features=32, num_heads=4, implementation="xla", **LAYERS[layer])
    weights = init_weights(config, fast_key(6))
    x = normal(7, (2, 10, config.features))
    ids = jnp.asarray(np.repeat([[0, 1]], 5, axis=1).repeat(2, axis=0))  # two documents a row
    run = jax.jit(multi_head_attention, static_argnames=("config", "return_probabilities"))
    y, probs = run(x, weights, config, segment_ids=ids, return_probabilities=True)
    reference = dataclasses.replace(config, implementation="reference")
    np.testing.assert_allclose(y, run(x, weights, reference, segment_ids=ids), atol=1e-6, rtol=0)
    output_heads = weights["out"].shape[0]
    assert probs.heads.shape == (2, output_heads, 10, 10)
    assert (probs.runway is None) == (not config.rewire)
    same = np.asarray(ids[:, :, None] == ids[:, None, :]) & np.tri(10, dtype=bool)
    if config.local_window_size is not None:
        same &= ~np.tri(10, k=-config.local_window_size - 1, dtype=bool)
    assert_rows_are_distributions(probs.heads, same[:, None])
    if config.rewire:
        assert_rows_are_distributions(probs.runway, same)
    else:
        with pytest.raises(ValueError, match="^multi_head_attention: return_probabilities=True "
                                             "cannot be combined with a cache"):
            multi_head_attention(x, weights, config, cache=init_layer_cache(config, 2, 10),
                                 prompt_lengths=jnp.array([10, 10]), return_probabilities=True)


def test_the_analysis_maps_come_from_the_library_attention(monkeypatch):
    """Changing nothing but the library's attention (its public function, or the reference
    implementation inside it) changes the analysis' maps."""
    config = AttentionConfig(features=32, num_heads=4)
    weights = init_weights(config, fast_key(8))
    x = normal(9, (1, 7, config.features))
    positions = jnp.arange(7)[None]
    before = runway_analysis.layer_attention(x, weights, config, positions)
    original, original_reference = attention.rewired_attention, attention._reference_rewired_attention
    calls = []

    def stronger_beta(*args, **options):
        calls.append(options.get("return_probabilities"))
        return original(*args, **{**options, "beta": options["beta"] + 2.0})

    monkeypatch.setattr(attention, "rewired_attention", stronger_beta)
    after = runway_analysis.layer_attention(x, weights, config, positions)
    assert calls == [True]
    assert float(jnp.abs(after["probs"] - before["probs"]).max()) > 1e-3
    np.testing.assert_array_equal(after["runway"], before["runway"])  # beta does not enter A
    monkeypatch.setattr(attention, "rewired_attention", original)

    def capped(*args, **options):
        return original_reference(*args, **{**options, "logits_soft_cap": 0.5})

    monkeypatch.setattr(attention, "_reference_rewired_attention", capped)
    after = runway_analysis.layer_attention(x, weights, config, positions)
    for name in ("probs", "runway", "rho"):
        assert float(jnp.abs(after[name] - before[name]).max()) > 1e-3, name


def test_the_analysis_of_packed_rows_stays_inside_each_document():
    config = model_preset("tiny", num_layers=2, rewire_layers=(1,), vocab_size=64, features=32,
                          num_heads=4, mlp_dim=64, attention_implementation="reference")
    model = TransformerLM(config, rngs=nnx.Rngs(fast_key(10)))
    tokens = jnp.asarray(np.random.default_rng(11).integers(0, config.vocab_size, (2, 10)))
    ids = np.array([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3])
    positions = np.array([list(range(4)) + list(range(6)), list(range(7)) + list(range(3))])
    layers = runway_analysis.attention_maps(model, tokens, jnp.asarray(positions), jnp.asarray(ids))
    alone = runway_analysis.attention_maps(model, tokens[:1, 4:])  # row 0's second document
    other = ids[:, :, None] != ids[:, None, :]
    assert sorted(layers[0]) == ["probs"] and sorted(layers[1]) == ["probs", "rho", "runway"]
    for maps, maps_alone in zip(layers, alone):
        for name, image in maps.items():
            image = np.asarray(image)
            crossing = np.broadcast_to(other if image.ndim == 3 else other[:, None], image.shape)
            assert np.all(image[crossing] == 0.0), name
            np.testing.assert_allclose(image[0, ..., 4:, 4:], maps_alone[name][0], atol=1e-5,
                                       err_msg=name)
