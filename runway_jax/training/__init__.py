"""Training: config, optimizer, sharded steps, Orbax checkpoints and the loop ``train_and_evaluate``."""

from runway_jax.training.config import TRAIN_PRESETS, TrainConfig, train_preset
from runway_jax.training.loop import train_and_evaluate

__all__ = ["TRAIN_PRESETS", "TrainConfig", "train_and_evaluate", "train_preset"]
