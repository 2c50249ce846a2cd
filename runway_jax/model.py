"""The decoder-only language model (Flax NNX): pre-norm blocks of attention and SwiGLU.

``TransformerLM(config)`` is rewired or standard depending only on ``config.rewire`` and
``config.rewire_layers``; every other line of code is shared, so a comparison isolates the
attention. Parameters carry ``logical_axes`` metadata for sharding rules.

Shape letters: B batch, T sequence, D model width, F MLP width, V vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from runway_jax.attention_layer import RewiredMultiHeadAttention
from runway_jax.config import DTYPES, ModelConfig


def _param(key, shape, fan_in, dtype, axes):
    return nnx.Param(jax.random.normal(key, shape, dtype) / math.sqrt(fan_in), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, features: int, *, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=("embed",))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...]).astype(x.dtype)


class SwiGLU(nnx.Module):
    def __init__(self, features: int, hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.dtype = dtype
        self.gate = _param(rngs.params(), (features, hidden), features, param_dtype, ("embed", "mlp"))
        self.up = _param(rngs.params(), (features, hidden), features, param_dtype, ("embed", "mlp"))
        self.down = _param(rngs.params(), (hidden, features), hidden, param_dtype, ("mlp", "embed"))

    def __call__(self, x):
        gate = jnp.einsum("btD,DF->btF", x, self.gate[...].astype(self.dtype))
        up = jnp.einsum("btD,DF->btF", x, self.up[...].astype(self.dtype))
        return jnp.einsum("btF,FD->btD", jax.nn.silu(gate) * up, self.down[...].astype(self.dtype))


class Block(nnx.Module):
    """Pre-norm residual block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        dtype, param_dtype = config.compute_dtype, DTYPES[config.param_dtype]
        self.attention_norm = RMSNorm(config.features, eps=config.norm_eps, param_dtype=param_dtype)
        self.attention = RewiredMultiHeadAttention(
            config.attention_config(layer), rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )
        self.mlp_norm = RMSNorm(config.features, eps=config.norm_eps, param_dtype=param_dtype)
        self.mlp = SwiGLU(config.features, config.mlp_dim, rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)

    def __call__(self, x, *, positions, segment_ids, cache=None, prompt_lengths=None):
        attended = self.attention(self.attention_norm(x), positions=positions,
                                  segment_ids=segment_ids, cache=cache, prompt_lengths=prompt_lengths)
        if cache is not None:
            attended, cache = attended
        x = x + attended
        x = x + self.mlp(self.mlp_norm(x))
        return x if cache is None else (x, cache)


class TransformerLM(nnx.Module):
    """Token ids ``[B, T]`` -> float32 logits ``[B, T, V]``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        param_dtype = DTYPES[config.param_dtype]
        self.embedding = nnx.Param(
            jax.random.normal(rngs.params(), (config.vocab_size, config.features), param_dtype),
            logical_axes=("vocab", "embed"),
        )
        self.blocks = nnx.List([Block(config, layer, rngs=rngs) for layer in range(config.num_layers)])
        self.final_norm = RMSNorm(config.features, eps=config.norm_eps, param_dtype=param_dtype)
        if not config.tie_embeddings:
            self.unembedding = _param(rngs.params(), (config.features, config.vocab_size),
                                      config.features, param_dtype, ("embed", "vocab"))

    def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None, prompt_lengths=None):
        """Args: ``tokens`` int ``[B, T]``; optional ``positions`` and ``segment_ids`` int
        ``[B, T]`` for packed rows (METHOD eq. (5)): positions restart at every document.

        With ``cache`` (from :meth:`init_cache`) it returns ``(logits, cache)``: a prefill of the
        right-padded prompts ``tokens`` when ``prompt_lengths`` (int ``[B]``) is given, else a
        decode step of ``T`` new tokens per row (see :mod:`runway_jax.decoding`)."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"TransformerLM: tokens must be int [B, T], got shape {tokens.shape} dtype {tokens.dtype}."
            )
        for name, array in (("positions", positions), ("segment_ids", segment_ids)):
            if array is not None and array.shape != tokens.shape:
                raise ValueError(f"TransformerLM: {name}.shape={array.shape} must equal tokens.shape={tokens.shape}.")
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"TransformerLM: the cache has {len(cache)} layers, the model "
                             f"{len(self.blocks)}; make it with model.init_cache.")
        if positions is None and cache is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed(tokens)
        if cache is None:
            for block in self.blocks:
                x = block(x, positions=positions, segment_ids=segment_ids)
            return self.logits(x)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = block(x, positions=positions, segment_ids=segment_ids,
                                   cache=layer_cache, prompt_lengths=prompt_lengths)
            new_cache.append(layer_cache)
        return self.logits(x), new_cache

    def init_cache(self, batch: int, max_length: int) -> list:
        """An empty decoding cache of ``max_length`` positions, one entry per layer."""
        return [block.attention.init_cache(batch, max_length) for block in self.blocks]

    def embed(self, tokens):
        """Token ids ``[B, T]`` -> ``[B, T, D]`` in the compute dtype."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.config.compute_dtype)

    def logits(self, x):
        """Final norm and output head: ``[B, T, D]`` -> float32 ``[B, T, V]``."""
        x = self.final_norm(x)
        if self.config.tie_embeddings:
            # Scaled so tied logits start at unit variance like the untied head's.
            unembedding = self.embedding[...].T / math.sqrt(self.config.features)
        else:
            unembedding = self.unembedding[...]
        return jnp.einsum("btD,DV->btV", x, unembedding.astype(self.config.compute_dtype),
                          preferred_element_type=jnp.float32)


def count_parameters(config: ModelConfig) -> int:
    """Number of parameters of ``TransformerLM(config)``, computed without allocating them."""
    abstract = nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))
