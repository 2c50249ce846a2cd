"""Runway-aware rewired attention as pure functions over arrays.

The mathematics is ``METHOD.md`` (cited below as "METHOD eq. (n)"). Shape letters, used in every
einsum string of this package:

  B batch, T (= i or j) sequence, H query heads, K key/value heads (H_kv), G = H // K query heads
  per key/value head, d head width.

Public functions:

* :func:`rewired_attention` -- eq. (3): causal attention of the rewired heads with logits
  ``s_ij - beta * rho_ij``.
* :func:`runway_coefficients` -- eq. (2): the runway coefficients ``rho`` as a ``[B, T, T]`` array.
* :func:`causal_attention` -- standard causal attention from the same code (the baseline).

``implementation`` picks how the same numbers are computed:

* ``"reference"``: a direct, readable evaluation with ``T x T`` arrays (eq. (2) as a product of two
  triangular matrices). Use it to check anything else.
* ``"xla"``: the memory-lean eq. (3b) evaluation in :mod:`runway_jax.blockwise`, chunked over query
  blocks and key blocks; it never builds a ``T x T x T`` or ``T x T x d`` array, and its backward
  pass recomputes each chunk instead of storing it.
* ``"pallas_tpu"`` / ``"pallas_gpu"``: the fused flash-style kernels of :mod:`runway_jax.kernels`
  (METHOD (3c)); they never hold a ``T x T`` array. They run on their accelerator, or anywhere with
  ``interpret=True``. They do not support the ALiBi options or a traced ``scale``. Inside a
  ``jax.set_mesh`` context they run under ``shard_map`` (batch and heads split over the mesh).
* ``None``: the best implementation that can run this call: ``"pallas_tpu"`` on TPU,
  ``"pallas_gpu"`` on GPU, ``"xla"`` otherwise (and ``"xla"`` whenever the kernel cannot take the
  call, e.g. with ALiBi).
* A sequence of names, e.g. ``("pallas_gpu", "xla")``: the first that can run this call.

Naming a single implementation that cannot run the call raises a one-line ``ValueError`` saying why.

Non-finite inputs: every implementation computes on inputs whose NaN/Inf entries are replaced by
zeros and returns NaN in exactly the output rows that can see one (causal, same segment; a query
only its own row), so a NaN never crosses a mask, forward or backward (those rows pass no
gradient). See :func:`runway_jax.masking.quarantine_nonfinite`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from runway_jax import blockwise, kernels
from runway_jax.kernels import sharding as kernel_sharding
from runway_jax.masking import (alibi_bias, attention_mask, masked_softmax, poison_rows,
                                 quarantine_nonfinite)

from runway_jax.attention_config import IMPLEMENTATIONS, RUNWAY_COEFFICIENTS, RUNWAY_SPANS



# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def rewired_attention(
    query,
    key,
    value,
    runway_query,
    runway_key,
    *,
    beta=1.0,
    runway_coefficient="bilinear",
    runway_span="exact",
    segment_ids=None,
    scale=None,
    implementation=None,
    interpret=False,
    alibi_slopes=None,
    runway_alibi_slope=None,
):
    """Runway-aware rewired causal attention, METHOD eqs. (1)-(3).

    Args:
      query: ``[B, T, H, d]`` queries of the rewired heads (every head except the runway head).
      key, value: ``[B, T, H_kv, d]``, ``H_kv`` dividing ``H`` (grouped-query attention).
      runway_query, runway_key: ``[B, T, d]``, the runway head's query and key (METHOD eq. (1)).
      beta: rewiring strength ``>= 0`` (eq. (3)); ``0`` gives standard causal attention.
      runway_coefficient: kernel g of eq. (2), ``"bilinear"`` or ``"dot"``.
      runway_span: ``"exact"`` (eq. (2)) or ``"prefix"``.
      segment_ids: optional int ``[B, T]``; attention and runways stay inside a segment (eq. (5)).
      scale: logit scale, default ``1 / sqrt(d)``; it scales both the logits and g.
      implementation: ``"reference"``, ``"xla"``, ``"pallas_gpu"``, ``"pallas_tpu"``, ``None``
        (the best available) or a sequence of names tried in order (see the module docstring).
      interpret: run Pallas kernels in interpret mode (for CPU tests).
      alibi_slopes: optional ``[H]`` ALiBi slopes ``m_h``: adds ``-m_h * (i - j)`` to head h's
        logits. Not part of METHOD; it lets ALiBi models use rewiring.
      runway_alibi_slope: optional ALiBi slope of the runway head's own attention A. The kernel g
        stays the bilinear (or dot) form of eq. (2) without position bias.

    Returns:
      ``[B, T, H, d]`` in the dtype of ``query``.
    """
    name = "rewired_attention"
    _check_qkv(name, query, key, value)
    _check_runway(name, query, runway_query, runway_key)
    beta = _check_beta(name, beta)
    _check_choice(name, "runway_coefficient", runway_coefficient, RUNWAY_COEFFICIENTS)
    _check_choice(name, "runway_span", runway_span, RUNWAY_SPANS)
    _check_segment_ids(name, segment_ids, query.shape[:2])
    scale = _check_scale(name, scale, query.shape[-1])
    _check_alibi(name, alibi_slopes, runway_alibi_slope, query.shape[2])
    implementation = _resolve_implementation(
        name, implementation, interpret=interpret, width=query.shape[-1], scale=scale,
        uses_alibi=alibi_slopes is not None or runway_alibi_slope is not None)
    if implementation in kernels.TARGETS:
        fused = functools.partial(
            kernels.rewired_attention, target=implementation, beta=beta,
            runway_coefficient=runway_coefficient, runway_span=runway_span, scale=scale,
            interpret=interpret)
        return kernel_sharding.call_sharded(
            lambda q, k, v, rq, rk, s: fused(q, k, v, rq, rk, segment_ids=s),
            query, key, value, runway_query, runway_key, _segments_or_zeros(segment_ids, query))
    options = dict(
        beta=beta,
        runway_coefficient=runway_coefficient,
        runway_span=runway_span,
        segment_ids=segment_ids,
        scale=scale,
        alibi_slopes=alibi_slopes,
        runway_alibi_slope=runway_alibi_slope,
    )
    if implementation == "reference":
        return _reference_rewired_attention(query, key, value, runway_query, runway_key, **options)
    return blockwise.rewired_attention(query, key, value, runway_query, runway_key, **options)


def runway_coefficients(
    runway_query,
    runway_key,
    *,
    runway_coefficient="bilinear",
    runway_span="exact",
    segment_ids=None,
    scale=None,
    runway_alibi_slope=None,
):
    """Runway coefficients ``rho`` of METHOD eq. (2), as float32 ``[B, T, T]``.

    ``rho[b, i, j]`` is the runway head's attention-weighted score along the runway of the edge
    ``j -> i``. Entries without a runway are zero: ``j >= i`` in the exact span (and ``j > i`` in
    the prefix span), and pairs in different segments. Computed by the eq. (3b) evaluation, so the
    cost is ``O(T^2 (d + block))`` rather than ``O(T^3)``; the result itself is ``T x T``.
    """
    name = "runway_coefficients"
    _check_runway(name, None, runway_query, runway_key)
    _check_choice(name, "runway_coefficient", runway_coefficient, RUNWAY_COEFFICIENTS)
    _check_choice(name, "runway_span", runway_span, RUNWAY_SPANS)
    _check_segment_ids(name, segment_ids, runway_query.shape[:2])
    scale = _check_scale(name, scale, runway_query.shape[-1])
    _check_alibi(name, None, runway_alibi_slope, 1)
    return blockwise.runway_coefficients(
        runway_query,
        runway_key,
        runway_coefficient=runway_coefficient,
        runway_span=runway_span,
        segment_ids=segment_ids,
        scale=scale,
        runway_alibi_slope=runway_alibi_slope,
    )


def causal_attention(
    query,
    key,
    value,
    *,
    segment_ids=None,
    scale=None,
    implementation=None,
    alibi_slopes=None,
    interpret=False,
):
    """Standard causal (grouped-query) attention from the same code: the baseline.

    Shapes and ``implementation`` as in :func:`rewired_attention`; the Pallas implementations run
    the fused kernel with ``beta = 0``, which skips the runway head. Returns ``[B, T, H, d]`` in the
    dtype of ``query``.
    """
    name = "causal_attention"
    _check_qkv(name, query, key, value)
    _check_segment_ids(name, segment_ids, query.shape[:2])
    scale = _check_scale(name, scale, query.shape[-1])
    _check_alibi(name, alibi_slopes, None, query.shape[2])
    implementation = _resolve_implementation(
        name, implementation, interpret=interpret, width=query.shape[-1], scale=scale,
        uses_alibi=alibi_slopes is not None)
    if implementation in kernels.TARGETS:
        fused = functools.partial(kernels.causal_attention, target=implementation, scale=scale,
                                  interpret=interpret)
        runway = jnp.zeros(query.shape[:2] + query.shape[3:], query.dtype)  # unused placeholder
        return kernel_sharding.call_sharded(
            lambda q, k, v, rq, rk, s: fused(q, k, v, segment_ids=s),
            query, key, value, runway, runway, _segments_or_zeros(segment_ids, query))
    if implementation == "reference":
        return _reference_causal_attention(
            query, key, value, segment_ids=segment_ids, scale=scale, alibi_slopes=alibi_slopes
        )
    return blockwise.causal_attention(
        query, key, value, segment_ids=segment_ids, scale=scale, alibi_slopes=alibi_slopes
    )


# The backend that implementation selection targets while a program is traced for ahead-of-time
# compilation to a chip this host lacks (train/compile.py); None: JAX's default backend.
_TARGET_BACKEND = contextvars.ContextVar("runway_jax_target_backend", default=None)


@contextlib.contextmanager
def compiling_for(backend: str):
    """Within this context ``implementation=None`` and the kernels' availability check act as if
    JAX's default backend were ``backend`` (e.g. ``"tpu"``): for tracing a program that
    ``jax.jit(...).lower(...).compile()`` compiles for a TPU topology from a CPU host."""
    token = _TARGET_BACKEND.set(backend)
    try:
        yield
    finally:
        _TARGET_BACKEND.reset(token)


def target_backend() -> str:
    return _TARGET_BACKEND.get() or jax.default_backend()


def default_implementation(backend: Optional[str] = None) -> str:
    """The implementation ``implementation=None`` prefers on ``backend`` (default: JAX's):
    ``"pallas_tpu"`` on TPU, ``"pallas_gpu"`` on a CUDA or ROCm GPU, ``"xla"`` otherwise. (A call
    the kernel cannot take, e.g. with ALiBi, still falls back to ``"xla"``.)"""
    backend = backend or target_backend()
    if backend == "tpu":
        return "pallas_tpu"
    if backend in ("gpu", "cuda", "rocm"):
        return "pallas_gpu"
    return "xla"


# --------------------------------------------------------------------------------------------
# Reference implementation: direct, readable, T x T arrays.
# --------------------------------------------------------------------------------------------


def _reference_runway_coefficients(
    runway_query, runway_key, *, runway_coefficient, runway_span, mask, scale, runway_alibi_slope
):
    """METHOD eq. (2) as a product of two triangular ``T x T`` matrices.

    ``rho_ij = sum_k A_ik [k < i] * g(k, j) [k > j]`` (exact) or ``sum_k A_ik [k < i] g(k, j)``
    (prefix): the runway ``j < k < i`` is the intersection of the two triangles.
    """
    length = runway_query.shape[1]
    runway_query = runway_query.astype(jnp.float32)
    runway_key = runway_key.astype(jnp.float32)
    logits = scale * jnp.einsum("bid,bjd->bij", runway_query, runway_key)
    if runway_alibi_slope is not None:
        positions = jnp.arange(length)
        logits = logits + alibi_bias(positions, positions, runway_alibi_slope)
    runway_probs = masked_softmax(logits, mask)  # A of eq. (1): [B, T(i), T(k)]
    coefficient_source = runway_query if runway_coefficient == "bilinear" else runway_key
    kernel = scale * jnp.einsum("bkd,bjd->bkj", coefficient_source, runway_key)  # g(k, j)
    row = jnp.arange(length)[:, None]
    col = jnp.arange(length)[None, :]
    strictly_before = col < row  # as [i, k]: k < i; as [k, j]: j < k
    probs_on_runway = jnp.where(strictly_before, runway_probs, 0.0)
    if runway_span == "exact":
        rho = probs_on_runway @ jnp.where(strictly_before, kernel, 0.0)
        valid = mask & strictly_before
    else:
        rho = probs_on_runway @ kernel
        valid = mask
    return jnp.where(valid, rho, 0.0)


@functools.partial(jax.jit, static_argnames=("beta", "runway_coefficient", "runway_span"))
def _reference_rewired_attention(
    query,
    key,
    value,
    runway_query,
    runway_key,
    *,
    beta,
    runway_coefficient,
    runway_span,
    segment_ids,
    scale,
    alibi_slopes,
    runway_alibi_slope,
):
    (query, key, value, runway_query, runway_key), poisoned = quarantine_nonfinite(
        query, key, value, runway_query, runway_key, segment_ids=segment_ids,
        runway_reaches_output=beta != 0)
    mask = attention_mask(query.shape[1], segment_ids)
    rho = _reference_runway_coefficients(
        runway_query,
        runway_key,
        runway_coefficient=runway_coefficient,
        runway_span=runway_span,
        mask=mask,
        scale=scale,
        runway_alibi_slope=runway_alibi_slope,
    )
    return poison_rows(_reference_attend(
        query, key, value, mask=mask, scale=scale, alibi_slopes=alibi_slopes, bias=-beta * rho
    ), poisoned)


@jax.jit
def _reference_causal_attention(query, key, value, *, segment_ids, scale, alibi_slopes):
    (query, key, value), poisoned = quarantine_nonfinite(query, key, value,
                                                         segment_ids=segment_ids)
    mask = attention_mask(query.shape[1], segment_ids)
    return poison_rows(_reference_attend(
        query, key, value, mask=mask, scale=scale, alibi_slopes=alibi_slopes, bias=None
    ), poisoned)


def _reference_attend(query, key, value, *, mask, scale, alibi_slopes, bias):
    """Causal softmax attention with an optional ``[B, T, T]`` logit bias shared by all heads."""
    groups = query.shape[2] // key.shape[2]
    key = jnp.repeat(key.astype(jnp.float32), groups, axis=2)  # query head h uses kv head h // G
    value = jnp.repeat(value.astype(jnp.float32), groups, axis=2)
    logits = scale * jnp.einsum("bihd,bjhd->bhij", query.astype(jnp.float32), key)
    if bias is not None:
        logits = logits + bias[:, None]
    if alibi_slopes is not None:
        positions = jnp.arange(query.shape[1])
        logits = logits + alibi_bias(positions, positions, alibi_slopes)
    probs = masked_softmax(logits, mask[:, None])
    return jnp.einsum("bhij,bjhd->bihd", probs, value).astype(query.dtype)


# --------------------------------------------------------------------------------------------
# Argument checks: one-line ValueErrors naming the argument, the value and what is allowed.
# --------------------------------------------------------------------------------------------


def _check_array(name, argument, array, rank, layout):
    shape = getattr(array, "shape", None)
    dtype = getattr(array, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(f"{name}: {argument} must be an array of shape {layout}, got {type(array).__name__}.")
    if len(shape) != rank:
        raise ValueError(f"{name}: {argument}.shape={tuple(shape)} must have rank {rank}, {layout}.")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name}: {argument}.dtype={dtype} must be floating (float32, bfloat16, float16)."
        )


def _check_qkv(name, query, key, value):
    _check_array(name, "query", query, 4, "[B, T, H, d]")
    _check_array(name, "key", key, 4, "[B, T, H_kv, d]")
    _check_array(name, "value", value, 4, "[B, T, H_kv, d]")
    batch, length, heads, width = query.shape
    if key.shape != value.shape:
        raise ValueError(f"{name}: key.shape={key.shape} and value.shape={value.shape} must be equal.")
    if key.shape[:2] != (batch, length) or key.shape[3] != width:
        raise ValueError(
            f"{name}: key.shape={key.shape} must be [B, T, H_kv, d] = [{batch}, {length}, H_kv, "
            f"{width}] to match query.shape={query.shape}."
        )
    if min(batch, length, heads, width) < 1 or key.shape[2] < 1 or heads % key.shape[2]:
        raise ValueError(
            f"{name}: H_kv={key.shape[2]} (key.shape[2]) must divide H={heads} (query.shape[2]), "
            f"and no dimension may be 0; got query.shape={query.shape}."
        )
    for argument, array in (("key", key), ("value", value)):
        if array.dtype != query.dtype:
            raise ValueError(
                f"{name}: {argument}.dtype={array.dtype} must equal query.dtype={query.dtype}."
            )


def _check_runway(name, query, runway_query, runway_key):
    _check_array(name, "runway_query", runway_query, 3, "[B, T, d]")
    _check_array(name, "runway_key", runway_key, 3, "[B, T, d]")
    if runway_query.shape != runway_key.shape:
        raise ValueError(
            f"{name}: runway_query.shape={runway_query.shape} and runway_key.shape="
            f"{runway_key.shape} must be equal."
        )
    if min(runway_query.shape) < 1:
        raise ValueError(f"{name}: runway_query.shape={runway_query.shape} has a zero dimension.")
    if runway_query.dtype != runway_key.dtype:
        raise ValueError(
            f"{name}: runway_key.dtype={runway_key.dtype} must equal "
            f"runway_query.dtype={runway_query.dtype}."
        )
    if query is not None:
        expected = (query.shape[0], query.shape[1], query.shape[3])
        if runway_query.shape != expected:
            raise ValueError(
                f"{name}: runway_query.shape={runway_query.shape} must be [B, T, d] = "
                f"{list(expected)} to match query.shape={query.shape}."
            )
        if runway_query.dtype != query.dtype:
            raise ValueError(
                f"{name}: runway_query.dtype={runway_query.dtype} must equal "
                f"query.dtype={query.dtype}."
            )


def _check_beta(name, beta):
    if isinstance(beta, jax.core.Tracer):
        raise ValueError(
            f"{name}: beta must be a concrete Python float (a fixed hyper-parameter), not a traced "
            "value; close over it instead of passing it as a jit argument."
        )
    try:
        value = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: beta={beta!r} must be a real number >= 0.") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: beta={beta!r} must be a finite real number >= 0.")
    return value


def _check_choice(name, argument, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}: {argument}={value!r} is not one of {', '.join(map(repr, allowed))}.")


def _check_segment_ids(name, segment_ids, batch_and_length):
    if segment_ids is None:
        return
    shape = getattr(segment_ids, "shape", None)
    if shape is None or tuple(shape) != tuple(batch_and_length):
        raise ValueError(
            f"{name}: segment_ids.shape={shape} must be [B, T] = {list(batch_and_length)}."
        )
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"{name}: segment_ids.dtype={segment_ids.dtype} must be an integer dtype.")


def _check_scale(name, scale, width):
    if scale is None:
        return 1.0 / math.sqrt(width)
    if isinstance(scale, jax.core.Tracer):
        return scale
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: scale={scale!r} must be a positive real number or None.") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: scale={scale!r} must be a finite positive number or None.")
    return value


def _check_alibi(name, alibi_slopes, runway_alibi_slope, heads):
    if alibi_slopes is not None and tuple(jnp.shape(alibi_slopes)) != (heads,):
        raise ValueError(
            f"{name}: alibi_slopes.shape={tuple(jnp.shape(alibi_slopes))} must be [H] = [{heads}]."
        )
    if runway_alibi_slope is not None and jnp.shape(runway_alibi_slope) != ():
        raise ValueError(
            f"{name}: runway_alibi_slope must be a scalar, got shape {jnp.shape(runway_alibi_slope)}."
        )


def _resolve_implementation(name, implementation, *, interpret=False, width=None, scale=None,
                            uses_alibi=False):
    """The implementation that runs this call: ``implementation`` itself if it can, else a
    one-line ValueError; for ``None`` or a sequence, the first that can run it."""
    if implementation is None:
        candidates, explicit = (default_implementation(), "xla"), False
    elif isinstance(implementation, (tuple, list)):
        if not implementation:
            raise ValueError(f"{name}: implementation=() is empty; name at least one of {IMPLEMENTATIONS}.")
        for choice in implementation:
            _check_choice(name, "implementation", choice, IMPLEMENTATIONS)
        candidates, explicit = tuple(implementation), len(implementation) == 1
    else:
        _check_choice(name, "implementation", implementation, IMPLEMENTATIONS)
        candidates, explicit = (implementation,), True
    reasons = []
    for choice in candidates:
        reason = _why_not_runnable(choice, interpret=interpret, width=width, scale=scale,
                                   uses_alibi=uses_alibi)
        if reason is None:
            return choice
        reasons.append(reason)
    if explicit:
        raise ValueError(f"{name}: implementation={candidates[0]!r} cannot run this call: {reasons[0]}.")
    details = "; ".join(f"{choice!r}: {reason}" for choice, reason in zip(candidates, reasons))
    raise ValueError(f"{name}: none of implementation={tuple(candidates)!r} can run this call "
                     f"({details}).")


def _why_not_runnable(implementation, *, interpret, width, scale, uses_alibi):
    """Why ``implementation`` cannot run a call, or ``None`` if it can."""
    if implementation not in kernels.TARGETS:
        return None
    if uses_alibi:
        return "ALiBi (alibi_slopes, runway_alibi_slope) is not supported by the pallas kernels; use implementation='xla'"
    if isinstance(scale, jax.core.Tracer):
        return "a traced scale is not supported by the pallas kernels; pass a Python float or use implementation='xla'"
    if implementation == "pallas_gpu" and width is not None and width & (width - 1):
        return f"head width d={width} is not a power of two (Triton tiles); use implementation='xla'"
    if interpret or kernels.interpret_forced():
        return None
    backend = target_backend()
    needed = "tpu" if implementation == "pallas_tpu" else "gpu"
    if backend != needed:
        return (f"it needs a {needed.upper()} but JAX's default backend is {backend!r}; pass "
                "interpret=True to run the kernel in interpret mode, or use implementation='xla'")
    return None


def _segments_or_zeros(segment_ids, query):
    if segment_ids is None:
        return jnp.zeros(query.shape[:2], jnp.int32)
    return segment_ids
