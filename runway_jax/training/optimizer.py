"""AdamW with linear warmup and cosine decay, global-norm clipping (optax)."""

import jax
import optax

from runway_jax.training.config import TrainConfig


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    warmup = min(config.warmup_steps, config.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
        decay_steps=max(config.steps, warmup + 1), end_value=config.lr * config.min_lr_ratio)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                        weight_decay=config.weight_decay,
                        # No decay on norm scales (1-D parameters).
                        mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params))
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw
