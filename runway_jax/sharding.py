"""Logical-axis sharding of model parameters.

Every parameter carries ``logical_axes`` metadata (e.g. ``("embed", "heads", "head_dim")``);
rules map logical names to mesh axes. A dimension that a mesh axis does not divide is replicated
instead, so the same rules serve rewired layers, whose value and output projections have one head
fewer than their query projection.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Fully-sharded data parallel over "fsdp" and tensor parallel over heads and MLP on "model".
DEFAULT_RULES = {
    "vocab": "model",
    "embed": "fsdp",
    "heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
}


def partition_spec(logical_axes, shape, mesh: Mesh, rules=DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec of one array from its logical axis names."""
    spec = []
    for name, size in zip(logical_axes, shape):
        mesh_axis = rules.get(name)
        if mesh_axis is not None and (mesh_axis not in mesh.shape or size % mesh.shape[mesh_axis]):
            mesh_axis = None
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for an ``nnx.State`` (e.g. ``nnx.state(model)``), from ``logical_axes``."""

    def sharding(variable):
        axes = variable.get_metadata().get("logical_axes")
        spec = PartitionSpec() if axes is None else partition_spec(axes, variable.shape, mesh, rules)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
