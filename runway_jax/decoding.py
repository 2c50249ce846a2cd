"""Decoding with a fixed-size cache, METHOD eq. (4).

For each layer the cache holds the keys and values of the attending heads and, in rewired layers,
the runway head's ``z`` (its keys) and ``w`` (its queries for the bilinear kernel, its keys for
the dot kernel). A new token t costs ``O(t d)`` per layer, like standard decoding: its runway
attention row ``A_t.`` over the cache, the running sums ``P_t(j) = sum_{k <= j} A_tk w_k``, and

  rho_tj = scale * <P_t(t-1) - P_t(j), z_j>   for j <= t - 2   (exact; eq. (3b))
  rho_tj = scale * <P_t(t-1), z_j>            for j <= t       (prefix)

then the rewired heads attend with logits ``s_tj - beta * rho_tj`` (eq. (3)). Logits equal those
of the full forward pass (invariant 8). Rows of a batch decode in lockstep at one shared position.

Shape letters: B batch, S cache length, K key/value heads, G query heads per K, d head width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from runway_jax.attention_layer import project
from runway_jax.masking import MASK_VALUE
from runway_jax.positions import alibi_slopes


def init_cache(model, batch: int, length: int) -> list[dict]:
    """An empty cache of ``length`` positions for every layer of ``model`` (a TransformerLM)."""
    caches = []
    for block in model.blocks:
        config = block.attention.config
        width = config.head_width
        dtype = block.attention.dtype or jnp.float32
        layer = {
            "key": jnp.zeros((batch, length, config.kv_heads, width), dtype),
            "value": jnp.zeros((batch, length, config.kv_heads + int(config.keeps_runway_output), width), dtype),
        }
        if config.rewire:
            layer["runway_key"] = jnp.zeros((batch, length, width), jnp.float32)  # z
            layer["runway_values"] = jnp.zeros((batch, length, width), jnp.float32)  # w
        caches.append(layer)
    return caches


def decode_step(model, cache: list[dict], tokens, position):
    """Feed ``tokens`` ``[B]`` at ``position`` (a scalar int): returns float32 logits ``[B, V]``
    for the next token and the updated cache."""
    x = model.embed(tokens[:, None])  # [B, 1, D]
    new_cache = []
    for block, layer_cache in zip(model.blocks, cache):
        attended, layer_cache = _attention_step(block.attention, block.attention_norm(x), layer_cache, position)
        x = x + attended
        x = x + block.mlp(block.mlp_norm(x))
        new_cache.append(layer_cache)
    return model.logits(x)[:, 0], new_cache


def _attention_step(layer, x, cache, position):
    config = layer.config
    dtype = layer.dtype or x.dtype
    weights = {name: getattr(layer, name)[...] for name in ("query", "key", "value", "out")}
    batch = x.shape[0]
    positions = jnp.full((batch, 1), position, jnp.int32)
    query, key, value = project(x, weights, config, positions, dtype)  # [B, 1, ., d]
    scale = 1.0 / jnp.sqrt(jnp.float32(config.head_width))
    cache_positions = jnp.arange(cache["key"].shape[1])
    visible = cache_positions <= position  # [S]
    slopes = alibi_slopes(config.num_heads) if config.position == "alibi" else None
    distance = (position - cache_positions).astype(jnp.float32)  # [S]
    kv_heads = config.kv_heads

    def write(name, new):
        return jax.lax.dynamic_update_slice_in_dim(cache[name], new.astype(cache[name].dtype), position, axis=1)

    cache = dict(cache, key=write("key", key[:, :, :kv_heads]), value=write("value", value))
    bias = None
    if config.rewire:
        runway_query = query[:, 0, -1].astype(jnp.float32)  # [B, d]
        runway_key = key[:, :, -1].astype(jnp.float32)  # [B, 1, d]
        runway_value = (query[:, :, -1] if config.runway_coefficient == "bilinear" else key[:, :, -1])
        cache = dict(cache, runway_key=write("runway_key", runway_key),
                     runway_values=write("runway_values", runway_value.astype(jnp.float32)))
        z, w = cache["runway_key"], cache["runway_values"]  # [B, S, d]
        logits = scale * jnp.einsum("bd,bsd->bs", runway_query, z)
        if slopes is not None:
            logits = logits - slopes[-1] * distance
        runway_probs = _softmax(logits, visible)  # A_t., [B, S]
        weighted = runway_probs[..., None] * w  # A_tk w_k
        prefix_sums = jnp.cumsum(weighted, axis=1)  # P_t(j), [B, S, d]
        summary = jnp.sum(jnp.where((cache_positions < position)[:, None], weighted, 0.0), 1)  # u_t
        if config.runway_span == "exact":
            rho = scale * jnp.einsum("bsd,bsd->bs", summary[:, None] - prefix_sums, z)
            rho = jnp.where(cache_positions <= position - 2, rho, 0.0)
        else:
            rho = jnp.where(visible, scale * jnp.einsum("bd,bsd->bs", summary, z), 0.0)
        bias = -config.beta * rho  # [B, S]
        heads_query = query[:, 0, :-1]
    else:
        heads_query = query[:, 0]
    groups = heads_query.shape[1] // kv_heads
    heads_query = heads_query.reshape(batch, kv_heads, groups, -1)
    logits = scale * jnp.einsum("bkgd,bskd->bkgs", heads_query, cache["key"],
                                preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias[:, None, None]
    if slopes is not None:
        head_slopes = slopes[: config.attending_heads].reshape(kv_heads, groups)
        logits = logits - head_slopes[None, :, :, None] * distance
    probs = _softmax(logits, visible)
    heads = jnp.einsum("bkgs,bskd->bkgd", probs.astype(dtype), cache["value"][:, :, :kv_heads],
                       preferred_element_type=jnp.float32).reshape(batch, 1, -1, config.head_width)
    if config.keeps_runway_output:  # the ablation: the runway head's own output
        runway_output = jnp.einsum("bs,bsd->bd", runway_probs, cache["value"][:, :, kv_heads].astype(jnp.float32))
        heads = jnp.concatenate([heads, runway_output[:, None, None].astype(heads.dtype)], axis=2)
    out = jnp.einsum("btHd,HdD->btD", heads.astype(dtype), weights["out"].astype(dtype))
    return out, cache


def _softmax(logits, visible):
    """Float32 softmax over the visible cache positions (the rest exactly 0)."""
    probs = jax.nn.softmax(jnp.where(visible, logits.astype(jnp.float32), MASK_VALUE), axis=-1)
    return jnp.where(visible, probs, 0.0)


def generate(model, prompt, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, rng=None,
             cache_length: int | None = None):
    """Continue ``prompt`` ``[B, P]`` by ``max_new_tokens`` tokens: greedy when ``temperature``
    is 0, else sampled (optionally restricted to the ``top_k`` tokens and/or the smallest set
    of tokens whose probability reaches ``top_p``). Returns ``[B, P + max_new_tokens]``.

    One jit-compiled program with a fixed-size cache (``cache_length``, default just enough);
    the prompt is fed through the same cached step, one position at a time."""
    if max_new_tokens < 1 or temperature < 0 or (top_k is not None and top_k < 1) or (
            top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1, temperature="
                         f"{temperature} >= 0, top_k={top_k} >= 1 and top_p={top_p} in (0, 1].")
    length = prompt.shape[1] + max_new_tokens
    cache_length = cache_length or length
    if cache_length < length:
        raise ValueError(f"generate: cache_length={cache_length} is shorter than prompt + new tokens = {length}.")
    graphdef, state = nnx.split(model)
    rng = jax.random.key(0) if rng is None else rng
    return _generate(graphdef, state, prompt, rng, max_new_tokens, float(temperature), top_k, top_p,
                     cache_length)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 8))
def _generate(graphdef, state, prompt, rng, max_new_tokens, temperature, top_k, top_p, cache_length):
    model = nnx.merge(graphdef, state)
    batch, prompt_length = prompt.shape

    def feed(cache, inputs):
        token, position = inputs
        logits, cache = decode_step(model, cache, token, position)
        return cache, logits

    cache, prompt_logits = jax.lax.scan(feed, init_cache(model, batch, cache_length),
                                        (prompt.T, jnp.arange(prompt_length)))

    def extend(carry, position):
        cache, logits, key = carry
        key, sample_key = jax.random.split(key)
        token = _sample(logits, sample_key, temperature, top_k, top_p)
        logits, cache = decode_step(model, cache, token, position)
        return (cache, logits, key), token

    positions = jnp.arange(prompt_length, prompt_length + max_new_tokens)
    _, new_tokens = jax.lax.scan(extend, (cache, prompt_logits[-1], rng), positions)
    return jnp.concatenate([prompt, new_tokens.T.astype(prompt.dtype)], axis=1)


def _sample(logits, key, temperature, top_k, top_p):
    """One token per row from float32 logits ``[B, V]``."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, MASK_VALUE)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
        # Keep a token if the probability mass before it is still below top_p (the first always).
        keep_sorted = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, MASK_VALUE)
    return jax.random.categorical(key, logits, axis=-1)
