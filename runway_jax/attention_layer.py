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

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from runway_jax import attention
from runway_jax.positions import POSITION_ENCODINGS, alibi_slopes, apply_rope

WEIGHT_AXES = {
    "query": ("embed", "heads", "head_dim"),
    "key": ("embed", "kv_heads", "head_dim"),
    "value": ("embed", "kv_heads", "head_dim"),
    "out": ("heads", "head_dim", "embed"),
}


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Hyper-parameters of one attention layer, validated on construction."""

    features: int  # D, the model width
    num_heads: int  # H, the runway head included when rewired
    head_dim: Optional[int] = None  # d, default D // H
    num_kv_heads: Optional[int] = None  # H_kv of the attending heads; None: one per head
    rewire: bool = True
    beta: float = 1.0
    runway_coefficient: str = "bilinear"
    runway_span: str = "exact"
    keep_runway_head_output: bool = False
    position: str = "rope"
    rope_base: float = 10_000.0
    implementation: Optional[str] = None  # a name, "name,name,..." (fallback order) or None

    def __post_init__(self):
        def fail(field, allowed):
            raise ValueError(f"AttentionConfig: {field}={getattr(self, field)!r} is invalid; {allowed}.")

        if not isinstance(self.features, int) or self.features < 1:
            fail("features", "use a positive int")
        if not isinstance(self.num_heads, int) or self.num_heads < 1 + self.rewire:
            fail("num_heads", "use an int >= 2 when rewire=True (one head is the runway head), >= 1 otherwise")
        if self.head_dim is None and self.features % self.num_heads:
            fail("num_heads", f"it must divide features={self.features}, or set head_dim")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 1):
            fail("head_dim", "use a positive int or None")
        if self.position == "rope" and self.head_width % 2:
            fail("head_dim", f"RoPE needs an even head width, got {self.head_width}")
        if self.num_kv_heads is not None and (
            not isinstance(self.num_kv_heads, int)
            or self.num_kv_heads < 1
            or self.attending_heads % self.num_kv_heads
        ):
            fail("num_kv_heads", f"it must divide the {self.attending_heads} attending heads "
                 "(num_heads - 1 when rewired), or be None")
        if not (isinstance(self.beta, (int, float)) and 0 <= self.beta < float("inf")):
            fail("beta", "use a finite number >= 0")
        if self.runway_coefficient not in attention.RUNWAY_COEFFICIENTS:
            fail("runway_coefficient", f"use one of {attention.RUNWAY_COEFFICIENTS}")
        if self.runway_span not in attention.RUNWAY_SPANS:
            fail("runway_span", f"use one of {attention.RUNWAY_SPANS}")
        if self.position not in POSITION_ENCODINGS:
            fail("position", f"use one of {POSITION_ENCODINGS}")
        if not self.rope_base > 0:
            fail("rope_base", "use a positive number")
        if self.implementation is not None and (
                not isinstance(self.implementation, str)
                or not all(name in attention.IMPLEMENTATIONS for name in self.implementation.split(","))):
            fail("implementation", f"use one of {attention.IMPLEMENTATIONS}, several in order of "
                 "preference separated by commas (e.g. 'pallas_gpu,xla'), or None")

    @property
    def implementations(self):
        """``implementation`` as ``rewired_attention`` takes it: None, one name, or a tuple tried
        in order (from a comma-separated string, so configs and flags stay plain strings)."""
        if self.implementation is None or "," not in self.implementation:
            return self.implementation
        return tuple(self.implementation.split(","))

    @property
    def head_width(self) -> int:
        return self.head_dim if self.head_dim is not None else self.features // self.num_heads

    @property
    def attending_heads(self) -> int:
        """Heads whose outputs are used: H - 1 when rewired (the runway head only steers)."""
        return self.num_heads - int(self.rewire)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.attending_heads

    @property
    def keeps_runway_output(self) -> bool:
        return self.rewire and self.keep_runway_head_output

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        features, width = self.features, self.head_width
        output_heads = self.attending_heads + int(self.keeps_runway_output)
        return {
            "query": (features, self.num_heads, width),
            "key": (features, self.kv_heads + int(self.rewire), width),
            "value": (features, self.kv_heads + int(self.keeps_runway_output), width),
            "out": (output_heads, width, features),
        }

    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.weight_shapes().values())


def multi_head_attention(x, weights, config: AttentionConfig, *, positions=None, segment_ids=None,
                         dtype=None):
    """Run one attention layer: ``x`` ``[B, T, D]`` -> ``[B, T, D]``.

    Args:
      x: layer input.
      weights: mapping with the arrays ``query``, ``key``, ``value``, ``out`` of
        ``config.weight_shapes()``.
      positions: int ``[B, T]`` positions for RoPE/ALiBi (default ``0..T-1``; packed rows restart
        at every document).
      segment_ids: optional int ``[B, T]`` document ids of a packed row (METHOD eq. (5)).
      dtype: compute dtype (default: ``x.dtype``); softmax and rho stay float32 inside.
    """
    dtype = dtype or x.dtype
    batch, length, _ = x.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    query, key, value = project(x, weights, config, positions, dtype)
    slopes = alibi_slopes(config.num_heads) if config.position == "alibi" else None
    common = dict(segment_ids=segment_ids, implementation=config.implementations)

    if not config.rewire:
        heads = attention.causal_attention(query, key, value, alibi_slopes=slopes, **common)
    else:
        kv_heads = config.kv_heads
        runway_query, runway_key = query[:, :, -1], key[:, :, -1]  # [B, T, d], METHOD eq. (1)
        heads = attention.rewired_attention(
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
            runway_output = attention.causal_attention(
                runway_query[:, :, None], runway_key[:, :, None], value[:, :, kv_heads:],
                alibi_slopes=None if slopes is None else slopes[-1:], **common)
            heads = jnp.concatenate([heads, runway_output], axis=2)
    return jnp.einsum("btHd,HdD->btD", heads, weights["out"].astype(dtype))


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

    def __call__(self, x, *, positions=None, segment_ids=None):
        weights = {name: getattr(self, name)[...] for name in WEIGHT_AXES}
        return multi_head_attention(x, weights, self.config, positions=positions,
                                    segment_ids=segment_ids, dtype=self.dtype)
