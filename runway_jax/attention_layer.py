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
  query_norm, key_norm [head_dim]  d each, only with ``qk_norm``

``H_kv`` (``num_kv_heads``) counts key/value heads of the attending heads and must divide their
number (``H - 1`` when rewired, else ``H``); the default ``None`` is ordinary multi-head attention.

Re-purposing a head of a grouped-query model (``runway_key="group"``, rewired): query, key and
value keep the original model's layout, so its weights load unchanged (the output projection
without head ``H - 1``'s slice) and no parameter is added. Query head h uses key/value head
``h // (H / H_kv)`` (``H_kv`` must divide ``H`` and be smaller); the runway head is query head
``H - 1`` and its key is its group's key, key head ``H_kv - 1`` (after the same norm and RoPE);
the other ``H - 1`` heads keep their groups, the last group one head short. Only the runway
head's output slice goes (``out`` has ``H - 1`` heads), so the layer has ``D * d`` fewer
parameters than the original model's layer, not ``2 * D * d``:

  query [embed, heads, head_dim]   D x H x d
  key   [embed, kv_heads, head_dim] D x H_kv x d       (key head H_kv - 1 is the runway key too)
  value [embed, kv_heads, head_dim] D x H_kv x d
  out   [heads, head_dim, embed]   (H - 1) x d x D

It runs ``rewired_attention`` on all H query heads over the H_kv groups, the runway head's slot
as a placeholder attending head whose output is dropped before the output projection (a zero
cotangent, so the gradients are exact); that costs one head's attention more than necessary.

Options for existing models' attention (:class:`AttentionConfig`):

* ``scale``: the logit scale, default ``1 / sqrt(d)`` (Gemma: ``query_pre_attn_scalar ** -0.5``).
* ``local_window_size``, ``logits_soft_cap``: METHOD (7a)-(7c), for every head and the runway
  head alike, also through the cache.
* ``qk_norm``: RMSNorm over ``head_dim`` of every query and key head (the runway head's
  included) before RoPE, with one learned scale per ``head_dim`` entry for queries
  (``query_norm``) and one for keys (``key_norm``), as Gemma 3 and Qwen 3 do (Gemma stores
  ``scale - 1``: load ``1 + w``; OLMo 2 normalizes all heads' entries together, which this is
  not). Standard and rewired layers both get the two scales, so invariant 5 holds unchanged.
* ``rope_scaling_factor`` ``s >= 1``: RoPE at positions ``p / s`` (linear position
  interpolation, as Gemma 3's global layers use).
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
}  # every layer's weights
QK_NORM_WEIGHT_AXES = {"query_norm": ("head_dim",), "key_norm": ("head_dim",)}  # with qk_norm only


def multi_head_attention(x, weights, config: AttentionConfig, *, positions=None, segment_ids=None,
                         dtype=None, cache=None, prompt_lengths=None,
                         return_probabilities=False):
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
      return_probabilities: return ``(y, AttentionProbabilities)``: the softmax weights of the
        heads the output projection reads (``[B, heads, T, T]``, the runway head's own last in
        the keep-output ablation), and in a rewired layer the runway head's A and rho (``None``
        in a standard layer), from the same library call that computes ``y`` (its
        ``"reference"`` implementation, whatever ``config.implementation`` names; not with a
        cache).
    """
    dtype = dtype or x.dtype
    batch, length, _ = x.shape
    if cache is not None and return_probabilities:
        raise ValueError("multi_head_attention: return_probabilities=True cannot be combined with "
                         "a cache; run the layer on the whole sequence without one.")
    if cache is not None and segment_ids is not None:
        raise ValueError("multi_head_attention: segment_ids cannot be combined with a cache; "
                         "decode one document per row.")
    if positions is None:
        start = 0 if cache is None or prompt_lengths is not None else cache["heads"].lengths[:, None]
        positions = start + jnp.broadcast_to(jnp.arange(length), (batch, length))
    query, key, value = project(x, weights, config, positions, dtype)
    slopes = alibi_slopes(config.num_heads) if config.position == "alibi" else None
    # METHOD (7): the same visibility, logit scale and cap for every head, the runway head's too.
    common = dict(segment_ids=segment_ids, implementation=config.implementation,
                  scale=config.scale, local_window_size=config.local_window_size,
                  logits_soft_cap=config.logits_soft_cap)
    new_cache = {}
    probabilities = {}

    def attend(name, *arrays, **options):
        """The library's attention, or the same through this layer's cache ``name``."""
        if cache is None:
            call = attention.rewired_attention if len(arrays) == 5 else attention.causal_attention
            if not return_probabilities:
                return call(*arrays, **options)
            # Only the reference implementation forms the T x T probabilities; every
            # implementation computes the same output (METHOD (6) invariant 4).
            out, probabilities[name] = call(*arrays, **{**options, "implementation": "reference",
                                                        "return_probabilities": True})
            return out
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
        # [B, T, d], METHOD eq. (1). The runway key is the runway head's own key head, or with
        # runway_key="group" its group's key head H_kv - 1: the last key head either way.
        runway_query, runway_key = query[:, :, -1], key[:, :, -1]
        # "group": all H query heads attend over the H_kv groups (so H_kv divides H) and the
        # runway head's slot, a placeholder, is dropped below: its output gets a zero cotangent.
        query_heads = config.num_heads if config.runway_key_in_group else config.num_heads - 1
        heads = attend(
            "heads",
            query[:, :, :query_heads],
            key[:, :, :kv_heads],
            value[:, :, :kv_heads],
            runway_query,
            runway_key,
            beta=config.beta,
            runway_coefficient=config.runway_coefficient,
            runway_span=config.runway_span,
            alibi_slopes=None if slopes is None else slopes[:query_heads],
            runway_alibi_slope=None if slopes is None else slopes[-1],
            **common,
        )[:, :, :config.attending_heads]
        if config.keeps_runway_output:
            # Ablation: the runway head also attends normally and keeps its output slice.
            runway_output = attend(
                "runway_head", runway_query[:, :, None], runway_key[:, :, None],
                value[:, :, kv_heads:], alibi_slopes=None if slopes is None else slopes[-1:],
                **common)
            heads = jnp.concatenate([heads, runway_output], axis=2)
    y = jnp.einsum("btHd,HdD->btD", heads, weights["out"].astype(dtype))
    if return_probabilities:
        return y, _layer_probabilities(probabilities, config)
    return y if cache is None else (y, new_cache)


def _layer_probabilities(probabilities, config: AttentionConfig):
    """The ``AttentionProbabilities`` of the heads whose outputs ``out`` projects, in its order,
    from the library calls' probabilities by cache name (``"heads"``, ``"runway_head"``)."""
    found = probabilities["heads"]
    if not isinstance(found, attention.AttentionProbabilities):  # a standard layer
        found = attention.AttentionProbabilities(heads=found, runway=None, runway_coefficients=None)
    heads = found.heads[:, :config.attending_heads]  # not runway_key="group"'s placeholder slot
    if "runway_head" in probabilities:  # keep_runway_head_output: its own causal attention
        heads = jnp.concatenate([heads, probabilities["runway_head"]], axis=1)
    return found._replace(heads=heads)


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
    """Queries ``[B, T, H, d]``, keys and values ``[B, T, H_kv (+1), d]`` of ``x``, with the
    ``qk_norm`` RMSNorm and then RoPE applied to every query and key (the runway head's are the
    last ones)."""
    x = x.astype(dtype)
    query = jnp.einsum("btD,DHd->btHd", x, weights["query"].astype(dtype))
    key = jnp.einsum("btD,DKd->btKd", x, weights["key"].astype(dtype))
    value = jnp.einsum("btD,DKd->btKd", x, weights["value"].astype(dtype))
    if config.qk_norm:
        query = head_rms_norm(query, weights["query_norm"], config.qk_norm_eps)
        key = head_rms_norm(key, weights["key_norm"], config.qk_norm_eps)
    if config.position == "rope":
        rope = dict(base=config.rope_base, scaling_factor=config.rope_scaling_factor)
        query = apply_rope(query, positions, **rope)
        key = apply_rope(key, positions, **rope)
    return query, key, value


def head_rms_norm(x, scale, eps):
    """RMSNorm of every head ``x[..., :]`` over its ``head_dim`` entries, times the learned
    ``scale`` ``[d]``. Float32 inside (like the model's RMSNorm), returned in ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def init_weights(config: AttentionConfig, key, param_dtype=jnp.float32):
    """Fresh weights: fan-in scaled normals for every projection, ones for the ``qk_norm``
    scales (the projections draw from the same keys with or without them)."""
    keys = dict(zip(WEIGHT_AXES, jax.random.split(key, len(WEIGHT_AXES))))
    weights = {}
    for name, shape in config.weight_shapes().items():
        if name in QK_NORM_WEIGHT_AXES:
            weights[name] = jnp.ones(shape, param_dtype)
            continue
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
        axes = {**WEIGHT_AXES, **QK_NORM_WEIGHT_AXES}
        for name, value in weights.items():
            setattr(self, name, nnx.Param(value, logical_axes=axes[name]))

    def weights(self) -> dict:
        """The arrays of ``config.weight_shapes()`` by name, as :func:`multi_head_attention`
        and :func:`project` take them."""
        return {name: getattr(self, name)[...] for name in self.config.weight_shapes()}

    def __call__(self, x, *, positions=None, segment_ids=None, cache=None, prompt_lengths=None):
        weights = self.weights()
        return multi_head_attention(x, weights, self.config, positions=positions,
                                    segment_ids=segment_ids, dtype=self.dtype, cache=cache,
                                    prompt_lengths=prompt_lengths)

    def init_cache(self, batch: int, max_length: int):
        return init_layer_cache(self.config, batch, max_length, self.dtype or jnp.float32)
