"""Training: config, optimizer, sharded steps, Orbax checkpoints and the loop ``train_and_evaluate``.

``TrainConfig`` and the presets import no JAX; ``train_and_evaluate`` is imported on first use.
"""

from runway_jax.training.config import TRAIN_PRESETS, TrainConfig, train_preset

__all__ = ["TRAIN_PRESETS", "TrainConfig", "train_and_evaluate", "train_preset"]


def __getattr__(name):
    if name == "train_and_evaluate":
        from runway_jax.training.loop import train_and_evaluate

        return train_and_evaluate
    raise AttributeError(f"module 'runway_jax.training' has no attribute {name!r}")
