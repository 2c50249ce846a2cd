"""The layer's options for existing models (Gemma-, Llama-, Mistral-style attention): logit scale,
window and soft cap (METHOD (7)), QK-norm, RoPE position interpolation and the grouped-query
runway key, each against a computation written here without the library's attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from runway_jax import linen
from runway_jax.attention_layer import (AttentionConfig, RewiredMultiHeadAttention,
                                        init_layer_cache, multi_head_attention)
from runway_jax.config import model_preset
from runway_jax.model import TransformerLM, count_parameters

FEATURES, HEADS, LENGTH = 32, 4, 10
WIDTH = FEATURES // HEADS


def hand_rope(x, positions, base, factor):
    """Half-split RoPE at positions / factor (angles in float64 NumPy)."""
    half = x.shape[-1] // 2
    frequencies = base ** (-np.arange(0, 2 * half, 2) / (2 * half))
    angles = (np.asarray(positions, np.float64) / factor)[:, :, None, None] * frequencies
    cos, sin = np.float32(np.cos(angles)), np.float32(np.sin(angles))
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def dense_rewired(q, k, v, rq, rk, *, beta, coefficient, span, window, cap, scale):
    """METHOD eqs. (2), (3) with (7a)-(7c) as dense einsums; one key/value head per query head."""
    length = q.shape[1]
    i, j = np.arange(length)[:, None], np.arange(length)[None]
    visible = (j <= i) & ((i - j <= window) if window is not None else True)
    capped = (lambda x: x) if cap is None else (lambda x: cap * jnp.tanh(x / cap))

    def softmax(logits):
        return jax.nn.softmax(jnp.where(visible, capped(logits), -jnp.inf), axis=-1)

    A = softmax(scale * jnp.einsum("bid,bjd->bij", rq, rk))
    g = scale * jnp.einsum("bkd,bjd->bkj", rq if coefficient == "bilinear" else rk, rk)
    kk = np.arange(length)[None, :, None]
    ii, jj = i[:, :, None], j[:, None, :]
    runway = ((jj < kk) & (kk < ii)) if span == "exact" else (kk < ii) & (jj >= 0)  # [i, k, j]
    rho = jnp.where(visible, jnp.einsum("bik,bkj,ikj->bij", A, g, runway.astype(np.float32)), 0.0)
    logits = scale * jnp.einsum("bihd,bjhd->bhij", q, k) - beta * rho[:, None]
    return jnp.einsum("bhij,bjhd->bihd", softmax(logits), v)


def reference_layer(x, weights, config, positions=None):
    """The layer from its definition: projections, QK-norm, RoPE at positions / factor, the
    runway head and each attending head's key/value head gathered explicitly, eq. (3), output."""
    batch, length, _ = x.shape
    positions = np.broadcast_to(np.arange(length), (batch, length)) if positions is None else positions
    q = jnp.einsum("btD,DHd->btHd", x, weights["query"])
    k = jnp.einsum("btD,DKd->btKd", x, weights["key"])
    v = jnp.einsum("btD,DKd->btKd", x, weights["value"])
    if config.qk_norm:
        def rms(y, scale):
            return y / jnp.sqrt(jnp.mean(y ** 2, -1, keepdims=True) + config.qk_norm_eps) * scale
        q, k = rms(q, weights["query_norm"]), rms(k, weights["key_norm"])
    if config.position == "rope":
        q, k = (hand_rope(y, positions, config.rope_base, config.rope_scaling_factor) for y in (q, k))
    heads, kv = config.num_heads, config.kv_heads
    attending = heads - 1
    # Query head h's key/value head: h // (H / H_kv) with "group", h // ((H - 1) / H_kv) with "own".
    group_size = heads // kv if config.runway_key == "group" else attending // kv
    index = np.arange(attending) // group_size
    out = dense_rewired(q[:, :, :attending], k[:, :, index], v[:, :, index], q[:, :, -1], k[:, :, -1],
                        beta=config.beta, coefficient=config.runway_coefficient,
                        span=config.runway_span, window=config.local_window_size,
                        cap=config.logits_soft_cap,
                        scale=config.scale if config.scale is not None else WIDTH ** -0.5)
    return jnp.einsum("btHd,HdD->btD", out, weights["out"])


def random_weights(config, seed):
    """Weights of ``config`` with random norm scales too (ones would hide a missing scale)."""
    keys = jax.random.split(jax.random.key(seed), 6)
    return {name: (0.4 * jax.random.normal(key, shape) if len(shape) == 3
                   else 1.0 + 0.3 * jax.random.normal(key, shape))
            for key, (name, shape) in zip(keys, config.weight_shapes().items())}


OPTIONS = {
    "window-cap-scale": dict(local_window_size=3, logits_soft_cap=2.0, scale=0.5),
    "qknorm-ropescale-prefix-dot": dict(qk_norm=True, rope_scaling_factor=2.5,
                                        runway_span="prefix", runway_coefficient="dot"),
    "group-window-cap": dict(runway_key="group", num_kv_heads=2, local_window_size=4,
                             logits_soft_cap=3.0, beta=1.3),
    "group-qknorm-scale-gqa1": dict(runway_key="group", num_kv_heads=1, qk_norm=True, scale=0.2,
                                    rope_scaling_factor=4.0),
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_layer_equals_its_definition(options):
    config = AttentionConfig(features=FEATURES, num_heads=HEADS, **options)
    weights = random_weights(config, 0)
    x = jax.random.normal(jax.random.key(1), (2, LENGTH, FEATURES))
    np.testing.assert_allclose(multi_head_attention(x, weights, config),
                               reference_layer(x, weights, config), atol=2e-5, rtol=0)


def test_group_runway_key_gradients_are_exact():
    """The runway head's placeholder slot is dropped, so its output passes a zero cotangent: the
    gradients equal those of the explicitly gathered computation (METHOD (3d) through (1))."""
    config = AttentionConfig(features=FEATURES, num_heads=HEADS, num_kv_heads=2, runway_key="group",
                             qk_norm=True, beta=0.8)
    weights = random_weights(config, 2)
    x = jax.random.normal(jax.random.key(3), (1, 8, FEATURES))
    cotangent = jax.random.normal(jax.random.key(4), x.shape)
    grads = [jax.jit(jax.grad(lambda w: jnp.sum(layer(x, w, config) * cotangent)))(weights)
             for layer in (multi_head_attention, reference_layer)]
    for name in weights:
        np.testing.assert_allclose(grads[0][name], grads[1][name], atol=1e-4, rtol=0, err_msg=name)
    assert float(jnp.abs(grads[0]["query"][:, -1]).max()) > 1e-4  # the runway head learns


def test_group_runway_key_beta_zero_is_the_original_gqa_layer_without_one_head():
    """With beta = 0, runway_key="group" is the standard grouped-query layer over the same
    weights with head H - 1's output dropped, and it has exactly that layer's parameters minus the
    out-projection slice of one head (D * d): none are new."""
    config = AttentionConfig(features=FEATURES, num_heads=HEADS, num_kv_heads=2, runway_key="group",
                             beta=0.0)
    standard = dataclasses.replace(config, rewire=False)
    assert standard.num_parameters() - config.num_parameters() == FEATURES * WIDTH
    shapes = config.weight_shapes()
    assert {n: s for n, s in standard.weight_shapes().items() if n != "out"} == {
        n: s for n, s in shapes.items() if n != "out"}
    layer = RewiredMultiHeadAttention(config, rngs=nnx.Rngs(5))
    assert sum(p.size for p in jax.tree.leaves(nnx.state(layer, nnx.Param))) == config.num_parameters()
    x = jax.random.normal(jax.random.key(6), (2, LENGTH, FEATURES))
    weights = layer.weights()
    padded_out = jnp.concatenate([weights["out"], jnp.zeros((1, WIDTH, FEATURES))])
    np.testing.assert_allclose(layer(x), multi_head_attention(x, dict(weights, out=padded_out), standard),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("kv", [None, 1])
def test_parameter_count_invariant_5_with_qk_norm(qk_norm, kv):
    rewired = AttentionConfig(features=FEATURES, num_heads=HEADS, num_kv_heads=kv, qk_norm=qk_norm)
    standard = AttentionConfig(features=FEATURES, num_heads=HEADS, qk_norm=qk_norm, rewire=False)
    layer = RewiredMultiHeadAttention(rewired, rngs=nnx.Rngs(0))
    assert sum(p.size for p in jax.tree.leaves(nnx.state(layer, nnx.Param))) == rewired.num_parameters()
    assert ("query_norm" in rewired.weight_shapes()) == qk_norm
    if kv is None:
        assert standard.num_parameters() - rewired.num_parameters() == 2 * FEATURES * WIDTH
    if qk_norm:
        np.testing.assert_array_equal(layer.query_norm[...], np.ones(WIDTH))
        # The projections draw the same numbers with and without QK-norm.
        plain = RewiredMultiHeadAttention(dataclasses.replace(rewired, qk_norm=False), rngs=nnx.Rngs(0))
        np.testing.assert_array_equal(layer.key[...], plain.key[...])


@pytest.mark.parametrize("options", [OPTIONS["group-window-cap"],
                                     dict(OPTIONS["qknorm-ropescale-prefix-dot"], scale=0.3)],
                         ids=["group", "own"])
def test_linen_matches_nnx_with_the_new_options(options):
    config = AttentionConfig(features=FEATURES, num_heads=HEADS, **dict(options, qk_norm=True))
    layer = RewiredMultiHeadAttention(config, rngs=nnx.Rngs(7))
    layer.key_norm[...] = jnp.linspace(0.5, 1.5, WIDTH)
    x = jax.random.normal(jax.random.key(8), (2, LENGTH, FEATURES))
    linen_layer = linen.RewiredMultiHeadAttention(config)
    variables = linen_layer.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, variables["params"]) == jax.tree.map(jnp.shape, layer.weights())
    np.testing.assert_array_equal(linen_layer.apply({"params": layer.weights()}, x), layer(x))


def test_cached_decoding_with_window_cap_and_group_runway_key_equals_the_full_pass():
    """Invariant 8 with the new options: a ragged prefill, then one token per step."""
    config = AttentionConfig(features=FEATURES, num_heads=HEADS, num_kv_heads=2, runway_key="group",
                             local_window_size=3, logits_soft_cap=2.5, qk_norm=True, scale=0.4,
                             rope_scaling_factor=2.0)
    weights = random_weights(config, 9)
    x = jax.random.normal(jax.random.key(10), (2, LENGTH, FEATURES))
    full = multi_head_attention(x, weights, config)
    lengths = np.array([6, 3])
    prompt = 6

    @jax.jit
    def prefill(cache, x, lengths):
        return multi_head_attention(x, weights, config, cache=cache, prompt_lengths=lengths)

    @jax.jit
    def step(cache, x):
        return multi_head_attention(x, weights, config, cache=cache)

    out, cache = prefill(init_layer_cache(config, 2, LENGTH), x[:, :prompt], jnp.asarray(lengths))
    for b in range(2):
        np.testing.assert_allclose(out[b, :lengths[b]], full[b, :lengths[b]], atol=2e-5, rtol=0)
    for t in range(LENGTH - prompt):
        rows = lengths + t
        out, cache = step(cache, x[np.arange(2), rows][:, None])
        np.testing.assert_allclose(out[:, 0], full[np.arange(2), rows], atol=2e-5, rtol=0,
                                   err_msg=f"step {t}")


def test_model_config_passes_the_options_to_every_layer():
    overrides = dict(num_kv_heads=2, runway_key="group", attention_scale=0.25, local_window_size=5,
                     attention_logits_soft_cap=30.0, qk_norm=True, rope_scaling_factor=8.0)
    config = model_preset("tiny", **overrides)
    layer = config.attention_config(0)
    assert (layer.num_kv_heads, layer.runway_key, layer.scale, layer.local_window_size,
            layer.logits_soft_cap, layer.qk_norm, layer.qk_norm_eps, layer.rope_scaling_factor) == (
        2, "group", 0.25, 5, 30.0, True, config.attention.qk_norm_eps, 8.0)
    model = nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0)))
    assert model.blocks[1].attention.config == config.attention_config(1)
    # "group": one out-projection slice per layer fewer than the same GQA baseline.
    assert count_parameters(config.baseline()) - count_parameters(config) == (
        config.num_layers * config.features * (config.features // config.num_heads))


@pytest.mark.parametrize("field,value,needle", [
    ("scale", 0.0, "scale=0.0"),
    ("scale", float("inf"), "scale"),
    ("local_window_size", -1, "local_window_size"),
    ("local_window_size", 2.5, "local_window_size"),
    ("logits_soft_cap", -3.0, "logits_soft_cap"),
    ("qk_norm", "yes", "qk_norm"),
    ("rope_scaling_factor", 0.5, ">= 1"),
    ("runway_key", "shared", "runway_key"),
])
def test_bad_values_are_one_line_errors(field, value, needle):
    with pytest.raises(ValueError, match=needle) as error:
        AttentionConfig(features=FEATURES, num_heads=HEADS, **{field: value})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("options,needle", [
    (dict(runway_key="group"), "grouped-query"),  # one key/value head per query head
    (dict(runway_key="group", num_kv_heads=3), "divides num_heads=4"),
    (dict(runway_key="group", num_kv_heads=2, keep_runway_head_output=True), "runway_key='own'"),
    (dict(rope_scaling_factor=2.0, position="alibi"), "position='alibi'"),
])
def test_inconsistent_options_are_one_line_errors(options, needle):
    with pytest.raises(ValueError, match=needle) as error:
        AttentionConfig(features=FEATURES, num_heads=HEADS, **options)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="runway_key"):
        model_preset("tiny", runway_key="shared")
