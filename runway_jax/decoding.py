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

import jax
import jax.numpy as jnp

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
