"""``ModelConfig``: the decoder language model's hyper-parameters, validated once, and presets.

The baseline of every comparison is the same preset with ``rewire=False``: same code, same width
and depth, standard attention in every layer.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import json
import math
from typing import Optional

from runway_jax.attention_config import OPTION_FLAGS, AttentionConfig, AttentionOptions


class _Dtypes(collections.abc.Mapping):
    """``{"float32": jnp.float32, ...}``, importing JAX only when a dtype is looked up, so that
    configs are validated without JAX."""

    NAMES = ("float32", "bfloat16", "float16")

    def __getitem__(self, name):
        if name not in self.NAMES:
            raise KeyError(name)
        import jax.numpy as jnp

        return getattr(jnp, name)

    def __contains__(self, name):  # Mapping's would look the dtype up, importing JAX
        return name in self.NAMES

    def __iter__(self):
        return iter(self.NAMES)

    def __len__(self):
        return len(self.NAMES)


DTYPES = _Dtypes()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer with runway-aware rewired attention (METHOD eqs. (1)-(3)).

    The attention options of every layer are one field, ``attention``. By their flag names
    (``OPTION_FLAGS``: ``beta``, ``attention_implementation``, ...) ``replace`` and
    ``model_preset`` set them and attributes read them: ``config.beta`` is ``config.attention.beta``.
    """

    vocab_size: int = 512
    """Rows of the embedding table; must be >= the tokenizer's vocabulary (byte: 259)."""
    num_layers: int = 2
    """Number of transformer blocks."""
    features: int = 64
    """Model width D."""
    num_heads: int = 4
    """Heads per layer H, the runway head included in rewired layers (METHOD eq. (1))."""
    head_dim: Optional[int] = None
    """Width d of each head; None: features // num_heads."""
    num_kv_heads: Optional[int] = None
    """Key/value heads of the attending heads (grouped-query attention); None: one per head."""
    mlp_dim: int = 192
    """Hidden width of the SwiGLU MLP."""
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""
    rewire: bool = True
    """Runway-aware rewired attention (METHOD eq. (3)); false: the standard-transformer baseline."""
    rewire_layers: Optional[tuple[int, ...]] = None
    """Indices of the rewired layers; None: all layers."""
    attention: AttentionOptions = AttentionOptions()
    """Options of every attention layer (beta, runway span, position encoding, implementation,
    ...); each is a flag of its own."""
    dtype: str = "float32"
    """Compute dtype: "float32", or "bfloat16" / "float16" for mixed precision."""
    param_dtype: str = "float32"
    """Dtype the parameters are stored in."""
    norm_eps: float = 1e-6
    """Epsilon of RMSNorm, > 0."""

    def __post_init__(self):
        if self.rewire_layers is not None and not isinstance(self.rewire_layers, tuple):
            # Lists from JSON or a command line are accepted; the stored value stays hashable.
            object.__setattr__(self, "rewire_layers", tuple(self.rewire_layers))
        if isinstance(self.attention, collections.abc.Mapping):  # as config.json stores it
            object.__setattr__(self, "attention", AttentionOptions(**self.attention))
        if type(self.attention) is not AttentionOptions:
            raise ValueError(f"ModelConfig: attention must be an AttentionOptions (the layers' shape "
                             f"comes from the model's fields), got {type(self.attention).__name__}.")
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
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < math.inf):
            raise ValueError(f"ModelConfig: norm_eps={self.norm_eps!r} must be a positive finite number.")
        for layer in sorted({0, *self.rewired_layers()}):
            self.attention_config(layer)  # validates every attention option once

    def rewired_layers(self) -> tuple[int, ...]:
        """Indices of the rewired layers (empty for the baseline)."""
        if not self.rewire:
            return ()
        if self.rewire_layers is None:
            return tuple(range(self.num_layers))
        return tuple(sorted(self.rewire_layers))

    def __getattr__(self, name):
        # Only called for names the config lacks: an option by its flag name (config.beta).
        if name in OPTION_FLAGS:
            return getattr(self.attention, OPTION_FLAGS[name])
        raise AttributeError(f"'ModelConfig' object has no attribute {name!r}")

    def attention_config(self, layer: int) -> AttentionConfig:
        """Layer ``layer``'s attention: the model's head shape, whether the layer is rewired, and
        ``attention``."""
        options = {field.name: getattr(self.attention, field.name)
                   for field in dataclasses.fields(AttentionOptions)}
        return AttentionConfig(features=self.features, num_heads=self.num_heads,
                               head_dim=self.head_dim, num_kv_heads=self.num_kv_heads,
                               rewire=layer in self.rewired_layers(), **options)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    def replace(self, **changes) -> "ModelConfig":
        """A copy with ``changes``; attention options by their flag names too
        (``replace(beta=0.5, attention_implementation="xla")``)."""
        options = {OPTION_FLAGS[name]: changes.pop(name) for name in list(changes) if name in OPTION_FLAGS}
        if options:
            changes["attention"] = dataclasses.replace(changes.get("attention", self.attention), **options)
        return dataclasses.replace(self, **changes)

    def baseline(self) -> "ModelConfig":
        """The standard transformer built from the same code: every layer unrewired."""
        return self.replace(rewire=False)


def with_defaults(saved_model: dict) -> dict:
    """A saved model config (the ``model`` dict of a ``config.json``, a run definition or a
    checkpoint) in today's layout, as ``config_dict`` writes it, so that old runs compare equal
    to their configs as loaded today:

    * attention options that earlier versions saved flat (``"beta"``, ``"attention_implementation"``,
      ...) move into ``"attention"`` under their field names, and a comma-separated fallback
      order becomes its list;
    * fields it predates are added at their defaults, which reproduce the models saved before
      those fields existed.
    """
    flat_options = {OPTION_FLAGS[name]: value for name, value in saved_model.items() if name in OPTION_FLAGS}
    attention = {**flat_options, **saved_model.get("attention", {})}
    implementation = attention.get("implementation")
    if isinstance(implementation, str) and "," in implementation:
        attention["implementation"] = implementation.split(",")
    defaults = json.loads(json.dumps(dataclasses.asdict(ModelConfig())))
    model = {name: value for name, value in saved_model.items() if name not in OPTION_FLAGS}
    return {**defaults, **model, "attention": {**defaults["attention"], **attention}}


def flat_fields(saved: dict, prefix: str = "") -> dict:
    """``{"attention": {"beta": 1.0}}`` as ``{"attention.beta": 1.0}``: saved configs compared,
    and their differences named, field by field."""
    flat = {}
    for name, value in saved.items():
        if isinstance(value, dict):
            flat.update(flat_fields(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def nested_fields(flat: dict) -> dict:
    """The inverse of :func:`flat_fields`: ``{"attention.beta": 1.0}`` as
    ``{"attention": {"beta": 1.0}}``."""
    nested = {}
    for key, value in flat.items():
        *parents, name = key.split(".")
        fields = nested
        for parent in parents:
            fields = fields.setdefault(parent, {})
        fields[name] = value
    return nested


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
