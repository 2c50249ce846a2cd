"""Fused Pallas kernels for rewired attention (METHOD (3c)), one file per target.

* :mod:`runway_jax.kernels.tpu` -- Mosaic TPU (``implementation="pallas_tpu"``).
* :mod:`runway_jax.kernels.gpu` -- Triton-lowered Pallas GPU (``implementation="pallas_gpu"``).
* :mod:`runway_jax.kernels.mosaic_gpu` and :mod:`runway_jax.kernels.mosaic_gpu_backward` --
  Mosaic GPU, Hopper and newer (``implementation="pallas_mosaic_gpu"``): 64-row WGMMA tiles,
  head width a multiple of 64, 16-bit inputs on hardware (float32 in the interpreter only).
* :mod:`runway_jax.kernels.reference` -- their pure-``jnp`` twin (same tiles, same order).
* What the targets share, one concept per file: :mod:`runway_jax.kernels.tiling` (block sizes,
  the plan of a call, which tiles run), :mod:`runway_jax.kernels.layouts` (token-major to padded
  head-major and back, gradient assembly), :mod:`runway_jax.kernels.tile_math` (the tile
  mathematics of METHOD (3b)-(3d)) and :mod:`runway_jax.kernels.cost_model`.
* :mod:`runway_jax.kernels.sharding` -- the ``shard_map`` wrapper for sharded ``jit``.

:func:`rewired_attention` here is the differentiable entry point (``jax.custom_vjp``) on the
public ``[B, T, H, d]`` layout; :func:`runway_jax.attention.rewired_attention` calls it after its
argument checks and implementation selection.

The options of METHOD (7) the kernels take: ``local_window_size`` (key blocks outside every row's
window are skipped by the grids and loops, not masked), ``logits_soft_cap`` (one tanh per logit
tile; the backward multiplies by ``1 - tanh^2``), fewer queries than keys (bottom-right aligned)
and per-row ``key_value_seq_lengths`` (a per-row offset: scalar prefetch on TPU, a row-position
array on GPU), integer segment ids, and a traced ``beta`` (a runtime scalar; the custom_vjp
returns its cotangent ``-sum rho sum_h dS~^h``).

Not supported (the selection falls back to ``"xla"`` or raises): a dense ``mask`` (a
``[B, Tq, Tk]`` operand per tile; nothing on accelerators needs it yet), the ALiBi options, which
are a project extension outside METHOD (adding ``-m (i - j)`` per tile would be cheap, but nothing
needs it on accelerators yet), a traced ``scale`` (it is baked into the kernels), and on GPU a
head width that is not a power of two (Triton tiles).

Backward pass: the Pallas backward kernels of METHOD (3d) of each target
(:func:`runway_jax.kernels.tpu.backward`, :func:`runway_jax.kernels.gpu.backward`,
:func:`runway_jax.kernels.mosaic_gpu_backward.backward`). Residuals are
the padded kernel-layout inputs, the output, the heads' and the runway head's log-sum-exp, ``u``
and ``beta`` (``O(T (H + 1) d)``, nothing ``T x T``).

Inputs with NaN or Inf are replaced by zeros before the kernels run and the output rows that can
see one (by the same visibility: causal, window, segment, length) are set to NaN afterwards
(:func:`runway_jax.masking.quarantine_nonfinite`): inside a
tile product a masked zero meets the masked value, and 0 * NaN would reach rows that cannot see
it, in the forward pass and in the backward pass.

This package imports only ``jax``/``numpy`` and :mod:`runway_jax.masking` (arrays in, arrays
out).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from runway_jax.kernels import gpu, layouts, mosaic_gpu, mosaic_gpu_backward, tiling, tpu
from runway_jax.kernels.tiling import BlockSizes
from runway_jax.masking import poison_rows, quarantine_nonfinite

KERNELS = ("pallas_tpu", "pallas_gpu", "pallas_mosaic_gpu")
# Each kernel also runs in Pallas interpret mode, on any backend (slow: for CPU tests). Interpret
# mode is part of the implementation's name, so one value (a model config's, a call's) says
# everything about how attention runs, and a jit cache keyed on it cannot run the wrong one.
INTERPRET_SUFFIX = "_interpret"
IMPLEMENTATIONS = KERNELS + tuple(kernel + INTERPRET_SUFFIX for kernel in KERNELS)


def kernel_of(implementation: str) -> tuple[str, bool]:
    """``(kernel, interpret)`` of a kernel implementation name: ``"pallas_tpu_interpret"`` is
    ``("pallas_tpu", True)``."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}.")
    kernel = implementation.removesuffix(INTERPRET_SUFFIX)
    return kernel, kernel != implementation


def default_block_sizes(implementation: str) -> BlockSizes:
    kernel, _ = kernel_of(implementation)
    return {"pallas_tpu": BlockSizes.tpu_default, "pallas_gpu": BlockSizes.gpu_default,
            "pallas_mosaic_gpu": BlockSizes.mosaic_gpu_default}[kernel]()


def min_block(implementation: str) -> int:
    """The smallest tile a kernel takes: 8 rows (TPU sublanes, Triton), 64 for Hopper's WGMMA."""
    return mosaic_gpu.MIN_BLOCK if kernel_of(implementation)[0] == "pallas_mosaic_gpu" else 8


def forward(*arrays, implementation, plan, beta, runway_coefficient, runway_span, scale,
            block_sizes, cap=None, runway=None):
    """Run one implementation's forward kernels on
    :class:`runway_jax.kernels.layouts.KernelInputs`: ``(out, lse, runway_lse, u)``."""
    kernel, interpret = kernel_of(implementation)
    options = dict(plan=plan, beta=beta, runway_coefficient=runway_coefficient,
                   runway_span=runway_span, scale=scale, cap=cap, runway=runway,
                   interpret=interpret)
    if kernel == "pallas_tpu":
        return tpu.forward(*arrays, **options)
    if kernel == "pallas_mosaic_gpu":
        return mosaic_gpu.forward(*arrays, heads_per_program=block_sizes.heads_per_program,
                                  **options)
    return gpu.forward(*arrays, block_sizes=block_sizes, **options)


def rewired_attention(query, key, value, runway_query, runway_key, *, implementation, beta,
                      runway_coefficient, runway_span, segment_ids, scale, local_window_size=None,
                      logits_soft_cap=None, key_value_seq_lengths=None, block_sizes=None):
    """METHOD eq. (3) with the options of (7) by the fused kernels of ``implementation`` (one of
    :data:`IMPLEMENTATIONS`); shapes as the public function (``query`` ``[B, Tq, H, d]``, the
    last ``Tq <= Tk`` positions).

    ``beta`` may be a Python number or a traced scalar (differentiable: ``d s~ / d beta = -rho``).
    ``beta`` the Python number 0 skips the runway head entirely (standard causal attention,
    invariant 1), which is also how :func:`causal_attention` runs on the kernels.
    """
    name = "rewired_attention"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{name}: implementation={implementation!r} is not one of "
                         f"{IMPLEMENTATIONS}.")
    block_sizes = block_sizes or default_block_sizes(implementation)
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"{name}: block_sizes={block_sizes!r} must be a BlockSizes.")
    if local_window_size is not None and (isinstance(local_window_size, bool) or not isinstance(
            local_window_size, int) or local_window_size < 0):
        raise ValueError(f"{name}: local_window_size={local_window_size!r} must be an int >= 0 "
                         "or None.")
    if logits_soft_cap is not None and not (isinstance(logits_soft_cap, (int, float))
                                            and logits_soft_cap > 0):
        raise ValueError(f"{name}: logits_soft_cap={logits_soft_cap!r} must be a Python number "
                         "> 0 or None.")
    if jnp.shape(beta) != ():
        raise ValueError(f"{name}: beta must be a scalar, got shape {jnp.shape(beta)}.")
    width = query.shape[-1]
    runway = tiling.runs_runway_head(beta)
    options = _Options(implementation=implementation, runway=runway,
                       runway_coefficient=runway_coefficient, runway_span=runway_span,
                       scale=tiling.scale_as_float(scale, width), window=local_window_size,
                       cap=None if logits_soft_cap is None else float(logits_soft_cap),
                       block_sizes=block_sizes)
    if segment_ids is None:
        segment_ids = jnp.zeros(key.shape[:2], jnp.int32)
    # The tiles' products would carry a NaN past the masks (0 * NaN): quarantine them here, out
    # of the custom_vjp, so the kernels and their backward see finite inputs only.
    inputs, poisoned = quarantine_nonfinite(
        query, key, value, runway_query, runway_key, segment_ids=segment_ids,
        runway_reaches_output=jnp.asarray(beta) != 0 if runway else False,
        local_window_size=local_window_size, key_value_seq_lengths=key_value_seq_lengths)
    beta = jnp.asarray(beta, jnp.float32)  # a runtime scalar of the kernels (SMEM on TPU)
    return poison_rows(_fused(options, *inputs, beta, segment_ids, key_value_seq_lengths),
                       poisoned)


def causal_attention(query, key, value, *, implementation, segment_ids, scale,
                     local_window_size=None, logits_soft_cap=None, key_value_seq_lengths=None,
                     block_sizes=None):
    """Standard causal attention on the same kernels (``beta = 0``: no runway work at all)."""
    runway = jnp.zeros(key.shape[:2] + key.shape[3:], query.dtype)
    return rewired_attention(query, key, value, runway, runway, implementation=implementation,
                             beta=0.0,
                             runway_coefficient="bilinear", runway_span="prefix",
                             segment_ids=segment_ids, scale=scale,
                             local_window_size=local_window_size,
                             logits_soft_cap=logits_soft_cap,
                             key_value_seq_lengths=key_value_seq_lengths,
                             block_sizes=block_sizes)


@dataclasses.dataclass(frozen=True)
class _Options:
    """The static options of one call (hashable: the ``nondiff_argnums`` of the custom_vjp)."""

    implementation: str
    runway: bool
    runway_coefficient: str
    runway_span: str
    scale: float
    window: int | None
    cap: float | None
    block_sizes: BlockSizes

    def plan(self, query, key, key_value_seq_lengths):
        return tiling.plan(query.shape[1], self.block_sizes, key_length=key.shape[1],
                           window=self.window, ragged=key_value_seq_lengths is not None,
                           min_block=min_block(self.implementation))

    def kernel_options(self, plan):
        """Keywords of the target files' ``forward``/``backward`` (:mod:`tpu`, :mod:`gpu`)."""
        _, interpret = kernel_of(self.implementation)
        return dict(plan=plan, runway_coefficient=self.runway_coefficient,
                    runway_span=self.runway_span, scale=self.scale, cap=self.cap,
                    runway=self.runway, interpret=interpret)


def _run_forward(options, query, key, value, runway_query, runway_key, beta, segment_ids,
                 key_value_seq_lengths):
    """Forward kernels on the public layout: ``(out [B, Tq, H, d], residuals in kernel
    layout)``."""
    plan = options.plan(query, key, key_value_seq_lengths)
    arrays = layouts.to_kernel_layout(query, key, value, runway_query, runway_key, segment_ids,
                                      plan, key_value_seq_lengths)
    out, lse, runway_lse, summary = forward(
        *arrays, implementation=options.implementation, plan=plan, beta=beta,
        runway_coefficient=options.runway_coefficient, runway_span=options.runway_span,
        scale=options.scale, block_sizes=options.block_sizes, cap=options.cap,
        runway=options.runway)
    return (layouts.from_kernel_layout(out, query.shape[1]),
            (*arrays, out, lse, runway_lse, summary, beta))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(options, query, key, value, runway_query, runway_key, beta, segment_ids,
           key_value_seq_lengths):
    return _run_forward(options, query, key, value, runway_query, runway_key, beta, segment_ids,
                        key_value_seq_lengths)[0]


def _fused_forward(options, query, key, value, runway_query, runway_key, beta, segment_ids,
                   key_value_seq_lengths):
    out, kernel_residuals = _run_forward(options, query, key, value, runway_query, runway_key,
                                         beta, segment_ids, key_value_seq_lengths)
    shapes = (jax.ShapeDtypeStruct(query.shape, query.dtype),
              jax.ShapeDtypeStruct(key.shape, key.dtype),
              jax.ShapeDtypeStruct(runway_query.shape, runway_query.dtype))
    # The lengths ride along (None or an array) so that the backward plan knows them.
    return out, (kernel_residuals, shapes, key_value_seq_lengths)


def _fused_backward(options, residuals, cotangent):
    """The backward kernels of METHOD (3d) of the target (``tpu.backward`` / ``gpu.backward``);
    cotangents for the five arrays and ``beta``."""
    kernel_residuals, (query, key, runway_query), key_value_seq_lengths = residuals
    *kernel_residuals, beta = kernel_residuals
    plan = options.plan(query, key, key_value_seq_lengths)
    out_grad = jnp.swapaxes(layouts.pad_length(cotangent, plan.padded_query_length), 1, 2)
    backward_options = dict(options.kernel_options(plan), beta=beta)
    kernel = kernel_of(options.implementation)[0]
    if kernel == "pallas_tpu":
        grads = tpu.backward(*kernel_residuals, out_grad, **backward_options)
    elif kernel == "pallas_mosaic_gpu":
        grads = mosaic_gpu_backward.backward(
            *kernel_residuals, out_grad, heads_per_program=options.block_sizes.heads_per_program,
            **backward_options)
    else:
        grads = gpu.backward(*kernel_residuals, out_grad, block_sizes=options.block_sizes,
                             **backward_options)
    dq, dk, dv, d_runway_query, d_runway_key, d_beta = grads
    query_length, key_length = query.shape[1], key.shape[1]
    runway_layout = lambda g: g[:, :key_length].astype(runway_query.dtype)
    return (layouts.from_kernel_layout(dq, query_length).astype(query.dtype),
            layouts.from_kernel_layout(dk, key_length).astype(key.dtype),
            layouts.from_kernel_layout(dv, key_length).astype(key.dtype),
            runway_layout(d_runway_query), runway_layout(d_runway_key),
            d_beta.astype(jnp.float32), None, None)


_fused.defvjp(_fused_forward, _fused_backward)
