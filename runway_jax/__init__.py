"""runway_jax: runway-aware rewired attention (Lee and Clark, arXiv 2601.14522) in JAX and Flax.

The pure functions live in :mod:`runway_jax.attention`; the layer in
:mod:`runway_jax.attention_layer` (Linen twin in :mod:`runway_jax.linen`); the language model in
:mod:`runway_jax.model` with its :class:`~runway_jax.config.ModelConfig`.
"""

from runway_jax.attention import causal_attention, rewired_attention, runway_coefficients
from runway_jax.attention_layer import AttentionConfig, RewiredMultiHeadAttention
from runway_jax.config import ModelConfig, model_preset
from runway_jax.model import TransformerLM, count_parameters

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig",
    "ModelConfig",
    "RewiredMultiHeadAttention",
    "TransformerLM",
    "causal_attention",
    "count_parameters",
    "model_preset",
    "rewired_attention",
    "runway_coefficients",
]
