"""The attention layer (NNX and Linen), its options, position encodings and parameter counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from runway_jax import linen
from runway_jax.attention_layer import (AttentionConfig, RewiredMultiHeadAttention,
                                        multi_head_attention)
from runway_jax.positions import alibi_slopes, apply_rope

FEATURES, HEADS = 32, 4


def layer_and_input(seed=0, length=12, **options):
    config = AttentionConfig(features=FEATURES, num_heads=HEADS, **options)
    layer = RewiredMultiHeadAttention(config, rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed + 100), (2, length, FEATURES))
    return layer, x


def weights_of(layer):
    return {name: getattr(layer, name)[...] for name in ("query", "key", "value", "out")}


@pytest.mark.parametrize("options", [
    {}, {"rewire": False}, {"runway_span": "prefix", "runway_coefficient": "dot"},
    {"keep_runway_head_output": True}, {"position": "alibi"}, {"num_kv_heads": 1},
])
def test_linen_matches_nnx_with_the_same_weights(options):
    layer, x = layer_and_input(**options)
    segments = jnp.asarray(np.repeat([[0, 1]], [5, 7], axis=1).repeat(2, 0), jnp.int32)
    want = layer(x, segment_ids=segments)
    linen_layer = linen.RewiredMultiHeadAttention(layer.config)
    variables = linen_layer.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, variables["params"]) == jax.tree.map(jnp.shape, weights_of(layer))
    got = linen_layer.apply({"params": weights_of(layer)}, x, segment_ids=segments)
    np.testing.assert_array_equal(got, want)


def test_rewire_false_is_standard_multi_head_attention():
    """rewire=False: all H heads attend, with no runway head, from the same code."""
    layer, x = layer_and_input(rewire=False)
    w = weights_of(layer)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    q = apply_rope(jnp.einsum("btD,DHd->btHd", x, w["query"]), positions)
    k = apply_rope(jnp.einsum("btD,DHd->btHd", x, w["key"]), positions)
    v = jnp.einsum("btD,DHd->btHd", x, w["value"])
    heads = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    want = jnp.einsum("btHd,HdD->btD", heads, w["out"])
    np.testing.assert_allclose(layer(x), want, atol=1e-5, rtol=0)


def test_beta_zero_layer_is_a_standard_layer_of_the_other_heads():
    """Invariant 1 at the layer level: with beta = 0 the runway head has no effect."""
    layer, x = layer_and_input(beta=0.0)
    standard = AttentionConfig(features=FEATURES, num_heads=HEADS - 1, head_dim=FEATURES // HEADS,
                               rewire=False)
    w = weights_of(layer)
    standard_weights = dict(w, query=w["query"][:, :-1], key=w["key"][:, :-1])
    np.testing.assert_allclose(layer(x), multi_head_attention(x, standard_weights, standard),
                               atol=1e-5, rtol=0)
    grads = nnx.grad(lambda m: m(x).sum())(layer)
    assert float(jnp.abs(grads.query[...][:, -1]).max()) == 0.0  # runway head unused at beta = 0


def test_runway_head_receives_gradients_when_rewired():
    """Eq. (3): gradients flow through rho into the runway head's query and key."""
    layer, x = layer_and_input(beta=1.0)
    grads = nnx.grad(lambda m: (m(x) ** 2).sum())(layer)
    assert float(jnp.abs(grads.query[...][:, -1]).max()) > 1e-4
    assert float(jnp.abs(grads.key[...][:, -1]).max()) > 1e-4


@pytest.mark.parametrize("options", [{}, {"rewire": False}, {"runway_span": "prefix"}])
def test_rope_depends_only_on_relative_position(options):
    """RoPE is applied to every query and key, the runway head's included: shifting all positions
    by a constant leaves the layer's output unchanged."""
    layer, x = layer_and_input(**options)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    np.testing.assert_allclose(layer(x, positions=positions), layer(x, positions=positions + 37),
                               atol=2e-5, rtol=0)


@pytest.mark.parametrize("position", ["rope", "nope", "alibi"])
def test_position_encodings_run_and_differ(position):
    layer, x = layer_and_input(position=position)
    out = layer(x)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    other = "nope" if position != "nope" else "rope"
    changed = dataclasses.replace(layer.config, position=other)
    assert float(jnp.abs(multi_head_attention(x, weights_of(layer), changed) - out).max()) > 1e-3


def test_alibi_slopes_follow_press_et_al():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -(h + 1) for h in range(8)], rtol=1e-6)
    six = np.asarray(alibi_slopes(6))
    np.testing.assert_allclose(six[:4], [2.0 ** (-2 * (h + 1)) for h in range(4)], rtol=1e-6)
    np.testing.assert_allclose(six[4:], [2.0 ** -1, 2.0 ** -3], rtol=1e-6)


@pytest.mark.parametrize("features,heads,kv", [(32, 4, None), (64, 8, None), (48, 4, 3), (48, 4, 1)])
def test_parameter_count_invariant_5(features, heads, kv):
    """Invariant 5: a rewired layer has 2 * D * d fewer parameters (multi-head attention); with
    keep_runway_head_output it matches the standard layer."""
    width = features // heads
    rewired = AttentionConfig(features=features, num_heads=heads, num_kv_heads=kv)
    kept = dataclasses.replace(rewired, keep_runway_head_output=True)
    standard = AttentionConfig(features=features, num_heads=heads, rewire=False)
    layer = RewiredMultiHeadAttention(rewired, rngs=nnx.Rngs(0))
    counted = sum(x.size for x in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    assert counted == rewired.num_parameters()
    if kv is None:
        assert standard.num_parameters() - rewired.num_parameters() == 2 * features * width
        assert kept.num_parameters() == standard.num_parameters()


def test_bfloat16_compute_keeps_float32_parameters():
    config = AttentionConfig(features=FEATURES, num_heads=HEADS)
    layer = RewiredMultiHeadAttention(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(3), (2, 12, FEATURES))
    out = layer(x)
    assert out.dtype == jnp.bfloat16 and layer.query[...].dtype == jnp.float32
    float32_layer = nnx.clone(layer)
    float32_layer.dtype = None
    np.testing.assert_allclose(out.astype(jnp.float32), float32_layer(x), atol=5e-2, rtol=0)


@pytest.mark.parametrize("field,value,needle", [
    ("num_heads", 1, "runway head"),
    ("num_heads", 5, "divide features"),
    ("num_kv_heads", 2, "attending heads"),
    ("beta", -0.5, "beta"),
    ("runway_span", "full", "runway_span"),
    ("runway_coefficient", "cos", "runway_coefficient"),
    ("position", "sinusoidal", "position"),
    ("implementation", "triton", "implementation"),
])
def test_config_validation_names_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle) as error:
        AttentionConfig(**{"features": FEATURES, "num_heads": HEADS, field: value})
    assert "\n" not in str(error.value)


def test_pure_function_is_usable_directly():
    """The layer is a thin shell: the pure function on the same weights gives the same output."""
    layer, x = layer_and_input(runway_span="prefix")
    np.testing.assert_array_equal(layer(x), multi_head_attention(x, weights_of(layer), layer.config))
