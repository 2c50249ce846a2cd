"""Multi-host start-up: ``jax.distributed.initialize`` on request or when a pod is detected."""

from __future__ import annotations

import os

from runway_jax.training.config import TrainConfig

# Environment variables that mean "this process is one host of several".
POD_VARIABLES = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


def pod_detected(environ=os.environ) -> bool:
    hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
    return ("," in hosts or any(name in environ for name in POD_VARIABLES[1:])
            or int(environ.get("SLURM_NTASKS", "1")) > 1)


def initialize_distributed(config: TrainConfig) -> bool:
    """Join the other processes (before any other JAX call); returns whether it did."""
    if not (config.distributed or pod_detected()):
        return False
    import jax

    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        # CPU hosts need a collectives implementation to talk to each other.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=config.coordinator_address,
                               num_processes=config.num_processes, process_id=config.process_id)
    return True
