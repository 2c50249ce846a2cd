"""Flax Linen counterpart of :class:`runway_jax.attention_layer.RewiredMultiHeadAttention`.

A thin shell for models written in Linen: it declares the same weights (same names, shapes and
initialization) and calls the same pure function, so an NNX layer's weights load here unchanged::

    layer = RewiredMultiHeadAttention(AttentionConfig(features=256, num_heads=8))
    variables = layer.init(jax.random.key(0), x)
    y = layer.apply(variables, x)
"""

from typing import Any, Optional

import jax.numpy as jnp
from flax import linen as nn

from runway_jax.attention_layer import AttentionConfig, init_weights, multi_head_attention


class RewiredMultiHeadAttention(nn.Module):
    config: AttentionConfig
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, positions=None, segment_ids=None):
        def initializer(name):
            return lambda key: init_weights(self.config, key, self.param_dtype)[name]

        weights = {name: self.param(name, initializer(name)) for name in self.config.weight_shapes()}
        return multi_head_attention(x, weights, self.config, positions=positions,
                                    segment_ids=segment_ids, dtype=self.dtype)
