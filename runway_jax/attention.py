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

With ``return_probabilities=True``, :func:`rewired_attention` and :func:`causal_attention` also
return the softmax weights (:class:`AttentionProbabilities`: ``A~^h``, ``A`` and ``rho``) from the
same computation as the output, by the ``"reference"`` implementation; the analysis tools
(:mod:`runway_jax.evaluation.runway_analysis`) take their maps from there.

They take the keywords of ``jax.nn.dot_product_attention`` where the concepts match, defined in
METHOD (7): ``mask`` (bool, broadcastable to ``[B, Tq, Tk]``), ``local_window_size``,
``logits_soft_cap``, ``key_value_seq_lengths``, integer or boolean ``segment_ids``, a traced
``beta``, and queries that are the last ``Tq <= Tk`` positions of the keys (bottom-right causal
alignment, for decoding and chunked prefill).

``implementation`` picks how the same numbers are computed:

* ``"reference"``: a direct, readable evaluation with ``T x T`` arrays (eq. (2) as a product of two
  triangular matrices). Use it to check anything else.
* ``"xla"``: the memory-lean eq. (3b) evaluation in :mod:`runway_jax.blockwise`, chunked over query
  blocks and key blocks; it never builds a ``T x T x T`` or ``T x T x d`` array, and its backward
  pass recomputes each chunk instead of storing it. For :func:`causal_attention` alone, a call
  whose ``B x H x Tq x Tk`` logits fit :data:`DENSE_LOGITS_LIMIT` (and without ALiBi or a soft
  cap) runs XLA's own dense ``jax.nn.dot_product_attention``, 1.2-1.5x faster than the blocks on
  CPU there; beyond the limit it goes blockwise.
* ``"pallas_tpu"`` / ``"pallas_gpu"`` (Triton) / ``"pallas_mosaic_gpu"`` (Hopper and newer:
  head width a multiple of 64, 16-bit inputs): the fused flash-style kernels of
  :mod:`runway_jax.kernels` (METHOD (3c)); they never hold a ``T x T`` array. They run on their
  accelerator; ``"pallas_tpu_interpret"`` / ``"pallas_gpu_interpret"`` /
  ``"pallas_mosaic_gpu_interpret"`` run the same kernels in Pallas interpret mode on any backend
  (slow; for tests on CPU). They take every option of METHOD (7)
  except a dense ``mask`` (window, soft cap, fewer queries than keys, ``key_value_seq_lengths``,
  segment ids, a traced ``beta``), but not the ALiBi options or a traced ``scale``. Inside a
  ``jax.set_mesh`` context they run under ``shard_map`` (batch and heads split over the mesh).
* ``None``: the best implementation that can run this call: ``"pallas_tpu"`` on TPU;
  ``"pallas_mosaic_gpu"`` on a Hopper or newer GPU, else (or for a call it cannot take, e.g.
  float32 inputs) ``"pallas_gpu"``; ``"xla"`` otherwise (and whenever no kernel can take the
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
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from runway_jax import blockwise, kernels
from runway_jax.kernels import sharding as kernel_sharding
from runway_jax.masking import (at_positions, finite_or_zero, masked_softmax,
                                 nonfinite_positions, poison_rows, query_positions, rows_seeing,
                                 soft_cap, visible_keys)
from runway_jax.masking import attention_mask  # noqa: F401  (part of this module's namespace)

from runway_jax.attention_config import IMPLEMENTATIONS, RUNWAY_COEFFICIENTS, RUNWAY_SPANS


class AttentionProbabilities(NamedTuple):
    """The softmax weights behind one :func:`rewired_attention` call, float32, from the same
    computation as its output (``return_probabilities=True``). Rows that see nothing are zero;
    rows whose output is NaN (they see a non-finite input) are NaN."""

    heads: jax.Array  # [B, H, Tq, Tk]: A~^h, softmax of s - beta * rho, eqs. (3), (7c)
    runway: Optional[jax.Array]  # [B, Tq, Tk]: A, the runway head's attention, eqs. (1), (7b)
    runway_coefficients: Optional[jax.Array]  # [B, Tq, Tk]: rho, eq. (2)


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
    mask=None,
    segment_ids=None,
    local_window_size=None,
    logits_soft_cap=None,
    key_value_seq_lengths=None,
    scale=None,
    implementation=None,
    alibi_slopes=None,
    runway_alibi_slope=None,
    return_probabilities=False,
):
    """Runway-aware rewired causal attention, METHOD eqs. (1)-(3) with the options of (7).

    Args:
      query: ``[B, Tq, H, d]`` queries of the rewired heads (every head except the runway head);
        the LAST ``Tq <= Tk`` positions of the key sequence (bottom-right causal alignment).
      key, value: ``[B, Tk, H_kv, d]``, ``H_kv`` dividing ``H`` (grouped-query attention).
      runway_query, runway_key: ``[B, Tk, d]``, the runway head's query and key at EVERY key
        position (eq. (1); the bilinear g of eq. (2) reads the runway queries of runway tokens).
      beta: rewiring strength ``>= 0`` (eq. (3)), a Python float or a traced scalar; ``0`` gives
        standard causal attention.
      runway_coefficient: kernel g of eq. (2), ``"bilinear"`` or ``"dot"``.
      runway_span: ``"exact"`` (eq. (2)) or ``"prefix"``.
      mask: optional bool, broadcastable to ``[B, Tq, Tk]``; True = may attend (eq. (7a)). It
        applies to the runway head's attention too.
      segment_ids: optional int or bool ``[B, Tk]``; attention and runways stay inside a segment
        (eq. (5)).
      local_window_size: optional int ``w >= 0``: query i sees keys ``i - w <= j <= i``, the
        runway head too (eq. (7a)).
      logits_soft_cap: optional float ``c > 0``: every pre-softmax logit ``x`` (the runway head's
        and the rewired heads' ``s - beta * rho``) becomes ``c * tanh(x / c)`` (eqs. (7b), (7c)).
      key_value_seq_lengths: optional int ``[B]``: row b has ``L_b <= Tk`` real keys (the rest is
        padding) and its queries are the last ``Tq`` positions of those ``L_b`` (a cache of
        ragged rows; eq. (7)).
      scale: logit scale, default ``1 / sqrt(d)``; it scales both the logits and g.
      implementation: ``"reference"``, ``"xla"``, ``"pallas_gpu"``, ``"pallas_tpu"``,
        ``"pallas_mosaic_gpu"``, their interpret-mode twins (``"pallas_gpu_interpret"``, ...),
        ``None`` (the best available) or a sequence of names tried in order (see the module
        docstring).
      alibi_slopes: optional ``[H]`` ALiBi slopes ``m_h``: adds ``-m_h * (i - j)`` to head h's
        logits. Not part of METHOD; it lets ALiBi models use rewiring.
      runway_alibi_slope: optional ALiBi slope of the runway head's own attention A. The kernel g
        stays the bilinear (or dot) form of eq. (2) without position bias.
      return_probabilities: also return the :class:`AttentionProbabilities` (``A~^h``, ``A``,
        ``rho``) from the same computation as the output, every option honoured. Only the
        ``"reference"`` implementation forms these ``T x T`` arrays: ``implementation=None`` then
        runs it, any other named implementation is a ``ValueError``.

    Returns:
      ``[B, Tq, H, d]`` in the dtype of ``query``; with ``return_probabilities=True`` the pair
      ``(output, AttentionProbabilities)``.
    """
    name = "rewired_attention"
    _check_qkv(name, query, key, value)
    _check_runway(name, query, key, runway_query, runway_key)
    beta = _check_beta(name, beta)
    _check_choice(name, "runway_coefficient", runway_coefficient, RUNWAY_COEFFICIENTS)
    _check_choice(name, "runway_span", runway_span, RUNWAY_SPANS)
    options = _check_options(name, query.shape[:2], key.shape[1], mask=mask,
                             segment_ids=segment_ids, local_window_size=local_window_size,
                             logits_soft_cap=logits_soft_cap,
                             key_value_seq_lengths=key_value_seq_lengths)
    scale = _check_scale(name, scale, query.shape[-1])
    _check_alibi(name, alibi_slopes, runway_alibi_slope, query.shape[2])
    if return_probabilities:
        implementation = _implementation_with_probabilities(name, implementation)
    implementation = _resolve_implementation(
        name, implementation, width=query.shape[-1], dtype=query.dtype, scale=scale,
        uses_alibi=alibi_slopes is not None or runway_alibi_slope is not None,
        beta=beta, lengths=(query.shape[1], key.shape[1]), **options)
    segment_ids = options["segment_ids"]
    if implementation in kernels.IMPLEMENTATIONS:
        fused = functools.partial(
            kernels.rewired_attention, implementation=implementation,
            runway_coefficient=runway_coefficient, runway_span=runway_span, scale=scale,
            local_window_size=options["local_window_size"],
            logits_soft_cap=options["logits_soft_cap"])
        return kernel_sharding.call_sharded(
            lambda q, k, v, rq, rk, s, lengths, b: fused(
                q, k, v, rq, rk, segment_ids=s, key_value_seq_lengths=lengths, beta=b),
            query, key, value, runway_query, runway_key, _segments_or_zeros(segment_ids, key),
            key_value_seq_lengths=options["key_value_seq_lengths"], beta=beta)
    options.update(
        beta=beta,
        runway_coefficient=runway_coefficient,
        runway_span=runway_span,
        scale=scale,
        alibi_slopes=alibi_slopes,
        runway_alibi_slope=runway_alibi_slope,
    )
    if implementation == "reference":
        return _reference_rewired_attention(query, key, value, runway_query, runway_key,
                                            return_probabilities=return_probabilities, **options)
    return blockwise.rewired_attention(query, key, value, runway_query, runway_key, **options)


def runway_coefficients(
    runway_query,
    runway_key,
    *,
    runway_coefficient="bilinear",
    runway_span="exact",
    mask=None,
    segment_ids=None,
    local_window_size=None,
    logits_soft_cap=None,
    scale=None,
    runway_alibi_slope=None,
):
    """Runway coefficients ``rho`` of METHOD eq. (2) (with the options of (7)), float32
    ``[B, T, T]``.

    ``rho[b, i, j]`` is the runway head's attention-weighted score along the runway of the edge
    ``j -> i``. Entries without a runway are zero: ``j >= i`` in the exact span (and ``j > i`` in
    the prefix span), and pairs that are not visible (other segments, outside the window, masked).
    ``mask`` is broadcastable to ``[B, T, T]``. Computed by the eq. (3b) evaluation, so the cost
    is ``O(T^2 (d + block))`` rather than ``O(T^3)``; the result itself is ``T x T``.
    """
    name = "runway_coefficients"
    _check_runway(name, None, None, runway_query, runway_key)
    _check_choice(name, "runway_coefficient", runway_coefficient, RUNWAY_COEFFICIENTS)
    _check_choice(name, "runway_span", runway_span, RUNWAY_SPANS)
    options = _check_options(name, runway_query.shape[:2], runway_query.shape[1], mask=mask,
                             segment_ids=segment_ids, local_window_size=local_window_size,
                             logits_soft_cap=logits_soft_cap, key_value_seq_lengths=None)
    options.pop("key_value_seq_lengths")
    scale = _check_scale(name, scale, runway_query.shape[-1])
    _check_alibi(name, None, runway_alibi_slope, 1)
    return blockwise.runway_coefficients(
        runway_query,
        runway_key,
        runway_coefficient=runway_coefficient,
        runway_span=runway_span,
        scale=scale,
        runway_alibi_slope=runway_alibi_slope,
        **options,
    )


def causal_attention(
    query,
    key,
    value,
    *,
    mask=None,
    segment_ids=None,
    local_window_size=None,
    logits_soft_cap=None,
    key_value_seq_lengths=None,
    scale=None,
    implementation=None,
    alibi_slopes=None,
    return_probabilities=False,
):
    """Standard causal (grouped-query) attention from the same code: the baseline.

    Shapes, the options of METHOD (7) and ``implementation`` as in :func:`rewired_attention`; the
    Pallas implementations run the fused kernel with ``beta = 0``, which skips the runway head.
    Returns ``[B, Tq, H, d]`` in the dtype of ``query``; with ``return_probabilities=True`` (the
    ``"reference"`` implementation, as in :func:`rewired_attention`) the pair ``(output,
    probabilities [B, H, Tq, Tk])``, the float32 softmax weights that made the output.
    """
    name = "causal_attention"
    _check_qkv(name, query, key, value)
    options = _check_options(name, query.shape[:2], key.shape[1], mask=mask,
                             segment_ids=segment_ids, local_window_size=local_window_size,
                             logits_soft_cap=logits_soft_cap,
                             key_value_seq_lengths=key_value_seq_lengths)
    scale = _check_scale(name, scale, query.shape[-1])
    _check_alibi(name, alibi_slopes, None, query.shape[2])
    if return_probabilities:
        implementation = _implementation_with_probabilities(name, implementation)
    implementation = _resolve_implementation(
        name, implementation, width=query.shape[-1], dtype=query.dtype, scale=scale,
        uses_alibi=alibi_slopes is not None, beta=0.0, lengths=(query.shape[1], key.shape[1]),
        **options)
    segment_ids = options["segment_ids"]
    if implementation in kernels.IMPLEMENTATIONS:
        fused = functools.partial(kernels.causal_attention, implementation=implementation,
                                  scale=scale, local_window_size=options["local_window_size"],
                                  logits_soft_cap=options["logits_soft_cap"])
        runway = jnp.zeros(key.shape[:2] + key.shape[3:], query.dtype)  # unused placeholder
        return kernel_sharding.call_sharded(
            lambda q, k, v, rq, rk, s, lengths, _: fused(q, k, v, segment_ids=s,
                                                         key_value_seq_lengths=lengths),
            query, key, value, runway, runway, _segments_or_zeros(segment_ids, key),
            key_value_seq_lengths=options["key_value_seq_lengths"])
    options.update(scale=scale, alibi_slopes=alibi_slopes)
    if implementation == "reference":
        return _reference_causal_attention(query, key, value,
                                           return_probabilities=return_probabilities, **options)
    if _dense_logits_fit(query, key) and alibi_slopes is None and logits_soft_cap is None:
        return _dense_causal_attention(query, key, value, **options)
    return blockwise.causal_attention(query, key, value, **options)


# The "xla" path's standard attention (without ALiBi or a soft cap) is XLA's own dense
# jax.nn.dot_product_attention while a call's B x H x Tq x Tk logits fit this many elements
# (64 MiB in float32; T <= 1448 at B = 1, H = 8), and blockwise, O(T) in memory, beyond. Dense is
# 1.2-1.5x faster than the blocks on CPU (benchmarks/attention.py); the limit keeps what a model
# stores for its backward pass small (a gpt2-small step at 4 x 1024 tokens stays blockwise: dense,
# its 12 layers would keep about 2.4 GiB of probabilities).
DENSE_LOGITS_LIMIT = 2 ** 24


def _dense_logits_fit(query, key) -> bool:
    batch, query_length, heads, _ = query.shape
    return batch * heads * query_length * key.shape[1] <= DENSE_LOGITS_LIMIT


def _dense_causal_attention(query, key, value, *, mask, segment_ids, local_window_size,
                            logits_soft_cap, key_value_seq_lengths, scale, alibi_slopes):
    """Standard attention by ``jax.nn.dot_product_attention(implementation="xla")`` with METHOD
    (7a)'s visibility as its mask, and this library's invariants around it: non-finite inputs
    quarantined (METHOD (6) item 3) and fully masked rows zero (XLA's give the mean of the
    values)."""
    del logits_soft_cap, alibi_slopes  # None here (see causal_attention)
    _, visible = _reference_visibility(query, key, mask=mask, segment_ids=segment_ids,
                                       local_window_size=local_window_size,
                                       key_value_seq_lengths=key_value_seq_lengths)
    poisoned = _reference_poisoned(query, key, value, visible, None)
    out = jax.nn.dot_product_attention(finite_or_zero(query), finite_or_zero(key),
                                       finite_or_zero(value), mask=visible[:, None], scale=scale,
                                       implementation="xla")
    out = jnp.where(visible.any(-1)[..., None, None], out, jnp.zeros((), out.dtype))
    return poison_rows(out, poisoned)


# The backend that implementation selection targets while a program is traced for ahead-of-time
# compilation to a chip this host lacks (train/compile.py); None: JAX's default backend.
_TARGET_BACKEND = contextvars.ContextVar("runway_jax_target_backend", default=None)


@contextlib.contextmanager
def compiling_for(backend: str):
    """Within this context ``implementation=None`` and the kernels' availability check act as if
    JAX's default backend were ``backend`` (e.g. ``"tpu"``): for tracing a program that
    ``jax.jit(...).lower(...).compile()`` compiles for a TPU topology from a CPU host. It is read
    at trace time, which ``jit``'s cache does not key on: lower a function not traced before
    (a fresh ``jax.jit``), as :mod:`runway_jax.training.aot` does."""
    token = _TARGET_BACKEND.set(backend)
    try:
        yield
    finally:
        _TARGET_BACKEND.reset(token)


def target_backend() -> str:
    return _TARGET_BACKEND.get() or jax.default_backend()


def default_implementation(backend: Optional[str] = None) -> str:
    """The implementation ``implementation=None`` prefers on ``backend`` (default: JAX's):
    ``"pallas_tpu"`` on TPU, ``"pallas_mosaic_gpu"`` on a Hopper or newer GPU, ``"pallas_gpu"`` on
    an older CUDA or a ROCm GPU, ``"xla"`` otherwise. (A call the kernel cannot take, e.g. with
    ALiBi, falls back along :func:`default_implementations`.)"""
    return default_implementations(backend)[0]


def default_implementations(backend: Optional[str] = None) -> tuple[str, ...]:
    """What ``implementation=None`` tries on ``backend``, in order; ``"xla"`` always last."""
    backend = backend or target_backend()
    if backend == "tpu":
        return ("pallas_tpu", "xla")
    if backend in ("gpu", "cuda", "rocm"):
        if _hopper_or_newer():
            return ("pallas_mosaic_gpu", "pallas_gpu", "xla")
        return ("pallas_gpu", "xla")
    return ("xla",)


def _hopper_or_newer() -> bool:
    """JAX's first GPU is sm_90 or newer (TMA and WGMMA, which the Mosaic GPU kernel uses)."""
    try:
        capability = jax.devices("gpu")[0].compute_capability
    except (RuntimeError, AttributeError, IndexError):  # no CUDA device (ROCm has no such field)
        return False
    return float(capability) >= 9.0


# --------------------------------------------------------------------------------------------
# Reference implementation: direct, readable, T x T arrays.
# --------------------------------------------------------------------------------------------


def _reference_visibility(query, key, *, mask, segment_ids, local_window_size,
                          key_value_seq_lengths):
    """``(positions [B or 1, Tq], V [B or 1, Tq, Tk])`` of METHOD eq. (7a)."""
    query_length, key_length = query.shape[1], key.shape[1]
    positions = query_positions(query_length, key_length, key_value_seq_lengths)
    query_segments = None if segment_ids is None else at_positions(segment_ids, positions)
    visible = visible_keys(positions, jnp.arange(key_length), query_segments=query_segments,
                           key_segments=segment_ids, local_window_size=local_window_size,
                           mask=mask)
    return positions, visible


def _distance(positions, key_length):
    return (positions[:, :, None] - jnp.arange(key_length)[None, None, :]).astype(jnp.float32)


def _reference_runway_coefficients(runway_query, runway_key, positions, visible, *,
                                   runway_coefficient, runway_span, scale, runway_alibi_slope,
                                   logits_soft_cap):
    """``(rho, A)``: METHOD eq. (2) as a product of two triangular matrices, rows at
    ``positions``, and the runway head's attention A of eq. (1) it is made from.

    ``rho_ij = sum_k A_ik [k < i] * g(k, j) [k > j]`` (exact) or ``sum_k A_ik [k < i] g(k, j)``
    (prefix): the runway ``j < k < i`` is the intersection of the two triangles.
    """
    key_length = runway_query.shape[1]
    runway_query = runway_query.astype(jnp.float32)
    runway_key = runway_key.astype(jnp.float32)
    distance = _distance(positions, key_length)  # [B or 1, Tq(i), Tk]
    row_queries = at_positions(runway_query, positions)  # q^r_i of each query row
    logits = scale * jnp.einsum("bid,bkd->bik", row_queries, runway_key)
    if runway_alibi_slope is not None:
        logits = logits - jnp.asarray(runway_alibi_slope, jnp.float32) * distance
    runway_probs = masked_softmax(soft_cap(logits, logits_soft_cap), visible)  # A, eq. (7b)
    coefficient_source = runway_query if runway_coefficient == "bilinear" else runway_key
    kernel = scale * jnp.einsum("bkd,bjd->bkj", coefficient_source, runway_key)  # g(k, j)
    probs_on_runway = jnp.where(distance > 0, runway_probs, 0.0)  # k < i
    if runway_span == "exact":
        after_key = jnp.arange(key_length)[None, :] < jnp.arange(key_length)[:, None]  # [k, j]: j < k
        rho = probs_on_runway @ jnp.where(after_key, kernel, 0.0)
        valid = visible & (distance > 0)
    else:
        rho = probs_on_runway @ kernel
        valid = visible
    return jnp.where(valid, rho, 0.0), runway_probs


@functools.partial(jax.jit, static_argnames=("runway_coefficient", "runway_span",
                                             "local_window_size", "return_probabilities"))
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
    mask,
    segment_ids,
    local_window_size,
    logits_soft_cap,
    key_value_seq_lengths,
    scale,
    alibi_slopes,
    runway_alibi_slope,
    return_probabilities=False,
):
    positions, visible = _reference_visibility(
        query, key, mask=mask, segment_ids=segment_ids, local_window_size=local_window_size,
        key_value_seq_lengths=key_value_seq_lengths)
    runway_reaches_output = jnp.asarray(beta) != 0
    bad_runway = nonfinite_positions(runway_query, runway_key) & runway_reaches_output
    poisoned = _reference_poisoned(query, key, value, visible, bad_runway)
    poisoned |= (at_positions(nonfinite_positions(runway_query)[..., None], positions)
                 & runway_reaches_output)
    rho, runway_probs = _reference_runway_coefficients(
        finite_or_zero(runway_query), finite_or_zero(runway_key), positions, visible,
        runway_coefficient=runway_coefficient, runway_span=runway_span, scale=scale,
        runway_alibi_slope=runway_alibi_slope, logits_soft_cap=logits_soft_cap)
    out, probs = _reference_attend(finite_or_zero(query), finite_or_zero(key),
                                   finite_or_zero(value), positions, visible, scale=scale,
                                   alibi_slopes=alibi_slopes, logits_soft_cap=logits_soft_cap,
                                   bias=-beta * rho)
    out = poison_rows(out, poisoned)
    if not return_probabilities:
        return out
    # A and rho were computed on zeroed non-finite inputs: NaN the rows that see one (through the
    # runway head, whatever beta), as the heads' rows are NaN exactly where their outputs are.
    runway_poisoned = (rows_seeing(nonfinite_positions(runway_query, runway_key)[..., None],
                                   visible)
                       | at_positions(nonfinite_positions(runway_query)[..., None], positions))
    return out, AttentionProbabilities(
        heads=_poison_probability_rows(probs, jnp.moveaxis(poisoned, 2, 1)),
        runway=_poison_probability_rows(runway_probs, runway_poisoned[..., 0]),
        runway_coefficients=_poison_probability_rows(rho, runway_poisoned[..., 0]))


@functools.partial(jax.jit, static_argnames=("local_window_size", "return_probabilities"))
def _reference_causal_attention(query, key, value, *, mask, segment_ids, local_window_size,
                                logits_soft_cap, key_value_seq_lengths, scale, alibi_slopes,
                                return_probabilities=False):
    positions, visible = _reference_visibility(
        query, key, mask=mask, segment_ids=segment_ids, local_window_size=local_window_size,
        key_value_seq_lengths=key_value_seq_lengths)
    poisoned = _reference_poisoned(query, key, value, visible, None)
    out, probs = _reference_attend(finite_or_zero(query), finite_or_zero(key),
                                   finite_or_zero(value), positions, visible, scale=scale,
                                   alibi_slopes=alibi_slopes, logits_soft_cap=logits_soft_cap,
                                   bias=None)
    out = poison_rows(out, poisoned)
    if not return_probabilities:
        return out
    return out, _poison_probability_rows(probs, jnp.moveaxis(poisoned, 2, 1))


def _poison_probability_rows(probs, poisoned):
    """``probs`` ``[..., Tq, Tk]`` with the rows ``poisoned`` ``[..., Tq]`` set to NaN."""
    return jnp.where(poisoned[..., None], jnp.nan, probs)


def _reference_poisoned(query, key, value, visible, bad_runway):
    """``[B, Tq, H]``: rows that see a non-finite key or value of their group, a non-finite
    runway position (``bad_runway`` ``[B, Tk]``, or None), or whose own query is one."""
    heads, kv_heads = query.shape[2], key.shape[2]
    seen = jnp.repeat(rows_seeing(nonfinite_positions(key, value), visible), heads // kv_heads,
                      axis=2)
    if bad_runway is not None:
        seen = seen | rows_seeing(bad_runway[..., None], visible)
    return seen | nonfinite_positions(query)


def _reference_attend(query, key, value, positions, visible, *, scale, alibi_slopes,
                      logits_soft_cap, bias):
    """``(output, probabilities [B, H, Tq, Tk])``: softmax attention restricted to ``visible``
    with an optional ``[B, Tq, Tk]`` logit bias shared by all heads, soft-capped after every bias
    (eq. (7c))."""
    groups = query.shape[2] // key.shape[2]
    key = jnp.repeat(key.astype(jnp.float32), groups, axis=2)  # query head h uses kv head h // G
    value = jnp.repeat(value.astype(jnp.float32), groups, axis=2)
    logits = scale * jnp.einsum("bihd,bjhd->bhij", query.astype(jnp.float32), key)
    if bias is not None:
        logits = logits + bias[:, None]
    if alibi_slopes is not None:
        distance = _distance(positions, key.shape[1])
        logits = logits - jnp.asarray(alibi_slopes, jnp.float32)[None, :, None, None] * distance[:, None]
    probs = masked_softmax(soft_cap(logits, logits_soft_cap), visible[:, None])
    return jnp.einsum("bhij,bjhd->bihd", probs, value).astype(query.dtype), probs


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
    _check_array(name, "key", key, 4, "[B, Tk, H_kv, d]")
    _check_array(name, "value", value, 4, "[B, Tk, H_kv, d]")
    batch, length, heads, width = query.shape
    if key.shape != value.shape:
        raise ValueError(f"{name}: key.shape={key.shape} and value.shape={value.shape} must be equal.")
    if key.shape[0] != batch or key.shape[3] != width:
        raise ValueError(
            f"{name}: key.shape={key.shape} must be [B, Tk, H_kv, d] = [{batch}, Tk, H_kv, "
            f"{width}] to match query.shape={query.shape}."
        )
    if key.shape[1] < length:
        raise ValueError(
            f"{name}: query has Tq={length} rows but key only Tk={key.shape[1]}; queries are the "
            "last Tq of the Tk key positions, so Tq <= Tk."
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


def _check_runway(name, query, key, runway_query, runway_key):
    _check_array(name, "runway_query", runway_query, 3, "[B, Tk, d]")
    _check_array(name, "runway_key", runway_key, 3, "[B, Tk, d]")
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
        expected = (query.shape[0], key.shape[1], query.shape[3])
        if runway_query.shape != expected:
            raise ValueError(
                f"{name}: runway_query.shape={runway_query.shape} must be [B, Tk, d] = "
                f"{list(expected)}: the runway head's queries and keys at every key position "
                f"(key.shape={key.shape})."
            )
        if runway_query.dtype != query.dtype:
            raise ValueError(
                f"{name}: runway_query.dtype={runway_query.dtype} must equal "
                f"query.dtype={query.dtype}."
            )


def _check_beta(name, beta):
    """A Python float ``>= 0`` as a float; a traced (or array) scalar as it is (METHOD (7))."""
    if isinstance(beta, (jax.Array, jax.core.Tracer)) or hasattr(beta, "dtype"):
        if jnp.shape(beta) != () or not jnp.issubdtype(jnp.result_type(beta), jnp.floating):
            raise ValueError(f"{name}: beta must be a real scalar >= 0, got an array of shape "
                             f"{jnp.shape(beta)} and dtype {jnp.result_type(beta)}.")
        if isinstance(beta, jax.core.Tracer):
            return beta
        beta = float(beta)
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


def _check_options(name, query_batch_and_length, key_length, *, mask, segment_ids,
                   local_window_size, logits_soft_cap, key_value_seq_lengths):
    """The options of METHOD (7), checked, as keyword arguments of an implementation (boolean
    segment ids as int32, a mask as a rank-3 bool array)."""
    batch, query_length = query_batch_and_length
    if segment_ids is not None:
        shape = getattr(segment_ids, "shape", None)
        if shape is None or tuple(shape) != (batch, key_length):
            raise ValueError(f"{name}: segment_ids.shape={shape} must be [B, Tk] = "
                             f"{[batch, key_length]}.")
        if segment_ids.dtype == jnp.bool_:
            segment_ids = segment_ids.astype(jnp.int32)
        elif not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"{name}: segment_ids.dtype={segment_ids.dtype} must be an integer "
                             "or bool dtype.")
    if mask is not None:
        shape, dtype = getattr(mask, "shape", None), getattr(mask, "dtype", None)
        wanted = (batch, query_length, key_length)
        if (shape is None or len(shape) > 3
                or any(have not in (1, want) for have, want in zip(shape[::-1], wanted[::-1]))):
            raise ValueError(f"{name}: mask.shape={shape} must be broadcastable to [B, Tq, Tk] = "
                             f"{list(wanted)}.")
        if dtype != jnp.bool_:
            raise ValueError(f"{name}: mask.dtype={dtype} must be bool (True = may attend); for "
                             "an additive bias use alibi_slopes or your own logits.")
        mask = jnp.reshape(mask, (1,) * (3 - len(shape)) + tuple(shape))
    if local_window_size is not None:
        if (isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2
                and local_window_size[1] == 0):
            local_window_size = local_window_size[0]  # jax.nn.dot_product_attention's (left, 0)
        if isinstance(local_window_size, bool) or not isinstance(local_window_size, int) \
                or local_window_size < 0:
            raise ValueError(f"{name}: local_window_size={local_window_size!r} must be an int "
                             ">= 0 (query i sees keys i - w .. i), or (w, 0), or None.")
    if logits_soft_cap is not None:
        if isinstance(logits_soft_cap, jax.core.Tracer):
            raise ValueError(f"{name}: logits_soft_cap must be a Python float, not a traced value.")
        try:
            cap = float(logits_soft_cap)
        except (TypeError, ValueError):
            cap = float("nan")
        if not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"{name}: logits_soft_cap={logits_soft_cap!r} must be a finite "
                             "number > 0, or None.")
        logits_soft_cap = cap
    if key_value_seq_lengths is not None:
        shape, dtype = getattr(key_value_seq_lengths, "shape", None), getattr(
            key_value_seq_lengths, "dtype", None)
        if shape is None or tuple(shape) != (batch,) or not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"{name}: key_value_seq_lengths must be an int array of shape [B] = "
                             f"[{batch}], got shape {shape} and dtype {dtype}.")
    return dict(mask=mask, segment_ids=segment_ids, local_window_size=local_window_size,
                logits_soft_cap=logits_soft_cap, key_value_seq_lengths=key_value_seq_lengths)


def _implementation_with_probabilities(name, implementation):
    """``"reference"``, the one implementation that forms the probabilities (``T x T``), for
    ``implementation`` None or ``"reference"``; a one-line ValueError for any other."""
    if implementation is None or implementation == "reference":
        return "reference"
    raise ValueError(f"{name}: return_probabilities=True is computed by implementation='reference' "
                     f"only (T x T arrays); pass implementation=None or 'reference', not "
                     f"{implementation!r}.")


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


def _resolve_implementation(name, implementation, *, width=None, dtype=None, scale=None,
                            uses_alibi=False, beta=0.0, lengths=None, mask=None, segment_ids=None,
                            local_window_size=None, logits_soft_cap=None,
                            key_value_seq_lengths=None):
    """The implementation that runs this call: ``implementation`` itself if it can, else a
    one-line ValueError; for ``None`` or a sequence, the first that can run it."""
    if implementation is None:
        candidates, explicit = default_implementations(), False
    elif isinstance(implementation, (tuple, list)):
        if not implementation:
            raise ValueError(f"{name}: implementation=() is empty; name at least one of {IMPLEMENTATIONS}.")
        for choice in implementation:
            _check_choice(name, "implementation", choice, IMPLEMENTATIONS)
        candidates, explicit = tuple(implementation), len(implementation) == 1
    else:
        _check_choice(name, "implementation", implementation, IMPLEMENTATIONS)
        candidates, explicit = (implementation,), True
    unsupported = [option for option, used in (
        # The kernels take every other option of METHOD (7): local_window_size,
        # logits_soft_cap, key_value_seq_lengths, fewer queries than keys, a traced beta.
        ("ALiBi (alibi_slopes, runway_alibi_slope)", uses_alibi),
        ("mask", mask is not None),
        ("a traced scale", isinstance(scale, jax.core.Tracer)),
    ) if used]
    reasons = []
    for choice in candidates:
        reason = _why_not_runnable(choice, width=width, dtype=dtype, unsupported=unsupported)
        if reason is None:
            return choice
        reasons.append(reason)
    if explicit:
        raise ValueError(f"{name}: implementation={candidates[0]!r} cannot run this call: {reasons[0]}.")
    details = "; ".join(f"{choice!r}: {reason}" for choice, reason in zip(candidates, reasons))
    raise ValueError(f"{name}: none of implementation={tuple(candidates)!r} can run this call "
                     f"({details}).")


def _why_not_runnable(implementation, *, width, unsupported, dtype=None):
    """Why ``implementation`` cannot run a call, or ``None`` if it can."""
    if implementation not in kernels.IMPLEMENTATIONS:
        return None
    kernel, interpret = kernels.kernel_of(implementation)
    if unsupported:
        return (f"{', '.join(unsupported)} {'is' if len(unsupported) == 1 else 'are'} not "
                "supported by the pallas kernels; use implementation='xla'")
    if kernel == "pallas_gpu" and width is not None and width & (width - 1):
        return f"head width d={width} is not a power of two (Triton tiles); use implementation='xla'"
    mosaic_gpu = kernel == "pallas_mosaic_gpu"
    if mosaic_gpu and width is not None and width % 64:
        return (f"head width d={width} is not a multiple of 64 (WGMMA tiles); use "
                "implementation='pallas_gpu' or 'xla'")
    if interpret:
        return None
    backend = target_backend()
    needed = "tpu" if kernel == "pallas_tpu" else "gpu"
    if backend != needed:
        return (f"it needs a {needed.upper()} but JAX's default backend is {backend!r}; use "
                f"implementation={kernel + kernels.INTERPRET_SUFFIX!r} to run the kernel in "
                "interpret mode, or implementation='xla'")
    if mosaic_gpu and not _hopper_or_newer():
        return "it needs a Hopper or newer GPU (sm_90+); use implementation='pallas_gpu'"
    if mosaic_gpu and dtype is not None and jnp.dtype(dtype).itemsize != 2:
        return (f"{jnp.dtype(dtype).name} inputs would need tf32 WGMMA, which it lacks; pass "
                "bfloat16 or float16, or use implementation='pallas_gpu'")
    return None


def _segments_or_zeros(segment_ids, key):
    if segment_ids is None:
        return jnp.zeros(key.shape[:2], jnp.int32)
    return segment_ids
