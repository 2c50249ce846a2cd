"""Run the fused kernels inside a sharded ``jit``: a ``shard_map`` over the context mesh.

XLA's SPMD partitioner cannot split a Pallas custom call, so inside a sharded ``jit`` it would
gather the whole batch onto every device before the kernel. Wrapped in ``shard_map`` the kernel
instead runs on each device's own slice: the batch is split over the mesh's data-parallel axes and
the heads over its model axis (when that axis divides both the query heads and the key/value
heads). Attention is independent across batch rows and across key/value head groups, so no
communication is needed. Mesh axes used for neither stay replicated (each device computes its
slice redundantly, as the rest of a tensor-parallel layer does).

The mesh is the one set by ``jax.set_mesh`` (as ``runway_jax.training.loop`` does around its
sharded ``jit``); without one, or on a single device, the kernel is called directly.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
HEAD_AXES = ("model",)


def context_mesh():
    """The abstract mesh of the enclosing ``jax.set_mesh``, or ``None``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    return mesh


def partition(mesh, batch, heads, kv_heads, batch_axes=BATCH_AXES, head_axes=HEAD_AXES):
    """``(batch_spec, head_spec)``: the mesh axes the batch and the heads are split over.

    Axes absent from the mesh, of size 1, or not dividing the dimension are left out.
    """
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch_spec, product = [], 1
    for axis in batch_axes:
        if sizes.get(axis, 1) > 1 and batch % (product * sizes[axis]) == 0:
            batch_spec.append(axis)
            product *= sizes[axis]
    head_spec = [axis for axis in head_axes
                 if sizes.get(axis, 1) > 1 and heads % sizes[axis] == 0
                 and kv_heads % sizes[axis] == 0][:1]
    as_spec = lambda axes: None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))
    return as_spec(batch_spec), as_spec(head_spec)


def call_sharded(fn, query, key, value, runway_query, runway_key, segment_ids, *,
                 key_value_seq_lengths=None, beta=None):
    """``fn(query, key, value, runway_query, runway_key, segment_ids, key_value_seq_lengths,
    beta)`` per device slice.

    ``fn`` must treat batch rows and key/value head groups independently (attention does).
    ``key_value_seq_lengths`` (``[B]`` or None) is split with the batch; ``beta`` (a Python number,
    or a traced scalar that every device gets whole) is passed through.
    """
    mesh = context_mesh()
    if mesh is None:
        return fn(query, key, value, runway_query, runway_key, segment_ids, key_value_seq_lengths,
                  beta)
    batch_spec, head_spec = partition(mesh, query.shape[0], query.shape[2], key.shape[2])
    if batch_spec is None and head_spec is None:
        return fn(query, key, value, runway_query, runway_key, segment_ids, key_value_seq_lengths,
                  beta)
    heads_spec = P(batch_spec, None, head_spec, None)  # [B, T, H or K, d]
    runway_spec = P(batch_spec, None, None)  # [B, T, d]
    # Optional operands travel as arguments only when they are arrays (a Python beta stays a
    # constant of fn, so that beta = 0 still skips the runway head).
    extras, extra_specs = {}, {}
    if key_value_seq_lengths is not None:
        extras["lengths"], extra_specs["lengths"] = key_value_seq_lengths, P(batch_spec)
    if beta is not None and not isinstance(beta, (int, float)):
        extras["beta"], extra_specs["beta"] = beta, P()

    def per_device(q, k, v, rq, rk, s, extra):
        return fn(q, k, v, rq, rk, s, extra.get("lengths"), extra.get("beta", beta))

    sharded = jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(heads_spec, heads_spec, heads_spec, runway_spec, runway_spec,
                  P(batch_spec, None), extra_specs),
        out_specs=heads_spec,
        # Inputs are replicated over the unused mesh axes, so every replica computes the same
        # output; the kernels are opaque to the replication checker.
        check_vma=False)
    return sharded(query, key, value, runway_query, runway_key, segment_ids, extras)


def devices_used(mesh, batch, heads, kv_heads) -> int:
    """How many distinct slices the wrapper makes (for tests and logs)."""
    batch_spec, head_spec = partition(mesh, batch, heads, kv_heads)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    axes = [a for spec in (batch_spec, head_spec) if spec is not None
            for a in (spec if isinstance(spec, tuple) else (spec,))]
    return math.prod(sizes[a] for a in axes)
