"""Position encodings: rotary (RoPE), ALiBi slopes, and none (NoPE).

RoPE is applied to every query and key, the runway head's included, so the runway head's
attention and its coefficient kernel g of METHOD eq. (2) see the same relative positions as the
other heads.
"""

import math

import jax.numpy as jnp

from runway_jax.attention_config import POSITION_ENCODINGS  # noqa: F401 (re-exported)


def apply_rope(x, positions, *, base: float = 10_000.0, scaling_factor: float = 1.0):
    """Rotate ``x`` ``[B, T, ..., d]`` (d even) by ``positions`` ``[B, T]`` (the half-split form).

    ``scaling_factor`` ``s >= 1``: linear position interpolation, the rotation of position
    ``p / s`` (as Gemma 3's global layers use to extend the context), so ``s`` times longer
    sequences span the angles seen in training. Computed in float32 and returned in ``x.dtype``.
    """
    width = x.shape[-1]
    if width % 2:
        raise ValueError(f"apply_rope: head width d={width} must be even for RoPE.")
    if not (isinstance(scaling_factor, (int, float)) and 0 < scaling_factor < math.inf):
        raise ValueError(f"apply_rope: scaling_factor={scaling_factor!r} must be a finite number > 0.")
    frequencies = base ** (-jnp.arange(0, width, 2, dtype=jnp.float32) / width)  # [d/2]
    positions = positions.astype(jnp.float32)
    if scaling_factor != 1:  # skipped at 1, so unscaled models keep exactly their old angles
        positions = positions / scaling_factor
    angles = positions[..., None] * frequencies  # [B, T, d/2]
    angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def alibi_slopes(num_heads: int):
    """The ALiBi slopes of Press et al. (2022) for ``num_heads`` heads, float32 ``[num_heads]``.

    Geometric ``2^(-8 h / n)`` for the nearest power of two n; for other head counts the extra
    heads take every other slope of the next power of two, as in the paper's reference code.
    """
    def geometric(count):
        start = 2.0 ** (-8.0 / count)
        return [start ** (h + 1) for h in range(count)]

    power = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(power)
    if power < num_heads:
        slopes += geometric(2 * power)[0::2][: num_heads - power]
    return jnp.asarray(slopes, jnp.float32)
