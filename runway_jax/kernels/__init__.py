"""Fused Pallas kernels for rewired attention (METHOD (3c)), one file per target.

* :mod:`runway_jax.kernels.tpu` -- Mosaic TPU (``implementation="pallas_tpu"``).
* :mod:`runway_jax.kernels.gpu` -- Triton-lowered Pallas GPU (``implementation="pallas_gpu"``).
* :mod:`runway_jax.kernels.reference` -- their pure-``jnp`` twin (same tiles, same order).
* :mod:`runway_jax.kernels.common` -- block sizes, layout, tile mathematics, cost model.
* :mod:`runway_jax.kernels.sharding` -- the ``shard_map`` wrapper for sharded ``jit``.

:func:`rewired_attention` here is the differentiable entry point (``jax.custom_vjp``) on the
public ``[B, T, H, d]`` layout; :func:`runway_jax.attention.rewired_attention` calls it after its
argument checks and implementation selection.

Not supported (the selection falls back to ``"xla"`` or raises): the ALiBi options, which are a
project extension outside METHOD (adding ``-m (i - j)`` per tile would be cheap, but nothing needs
it on accelerators yet), a traced ``scale`` (it is baked into the kernels), and on GPU a head width
that is not a power of two (Triton tiles).

Backward pass: the Pallas backward kernels of METHOD (3d) of each target
(:func:`runway_jax.kernels.tpu.backward`, :func:`runway_jax.kernels.gpu.backward`). Residuals are
the padded kernel-layout inputs, the output, the heads' and the runway head's log-sum-exp and
``u`` (``O(T (H + 1) d)``, nothing ``T x T``).

Inputs with NaN or Inf are replaced by zeros before the kernels run and the output rows that can
see one are set to NaN afterwards (:func:`runway_jax.masking.quarantine_nonfinite`): inside a
tile product a masked zero meets the masked value, and 0 * NaN would reach rows that cannot see
it, in the forward pass and in the backward pass.

This package imports only ``jax``/``numpy`` and :mod:`runway_jax.masking` (arrays in, arrays
out).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp

from runway_jax.kernels import common, gpu, tpu
from runway_jax.kernels.common import BlockSizes
from runway_jax.masking import poison_rows, quarantine_nonfinite

TARGETS = ("pallas_tpu", "pallas_gpu")

_FORCED_INTERPRET = contextvars.ContextVar("runway_jax_kernels_interpret", default=False)


@contextlib.contextmanager
def interpret_mode():
    """Within this context every kernel call runs in Pallas interpret mode, as if called with
    ``interpret=True`` (and the implementation selection treats the kernels as runnable on CPU).
    For CPU tests of code that does not expose ``interpret``, e.g. a model configured with
    ``attention_implementation="pallas_tpu"`` inside the training loop."""
    token = _FORCED_INTERPRET.set(True)
    try:
        yield
    finally:
        _FORCED_INTERPRET.reset(token)


def interpret_forced() -> bool:
    return _FORCED_INTERPRET.get()


def default_block_sizes(target: str) -> BlockSizes:
    return BlockSizes.tpu_default() if target == "pallas_tpu" else BlockSizes.gpu_default()


def forward(query, key, value, runway_query, runway_key, segment_ids, *, target, plan, beta,
            coefficient, span, scale, block_sizes, interpret):
    """Run one target's forward kernels on kernel-layout arrays: ``(out, lse, runway_lse, u)``."""
    options = dict(plan=plan, beta=beta, coefficient=coefficient, span=span, scale=scale,
                   interpret=interpret)
    if target == "pallas_tpu":
        return tpu.forward(query, key, value, runway_query, runway_key, segment_ids, **options)
    return gpu.forward(query, key, value, runway_query, runway_key, segment_ids,
                       block_sizes=block_sizes, **options)


def rewired_attention(query, key, value, runway_query, runway_key, *, target, beta,
                      runway_coefficient, runway_span, segment_ids, scale, block_sizes=None,
                      interpret=False):
    """METHOD eq. (3) by the fused kernels of ``target``; shapes as the public function.

    ``beta == 0`` skips the runway head entirely (standard causal attention, invariant 1), which
    is also how :func:`causal_attention` runs on the kernels.
    """
    if target not in TARGETS:
        raise ValueError(f"rewired_attention: target={target!r} is not one of {TARGETS}.")
    block_sizes = block_sizes or default_block_sizes(target)
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"rewired_attention: block_sizes={block_sizes!r} must be a BlockSizes.")
    width = query.shape[-1]
    options = _Options(target=target, beta=float(beta), coefficient=runway_coefficient,
                       span=runway_span, scale=common.scale_as_float(scale, width),
                       block_sizes=block_sizes, interpret=bool(interpret) or interpret_forced())
    if segment_ids is None:
        segment_ids = jnp.zeros(query.shape[:2], jnp.int32)
    # The tiles' products would carry a NaN past the masks (0 * NaN): quarantine them here, out
    # of the custom_vjp, so the kernels and their backward see finite inputs only.
    inputs, poisoned = quarantine_nonfinite(query, key, value, runway_query, runway_key,
                                            segment_ids=segment_ids,
                                            runway_reaches_output=options.beta != 0)
    return poison_rows(_fused(options, *inputs, segment_ids), poisoned)


def causal_attention(query, key, value, *, target, segment_ids, scale, block_sizes=None,
                     interpret=False):
    """Standard causal attention on the same kernels (``beta = 0``: no runway work at all)."""
    runway = jnp.zeros(query.shape[:2] + query.shape[3:], query.dtype)
    return rewired_attention(query, key, value, runway, runway, target=target, beta=0.0,
                             runway_coefficient="bilinear", runway_span="prefix",
                             segment_ids=segment_ids, scale=scale, block_sizes=block_sizes,
                             interpret=interpret)


@dataclasses.dataclass(frozen=True)
class _Options:
    """The static options of one call (hashable: the ``nondiff_argnums`` of the custom_vjp)."""

    target: str
    beta: float
    coefficient: str
    span: str
    scale: float
    block_sizes: BlockSizes
    interpret: bool


def _run_forward(options, query, key, value, runway_query, runway_key, segment_ids):
    """Forward kernels on the public layout: ``(out [B, T, H, d], residuals in kernel layout)``."""
    length = query.shape[1]
    plan = common.plan(length, options.block_sizes)
    arrays = common.to_kernel_layout(query, key, value, runway_query, runway_key, segment_ids,
                                     plan)
    out, lse, runway_lse, summary = forward(
        *arrays, target=options.target, plan=plan, beta=options.beta,
        coefficient=options.coefficient, span=options.span, scale=options.scale,
        block_sizes=options.block_sizes, interpret=options.interpret)
    return common.from_kernel_layout(out, length), (*arrays, out, lse, runway_lse, summary)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(options, query, key, value, runway_query, runway_key, segment_ids):
    return _run_forward(options, query, key, value, runway_query, runway_key, segment_ids)[0]


def _fused_forward(options, query, key, value, runway_query, runway_key, segment_ids):
    out, kernel_residuals = _run_forward(options, query, key, value, runway_query, runway_key,
                                         segment_ids)
    return out, (kernel_residuals, _dtypes(query, runway_query))


def _dtypes(query, runway_query):
    return jax.ShapeDtypeStruct(query.shape, query.dtype), jax.ShapeDtypeStruct(
        runway_query.shape, runway_query.dtype)


def _fused_backward(options, residuals, cotangent):
    """The backward kernels of METHOD (3d) of the target (``tpu.backward`` / ``gpu.backward``)."""
    kernel_residuals, (query, runway_query) = residuals
    length = query.shape[1]
    plan = common.plan(length, options.block_sizes)
    out_grad = jnp.swapaxes(common.pad_length(cotangent, plan.padded_length), 1, 2)
    backward_options = dict(plan=plan, beta=options.beta, coefficient=options.coefficient,
                            span=options.span, scale=options.scale, interpret=options.interpret)
    if options.target == "pallas_tpu":
        grads = tpu.backward(*kernel_residuals, out_grad, **backward_options)
    else:
        grads = gpu.backward(*kernel_residuals, out_grad, block_sizes=options.block_sizes,
                             **backward_options)
    dq, dk, dv, d_runway_query, d_runway_key = grads
    heads_layout = lambda g: common.from_kernel_layout(g, length).astype(query.dtype)
    runway_layout = lambda g: g[:, :length].astype(runway_query.dtype)
    return (heads_layout(dq), heads_layout(dk), heads_layout(dv), runway_layout(d_runway_query),
            runway_layout(d_runway_key), None)


_fused.defvjp(_fused_forward, _fused_backward)
