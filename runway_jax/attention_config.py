"""``AttentionOptions`` (how a layer attends) and ``AttentionConfig`` (one layer: its shape and
its options), validated on construction, and the names every option accepts. No JAX here, so
that configs and flags are checked (and their errors printed) before JAX is imported.

A new attention option is one field of :class:`AttentionOptions`: it is then a keyword of
``AttentionConfig``, part of ``ModelConfig.attention`` (and of ``config.json`` and the resume
guard, which store that field whole) and a flat flag of ``train/main.py``.

Head layout and weight shapes are described in :mod:`runway_jax.attention_layer`. The options
for putting the layer into an existing (Gemma-, Llama-, Mistral-style) model: ``scale``,
``local_window_size`` and ``logits_soft_cap`` are those of the pure functions (METHOD (7));
``qk_norm`` (RMSNorm of every query and key head), ``rope_scaling_factor`` (linear position
interpolation) and ``runway_key="group"`` (the runway head reads its key from its own key/value
group, no new parameters) are described in :mod:`runway_jax.attention_layer`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

RUNWAY_COEFFICIENTS = ("bilinear", "dot")
RUNWAY_SPANS = ("exact", "prefix")
# The kernels' "_interpret" twins run them in Pallas interpret mode on any backend (CPU tests).
IMPLEMENTATIONS = ("reference", "xla", "pallas_gpu", "pallas_tpu", "pallas_mosaic_gpu",
                   "pallas_gpu_interpret", "pallas_tpu_interpret", "pallas_mosaic_gpu_interpret")
POSITION_ENCODINGS = ("rope", "nope", "alibi")
RUNWAY_KEYS = ("own", "group")

# One implementation, several tried in order of preference, or None for the best available.
Implementation = Optional[Union[str, tuple[str, ...]]]


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _flag(name: str) -> dict:
    """Metadata of an option whose flag (and ``ModelConfig`` keyword) is not its own name: beside
    the model's other fields a bare ``--scale`` would not say it is the attention's."""
    return {"flag": name}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionOptions:
    """How an attention layer attends: every hyper-parameter of :class:`AttentionConfig` but the
    layer's shape, validated on construction. ``ModelConfig.attention`` holds the options of all
    its layers."""

    beta: float = 1.0
    """Strength beta of the runway penalty subtracted from the logits (METHOD eq. (3)), >= 0."""
    runway_coefficient: str = "bilinear"
    """Runway coefficient rho of METHOD eq. (2): "bilinear" or "dot"."""
    runway_span: str = "exact"
    """Tokens a runway covers: "exact" (between i and j) or "prefix"."""
    keep_runway_head_output: bool = False
    """Also use the runway head's own attention output (it then has value/output weights)."""
    runway_key: str = "own"
    """Key of the runway head: "own" (an extra key head) or "group" (its grouped-query key/value
    group's key: no extra parameters; needs num_kv_heads < num_heads dividing it)."""
    implementation: Implementation = dataclasses.field(
        default=None, metadata=_flag("attention_implementation"))
    """"reference", "xla", "pallas_gpu", "pallas_tpu", "pallas_mosaic_gpu", several in order of
    preference (a tuple; comma-separated on the command line), or None for the best available."""
    scale: Optional[float] = dataclasses.field(default=None, metadata=_flag("attention_scale"))
    """Attention logit scale, > 0; None: 1 / sqrt(head_dim) (Gemma: query_pre_attn_scalar**-0.5)."""
    local_window_size: Optional[int] = None
    """Sliding window w: query i attends to keys i - w .. i (METHOD (7a)); None: the whole
    prefix."""
    logits_soft_cap: Optional[float] = dataclasses.field(
        default=None, metadata=_flag("attention_logits_soft_cap"))
    """Soft cap c of the attention logits, x -> c tanh(x / c) (METHOD (7b), (7c)), > 0; None: none."""
    qk_norm: bool = False
    """RMSNorm over head_dim of every query and key head before RoPE, with learned scales."""
    qk_norm_eps: float = 1e-6
    """Epsilon of the QK-norm's RMSNorm, > 0."""
    position: str = "rope"
    """Position encoding: "rope", "nope" or "alibi"."""
    rope_base: float = 10_000.0
    """RoPE frequency base."""
    rope_scaling_factor: float = 1.0
    """Linear RoPE position interpolation: rotate by position / factor, >= 1."""

    def _fail(self, field: str, allowed: str):
        raise ValueError(f"{type(self).__name__}: {field}={getattr(self, field)!r} is invalid; {allowed}.")

    def __post_init__(self):
        if isinstance(self.implementation, list):  # a fallback order as JSON stores it
            object.__setattr__(self, "implementation", tuple(self.implementation))
        fail = self._fail
        if not (_is_real(self.beta) and self.beta >= 0):
            fail("beta", "use a finite number >= 0")
        if self.runway_coefficient not in RUNWAY_COEFFICIENTS:
            fail("runway_coefficient", f"use one of {RUNWAY_COEFFICIENTS}")
        if self.runway_span not in RUNWAY_SPANS:
            fail("runway_span", f"use one of {RUNWAY_SPANS}")
        if self.runway_key not in RUNWAY_KEYS:
            fail("runway_key", f"use one of {RUNWAY_KEYS}")
        if self.position not in POSITION_ENCODINGS:
            fail("position", f"use one of {POSITION_ENCODINGS}")
        if not (_is_real(self.rope_base) and self.rope_base > 0):
            fail("rope_base", "use a positive finite number")
        if self.scale is not None and not (_is_real(self.scale) and self.scale > 0):
            fail("scale", "use a finite number > 0, or None for 1 / sqrt(head_dim)")
        if self.local_window_size is not None and (
                not isinstance(self.local_window_size, int) or isinstance(self.local_window_size, bool)
                or self.local_window_size < 0):
            fail("local_window_size", "use an int >= 0 (query i sees keys i - w .. i), or None")
        if self.logits_soft_cap is not None and not (
                _is_real(self.logits_soft_cap) and self.logits_soft_cap > 0):
            fail("logits_soft_cap", "use a finite number > 0, or None")
        if not isinstance(self.qk_norm, bool):
            fail("qk_norm", "use True or False")
        if not (_is_real(self.qk_norm_eps) and self.qk_norm_eps > 0):
            fail("qk_norm_eps", "use a finite number > 0")
        if not (_is_real(self.rope_scaling_factor) and self.rope_scaling_factor >= 1):
            fail("rope_scaling_factor", "use a finite number >= 1 (1: no scaling)")
        if self.rope_scaling_factor != 1 and self.position != "rope":
            fail("rope_scaling_factor", f"it scales RoPE positions, but position={self.position!r}; "
                 "leave it at 1.0")
        names = (self.implementation,) if isinstance(self.implementation, str) else self.implementation
        if names is not None and not (isinstance(names, tuple) and names
                                      and all(name in IMPLEMENTATIONS for name in names)):
            fail("implementation", f"use one of {IMPLEMENTATIONS}, several in order of preference "
                 "as a tuple (e.g. ('pallas_gpu', 'xla'); on the command line separated by commas: "
                 "pallas_gpu,xla), or None")


OPTION_FLAGS: dict[str, str] = {field.metadata.get("flag", field.name): field.name
                                for field in dataclasses.fields(AttentionOptions)}
"""``{flag name: AttentionOptions field}``: the names ``train/main.py``'s flags, ``ModelConfig``'s
flat attributes, ``ModelConfig.replace`` and ``model_preset`` give the options."""


@dataclasses.dataclass(frozen=True)
class AttentionConfig(AttentionOptions):
    """Hyper-parameters of one attention layer: its shape (these fields) and its options (those of
    :class:`AttentionOptions`, keywords here too), validated on construction."""

    features: int  # D, the model width
    num_heads: int  # H, the runway head included when rewired
    head_dim: Optional[int] = None  # d, default D // H
    num_kv_heads: Optional[int] = None  # H_kv of the attending heads; None: one per head
    rewire: bool = True

    def __post_init__(self):
        super().__post_init__()  # the options alone
        fail = self._fail
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
        if self.runway_key_in_group:
            if self.keep_runway_head_output:
                fail("keep_runway_head_output", "the ablation needs runway_key='own' (with "
                     "runway_key='group' the runway head has no value or output of its own)")
            if (not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 1
                    or self.num_heads % self.num_kv_heads or self.num_kv_heads == self.num_heads):
                fail("num_kv_heads", f"runway_key='group' needs grouped-query attention: a "
                     f"number of key/value heads that divides num_heads={self.num_heads} and is "
                     "smaller (with one key/value head per query head use runway_key='own')")
        elif self.num_kv_heads is not None and (
            not isinstance(self.num_kv_heads, int)
            or self.num_kv_heads < 1
            or self.attending_heads % self.num_kv_heads
        ):
            fail("num_kv_heads", f"it must divide the {self.attending_heads} attending heads "
                 "(num_heads - 1 when rewired), or be None")

    @property
    def implementations(self) -> Implementation:
        """``implementation``, already as ``rewired_attention`` takes it (an accessor kept from
        when it was a comma-separated string)."""
        return self.implementation

    @property
    def head_width(self) -> int:
        return self.head_dim if self.head_dim is not None else self.features // self.num_heads

    @property
    def attending_heads(self) -> int:
        """Heads whose outputs are used: H - 1 when rewired (the runway head only steers)."""
        return self.num_heads - int(self.rewire)

    @property
    def runway_key_in_group(self) -> bool:
        """Rewired with ``runway_key="group"``: H query heads over H_kv key/value heads as in the
        original model; the runway head is query head H - 1 and reads key head H_kv - 1."""
        return self.rewire and self.runway_key == "group"

    @property
    def kv_heads(self) -> int:
        """Key/value heads, the runway head's own key (``runway_key="own"``) not counted."""
        return self.num_kv_heads if self.num_kv_heads is not None else self.attending_heads

    @property
    def keeps_runway_output(self) -> bool:
        return self.rewire and self.keep_runway_head_output

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        features, width = self.features, self.head_width
        output_heads = self.attending_heads + int(self.keeps_runway_output)
        own_runway_key = self.rewire and not self.runway_key_in_group
        shapes = {
            "query": (features, self.num_heads, width),
            "key": (features, self.kv_heads + int(own_runway_key), width),
            "value": (features, self.kv_heads + int(self.keeps_runway_output), width),
            "out": (output_heads, width, features),
        }
        if self.qk_norm:  # one learned scale per head_dim, shared by all heads (standard layers too)
            shapes.update(query_norm=(width,), key_norm=(width,))
        return shapes

    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.weight_shapes().values())
