"""runway_jax: runway-aware rewired attention (Lee and Clark, arXiv 2601.14522) in JAX and Flax.

The pure functions live in :mod:`runway_jax.attention`; the layer in
:mod:`runway_jax.attention_layer` (Linen twin in :mod:`runway_jax.linen`); the language model in
:mod:`runway_jax.model` with its :class:`~runway_jax.config.ModelConfig`.

The names below are imported on first use, so that ``import runway_jax.files`` or
``runway_jax.training.config`` does not import JAX: programs check their flags first and report
a bad one in a fraction of a second instead of after JAX's start-up.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "AttentionConfig": "runway_jax.attention_config",
    "AttentionOptions": "runway_jax.attention_config",
    "ModelConfig": "runway_jax.config",
    "RewiredMultiHeadAttention": "runway_jax.attention_layer",
    "TransformerLM": "runway_jax.model",
    "causal_attention": "runway_jax.attention",
    "count_parameters": "runway_jax.model",
    "model_preset": "runway_jax.config",
    "rewired_attention": "runway_jax.attention",
    "runway_coefficients": "runway_jax.attention",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'runway_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
