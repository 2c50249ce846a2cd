"""A rewired multi-head attention layer: its config, its weights, and the pure function that runs it.

The Flax NNX module here (and its Linen twin in :mod:`runway_jax.linen`) only own the weights and
call :func:`multi_head_attention`, so both give identical outputs from the same weights.

Head layout (METHOD eq. (1)): with ``rewire=True`` the last of the ``H = num_heads`` heads is the
runway head ``r = H - 1``. Its query and key are the last slices of the query and key projections;
it has no value projection and no slice of the output projection (unless
``keep_runway_head_output``), so a rewired layer has ``2 * D * d`` fewer parameters (invariant 5).
The remaining ``H - 1`` heads attend with rewired logits (eq. (3)). With ``rewire=False`` the same
code gives a standard layer in which all H heads attend.

Weights (logical axis names in brackets, used by sharding rules):

  query [embed, heads, head_dim]   D x H x d
  key   [embed, kv_heads, head_dim] D x (H_kv + 1 if rewired) x d   (the last one is the runway key)
  value [embed, kv_heads, head_dim] D x (H_kv + 1 if keep_runway_head_output) x d
  out   [heads, head_dim, embed]   (H - 1 if rewired, + 1 if kept) x d x D

``H_kv`` (``num_kv_heads``) counts key/value heads of the attending heads and must divide their
number (``H - 1`` when rewired, else ``H``); the default ``None`` is ordinary multi-head attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from runway_jax import attention
from runway_jax import cache as kv_cache
from runway_jax.attention_config import AttentionConfig
from runway_jax.positions import alibi_slopes, apply_rope

WEIGHT_AXES = {
    "query": ("embed", "heads", "head_dim"),
    "key": ("embed", "kv_heads", "head_dim"),
    "value": ("embed", "kv_heads", "head_dim"),
    "out": ("heads", "head_dim", "embed"),
}


def multi_head_attention(x, weights, config: AttentionConfig, *, positions=None, segment_ids=None,
                         dtype=None, cache=None, prompt_lengths=None):
    """Run one attention layer: ``x`` ``[B, T, D]`` -> ``[B, T, D]``.

    Args:
      x: layer input.
      weights: mapping with the arrays ``query``, ``key``, ``value``, ``out`` of
        ``config.weight_shapes()``.
      positions: int ``[B, T]`` positions for RoPE/ALiBi (default ``0..T-1``, or the positions
        after each row's cached length in a decode step; packed rows restart at every document).
      segment_ids: optional int ``[B, T]`` document ids of a packed row (METHOD eq. (5)).
      dtype: compute dtype (default: ``x.dtype``); softmax and rho stay float32 inside.
      cache: optional layer cache from :func:`init_layer_cache`. With ``prompt_lengths`` (int
        ``[B]``) ``x`` is a right-padded prompt, attended in one pass and stored (prefill);
        without, ``x`` holds the next ``T`` positions of every row (a decode step). Either way
        the result is ``(y, cache)``; see :mod:`runway_jax.cache`.
    """
    dtype = dtype or x.dtype
    batch, length, _ = x.shape
    if cache is not None and segment_ids is not None:
        raise ValueError("multi_head_attention: segment_ids cannot be combined with a cache; "
                         "decode one document per row.")
    if positions is None:
        start = 0 if cache is None or prompt_lengths is not None else cache["heads"].lengths[:, None]
        positions = start + jnp.broadcast_to(jnp.arange(length), (batch, length))
    query, key, value = project(x, weights, config, positions, dtype)
    slopes = alibi_slopes(config.num_heads) if config.position == "alibi" else None
    common = dict(segment_ids=segment_ids, implementation=config.implementations)
    new_cache = {}

    def attend(name, *arrays, **options):
        """The library's attention, or the same through this layer's cache ``name``."""
        if cache is None:
            call = attention.rewired_attention if len(arrays) == 5 else attention.causal_attention
            return call(*arrays, **options)
        options.pop("segment_ids")
        if prompt_lengths is not None:
            out, new_cache[name] = kv_cache.prefill(cache[name], *arrays, lengths=prompt_lengths,
                                                    **options)
        else:
            out, new_cache[name] = kv_cache.decode_step(cache[name], *arrays, **options)
        return out

    kv_heads = config.kv_heads
    if not config.rewire:
        heads = attend("heads", query, key, value, alibi_slopes=slopes, **common)
    else:
        runway_query, runway_key = query[:, :, -1], key[:, :, -1]  # [B, T, d], METHOD eq. (1)
        heads = attend(
            "heads",
            query[:, :, :-1],
            key[:, :, :kv_heads],
            value[:, :, :kv_heads],
            runway_query,
            runway_key,
            beta=config.beta,
            runway_coefficient=config.runway_coefficient,
            runway_span=config.runway_span,
            alibi_slopes=None if slopes is None else slopes[:-1],
            runway_alibi_slope=None if slopes is None else slopes[-1],
            **common,
        )
        if config.keeps_runway_output:
            # Ablation: the runway head also attends normally and keeps its output slice.
            runway_output = attend(
                "runway_head", runway_query[:, :, None], runway_key[:, :, None],
                value[:, :, kv_heads:], alibi_slopes=None if slopes is None else slopes[-1:],
                **common)
            heads = jnp.concatenate([heads, runway_output], axis=2)
    y = jnp.einsum("btHd,HdD->btD", heads, weights["out"].astype(dtype))
    return y if cache is None else (y, new_cache)


def init_layer_cache(config: AttentionConfig, batch: int, max_length: int, dtype=jnp.float32):
    """An empty cache for :func:`multi_head_attention`: ``{"heads": AttentionCache}`` (and
    ``"runway_head"``, the runway head's own keys and values, in the keep-output ablation)."""
    cache = {"heads": kv_cache.init_cache(batch, max_length, kv_heads=config.kv_heads,
                                          head_width=config.head_width, dtype=dtype,
                                          rewired=config.rewire)}
    if config.keeps_runway_output:
        cache["runway_head"] = kv_cache.init_cache(batch, max_length, kv_heads=1,
                                                   head_width=config.head_width, dtype=dtype,
                                                   rewired=False)
    return cache


def project(x, weights, config: AttentionConfig, positions, dtype):
    """Queries ``[B, T, H, d]``, keys and values ``[B, T, H_kv (+1), d]`` of ``x``, with RoPE
    applied to every query and key (the runway head's are the last ones)."""
    x = x.astype(dtype)
    query = jnp.einsum("btD,DHd->btHd", x, weights["query"].astype(dtype))
    key = jnp.einsum("btD,DKd->btKd", x, weights["key"].astype(dtype))
    value = jnp.einsum("btD,DKd->btKd", x, weights["value"].astype(dtype))
    if config.position == "rope":
        query = apply_rope(query, positions, base=config.rope_base)
        key = apply_rope(key, positions, base=config.rope_base)
    return query, key, value


def init_weights(config: AttentionConfig, key, param_dtype=jnp.float32):
    """Fresh weights: fan-in scaled normals for every projection."""
    keys = dict(zip(WEIGHT_AXES, jax.random.split(key, len(WEIGHT_AXES))))
    weights = {}
    for name, shape in config.weight_shapes().items():
        fan_in = shape[0] if name != "out" else shape[0] * shape[1]
        weights[name] = (jax.random.normal(keys[name], shape, param_dtype) / jnp.sqrt(fan_in)).astype(param_dtype)
    return weights


class RewiredMultiHeadAttention(nnx.Module):
    """Flax NNX rewired multi-head attention (``config.rewire=False``: standard attention).

    Example::

        layer = RewiredMultiHeadAttention(AttentionConfig(features=256, num_heads=8), rngs=rngs)
        y = layer(x)  # [B, T, 256] -> [B, T, 256]
    """

    def __init__(self, config: AttentionConfig, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        weights = init_weights(config, rngs.params(), param_dtype)
        for name, value in weights.items():
            setattr(self, name, nnx.Param(value, logical_axes=WEIGHT_AXES[name]))

    def __call__(self, x, *, positions=None, segment_ids=None, cache=None, prompt_lengths=None):
        weights = {name: getattr(self, name)[...] for name in WEIGHT_AXES}
        return multi_head_attention(x, weights, self.config, positions=positions,
                                    segment_ids=segment_ids, dtype=self.dtype, cache=cache,
                                    prompt_lengths=prompt_lengths)

    def init_cache(self, batch: int, max_length: int):
        return init_layer_cache(self.config, batch, max_length, self.dtype or jnp.float32)
