"""Masks, position biases and the masked softmax shared by every attention implementation."""

import jax
import jax.numpy as jnp

# A large negative finite logit: exp() of it is 0, and unlike -inf it never makes NaN (not even in
# rows where every key is masked, e.g. padding).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def visibility_mask(query_positions, key_positions, query_segments=None, key_segments=None):
    """``[B or 1, Tq, Tk]`` bool: key j is visible to query i (causal and same segment, eq. (5))."""
    mask = (key_positions[None, :] <= query_positions[:, None])[None]
    if query_segments is not None:
        mask = mask & (query_segments[:, :, None] == key_segments[:, None, :])
    return mask


def attention_mask(length: int, segment_ids=None):
    """``[B or 1, T, T]`` bool causal same-segment mask of a whole sequence."""
    positions = jnp.arange(length)
    return visibility_mask(positions, positions, segment_ids, segment_ids)


def alibi_bias(query_positions, key_positions, slopes):
    """``[..., Tq, Tk]`` ALiBi bias ``-slope * (i - j)`` for slopes of shape ``[...]``."""
    distance = (query_positions[:, None] - key_positions[None, :]).astype(jnp.float32)
    return -jnp.asarray(slopes, jnp.float32)[..., None, None] * distance


def masked_softmax(logits, mask, axis=-1):
    """Float32 softmax over ``axis`` (an int or a tuple) restricted to ``mask``; fully masked rows
    give zeros."""
    logits = jnp.where(mask, logits.astype(jnp.float32), MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=axis)
    return jnp.where(mask, probs, 0.0)
