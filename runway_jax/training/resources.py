"""Memory and disk a run needs, estimated from the config before anything is allocated, so that
a model too large for the machine is a one-line error instead of an allocator abort.

Training holds, per parameter, the parameter, its gradient and AdamW's two moments (optax keeps
them in the parameters' dtype): ``4 x itemsize`` bytes; a checkpoint stores all but the gradient.
Activations are not counted (they depend on the batch and are usually smaller at small scale), so
the check catches what can never fit, not every run that will not.
"""

from __future__ import annotations

import numpy as np

from runway_jax.training.config import TrainConfig
from runway_jax.training.workdir import WorkdirError, format_bytes, host_memory_bytes

COPIES_IN_TRAINING = 4  # parameters, gradients, AdamW first and second moments
COPIES_IN_CHECKPOINT = 3  # parameters and both moments


def _parameter_bytes(config: TrainConfig) -> int:
    from runway_jax.config import DTYPES
    from runway_jax.model import count_parameters

    return count_parameters(config.model) * np.dtype(DTYPES[config.model.param_dtype]).itemsize


def checkpoint_bytes(config: TrainConfig) -> int:
    """Bytes of one checkpoint of ``config`` (parameters and AdamW state)."""
    return COPIES_IN_CHECKPOINT * _parameter_bytes(config)


def check_memory(config: TrainConfig, mesh) -> int:
    """Fail unless every device can hold its share of the parameters and optimizer state; returns
    the bytes per device. Host memory for CPU devices (they share it), else ``memory_stats()``."""
    from runway_jax.model import count_parameters

    total = COPIES_IN_TRAINING * _parameter_bytes(config)
    shards = config.mesh_fsdp * config.mesh_model  # the data axis holds full copies
    per_device = total // shards
    devices = list(mesh.devices.flat)
    if devices[0].platform == "cpu":
        needed, available, where = per_device * len(devices), host_memory_bytes(), "of host memory"
    else:
        stats = [getattr(device, "memory_stats", lambda: None)() or {} for device in devices]
        free = [s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats if "bytes_limit" in s]
        needed, available = per_device, (min(free) if free else None)
        where = f"on each {devices[0].platform} device"
    if available is not None and needed > available:
        raise WorkdirError(
            f"the model's {count_parameters(config.model):,} parameters and AdamW state need "
            f"{format_bytes(needed)}, you have {format_bytes(available)} {where}; lower --vocab_size, --features "
            "or --num_layers, or shard the parameters with --mesh_fsdp.")
    return per_device
