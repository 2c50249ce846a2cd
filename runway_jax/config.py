"""``ModelConfig``: the decoder language model's hyper-parameters, validated once, and presets.

The baseline of every comparison is the same preset with ``rewire=False``: same code, same width
and depth, standard attention in every layer.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Optional

import jax.numpy as jnp

from runway_jax.attention_layer import AttentionConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer with runway-aware rewired attention (METHOD eqs. (1)-(3))."""

    vocab_size: int = 512
    num_layers: int = 2
    features: int = 64  # D
    num_heads: int = 4  # H, the runway head included in rewired layers
    head_dim: Optional[int] = None  # d, default D // H
    num_kv_heads: Optional[int] = None  # grouped-query attention; None: one per attending head
    mlp_dim: int = 192  # SwiGLU hidden width
    position: str = "rope"  # "rope", "nope" or "alibi"
    rope_base: float = 10_000.0
    tie_embeddings: bool = True
    rewire: bool = True  # False: the standard-transformer baseline
    rewire_layers: Optional[tuple[int, ...]] = None  # which layers are rewired; None: all
    beta: float = 1.0
    runway_coefficient: str = "bilinear"
    runway_span: str = "exact"
    keep_runway_head_output: bool = False
    attention_implementation: Optional[str] = None
    dtype: str = "float32"  # compute dtype; "bfloat16" for mixed precision
    param_dtype: str = "float32"
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.rewire_layers is not None and not isinstance(self.rewire_layers, tuple):
            # Lists from JSON or a command line are accepted; the stored value stays hashable.
            object.__setattr__(self, "rewire_layers", tuple(self.rewire_layers))
        for name in ("vocab_size", "num_layers", "features", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig: {name}={value!r} must be a positive int.")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"ModelConfig: {name}={getattr(self, name)!r} must be one of {sorted(DTYPES)}."
                )
        if self.rewire_layers is not None:
            bad = [i for i in self.rewire_layers if not isinstance(i, int) or not 0 <= i < self.num_layers]
            if bad or len(set(self.rewire_layers)) != len(self.rewire_layers):
                raise ValueError(
                    f"ModelConfig: rewire_layers={self.rewire_layers!r} must be distinct layer "
                    f"indices in [0, {self.num_layers}) or None for all layers."
                )
        if not self.norm_eps > 0:
            raise ValueError(f"ModelConfig: norm_eps={self.norm_eps!r} must be positive.")
        for layer in sorted({0, *self.rewired_layers()}):
            self.attention_config(layer)  # validates every attention option once

    def rewired_layers(self) -> tuple[int, ...]:
        """Indices of the rewired layers (empty for the baseline)."""
        if not self.rewire:
            return ()
        if self.rewire_layers is None:
            return tuple(range(self.num_layers))
        return tuple(sorted(self.rewire_layers))

    def attention_config(self, layer: int) -> AttentionConfig:
        return AttentionConfig(
            features=self.features,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            num_kv_heads=self.num_kv_heads,
            rewire=layer in self.rewired_layers(),
            beta=self.beta,
            runway_coefficient=self.runway_coefficient,
            runway_span=self.runway_span,
            keep_runway_head_output=self.keep_runway_head_output,
            position=self.position,
            rope_base=self.rope_base,
            implementation=self.attention_implementation,
        )

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def baseline(self) -> "ModelConfig":
        """The standard transformer built from the same code: every layer unrewired."""
        return self.replace(rewire=False)


def upper_half(num_layers: int) -> tuple[int, ...]:
    """Layer indices of the upper half of the stack (the "rewire upper half only" ablation)."""
    return tuple(range(num_layers // 2, num_layers))


PRESETS = {
    # Trains in seconds on a laptop CPU.
    "tiny": ModelConfig(),
    # About 10.8M parameters: the CPU-scale study model.
    "small": ModelConfig(num_layers=6, features=384, num_heads=6, mlp_dim=1024),
    # GPT-2 small scale (~124M with a 50304-token vocabulary), the paper's scale.
    "gpt2-small": ModelConfig(
        vocab_size=50_304, num_layers=12, features=768, num_heads=12, mlp_dim=2048, dtype="bfloat16"
    ),
    # About 1B parameters, untied embeddings.
    "1b": ModelConfig(
        vocab_size=50_304, num_layers=16, features=2048, num_heads=16, mlp_dim=5632,
        tie_embeddings=False, dtype="bfloat16",
    ),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name with some fields overridden, e.g. ``model_preset("small", rewire=False)``."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model preset {name!r}{hint}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name].replace(**overrides)
