"""``AttentionConfig``: one attention layer's hyper-parameters, validated on construction, and
the names every option accepts. No JAX here, so that configs and flags are checked (and their
errors printed) before JAX is imported.

Head layout and weight shapes are described in :mod:`runway_jax.attention_layer`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

RUNWAY_COEFFICIENTS = ("bilinear", "dot")
RUNWAY_SPANS = ("exact", "prefix")
IMPLEMENTATIONS = ("reference", "xla", "pallas_gpu", "pallas_tpu")
POSITION_ENCODINGS = ("rope", "nope", "alibi")


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
        if self.runway_coefficient not in RUNWAY_COEFFICIENTS:
            fail("runway_coefficient", f"use one of {RUNWAY_COEFFICIENTS}")
        if self.runway_span not in RUNWAY_SPANS:
            fail("runway_span", f"use one of {RUNWAY_SPANS}")
        if self.position not in POSITION_ENCODINGS:
            fail("position", f"use one of {POSITION_ENCODINGS}")
        if not self.rope_base > 0:
            fail("rope_base", "use a positive number")
        if self.implementation is not None and (
                not isinstance(self.implementation, str)
                or not all(name in IMPLEMENTATIONS for name in self.implementation.split(","))):
            fail("implementation", f"use one of {IMPLEMENTATIONS}, several in order of "
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
