"""``TrainConfig``: the model, the data and how to train, validated once at start-up; presets."""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Optional

from runway_jax.config import ModelConfig, model_preset
from runway_jax.data import DataConfig


class ConfigError(ValueError):
    """A bad configuration value; the message names the field, the value and what is allowed."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig(seq_len=128, batch_size=16)
    steps: int = 300
    """Optimizer steps to train for; a resumed run continues to this total."""
    seed: int = 0
    """Seed of the parameter initialization."""
    lr: float = 3e-3
    """Peak learning rate of AdamW, > 0."""
    warmup_steps: int = 30
    """Steps of linear warmup from 0 to lr."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr * min_lr_ratio."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norm scales)."""
    b1: float = 0.9
    """AdamW beta1, in [0, 1)."""
    b2: float = 0.95
    """AdamW beta2, in [0, 1)."""
    grad_clip: float = 1.0
    """Global-norm gradient clipping; 0 disables."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (batch_size must divide by it)."""
    z_loss: float = 0.0
    """Weight of the log(Z)^2 auxiliary loss; 0 disables."""
    log_every: int = 20
    """Steps between training-loss lines (and metrics.jsonl records)."""
    eval_every: int = 100
    """Steps between validations (and always at the last step)."""
    eval_batches: int = 10
    """Validation batches per validation."""
    checkpoint_every: int = 100
    """Steps between checkpoints (and always at the last step)."""
    keep_checkpoints: int = 3
    """Most recent checkpoints kept on disk."""
    milestones: tuple[int, ...] = ()
    """Steps whose checkpoints are kept forever."""
    mesh_data: int = -1
    """Devices on the data-parallel axis; -1: all devices not used by the other axes."""
    mesh_fsdp: int = 1
    """Devices the parameters (and the batch) are sharded over (FSDP)."""
    mesh_model: int = 1
    """Devices for tensor parallelism over heads and the MLP."""
    peak_flops_per_device: Optional[float] = None
    """Peak FLOP/s of one device, for the MFU; None: known GPU/TPU kinds, else no MFU."""
    distributed: bool = False
    """Call jax.distributed.initialize (automatic on a detected pod)."""
    coordinator_address: Optional[str] = None
    """host:port of process 0 for a multi-process run; None: from the cluster."""
    num_processes: Optional[int] = None
    """Processes of a multi-process run; None: from the cluster."""
    process_id: Optional[int] = None
    """This process's index in a multi-process run; None: from the cluster."""

    def __post_init__(self):
        positive = ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                    "keep_checkpoints", "grad_accum_steps", "mesh_fsdp", "mesh_model")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{name}={value!r} must be a positive integer.")
        for name in ("lr", "weight_decay", "grad_clip", "z_loss", "min_lr_ratio", "warmup_steps",
                     "b1", "b2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"--{name}={value!r} must be a finite number.")
            if value < 0:
                raise ConfigError(f"--{name}={value!r} must be >= 0.")
        if not self.lr > 0:
            raise ConfigError(f"--lr={self.lr!r} must be > 0 (the peak learning rate).")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool):
            raise ConfigError(f"--warmup_steps={self.warmup_steps!r} must be an integer >= 0.")
        if self.peak_flops_per_device is not None and not 0 < self.peak_flops_per_device < math.inf:
            raise ConfigError(f"--peak_flops_per_device={self.peak_flops_per_device!r} must be a "
                              "positive finite number or None.")
        bad_milestones = [m for m in self.milestones if not isinstance(m, int) or m < 1]
        if bad_milestones:
            raise ConfigError(f"--milestones={self.milestones!r} must be positive step numbers.")
        if not 0 <= self.b1 < 1 or not 0 <= self.b2 < 1:
            raise ConfigError(f"--b1={self.b1} and --b2={self.b2} must be in [0, 1).")
        if self.mesh_data == 0 or self.mesh_data < -1:
            raise ConfigError(f"--mesh_data={self.mesh_data} must be positive or -1 (all remaining devices).")
        if self.data.batch_size % self.grad_accum_steps:
            raise ConfigError(f"--batch_size={self.data.batch_size} must be divisible by "
                              f"--grad_accum_steps={self.grad_accum_steps}.")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _preset(model: str, **fields) -> TrainConfig:
    return TrainConfig(model=model_preset(model), **fields)


TRAIN_PRESETS = {
    # Seconds on a CPU: smoke tests.
    "tiny": _preset("tiny", steps=40, data=DataConfig(seq_len=64, batch_size=8), log_every=10,
                    eval_every=20, eval_batches=2, checkpoint_every=20, warmup_steps=5),
    # The default: a few minutes on a laptop CPU on the embedded corpus.
    "default": _preset("tiny", steps=300, data=DataConfig(seq_len=128, batch_size=16)),
    # ~10M parameters, CPU-scale studies.
    "small": _preset("small", steps=2000, lr=1e-3, warmup_steps=100,
                     data=DataConfig(seq_len=256, batch_size=32), eval_every=250, checkpoint_every=250),
    # The paper's scale, for accelerators; point --source at your corpus.
    "gpt2-small": _preset("gpt2-small", steps=100_000, lr=6e-4, warmup_steps=2000,
                          data=DataConfig(seq_len=1024, batch_size=256, tokenizer="bpe",
                                          bpe_vocab_size=50_304), eval_every=2000,
                          checkpoint_every=2000, z_loss=1e-4),
    "1b": _preset("1b", steps=200_000, lr=3e-4, warmup_steps=2000,
                  data=DataConfig(seq_len=2048, batch_size=512, tokenizer="bpe", bpe_vocab_size=50_304),
                  eval_every=2000, checkpoint_every=1000, z_loss=1e-4, mesh_fsdp=8),
}


def train_preset(name: str) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        close = difflib.get_close_matches(name, TRAIN_PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"--preset={name!r} is unknown{hint}; choose one of {sorted(TRAIN_PRESETS)}.")
    return TRAIN_PRESETS[name]
