"""AdamW with linear warmup and cosine decay, global-norm clipping (optax)."""

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

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


def optimizer_state_shardings(optimizer: optax.GradientTransformation, params, mesh):
    """Shardings of ``optimizer.init(params)``: every copy of the parameter tree in it (Adam's
    moments) sharded as the parameters are (so FSDP shards the optimizer state too), everything
    else (counts) replicated over ``mesh``. ``params`` may be arrays or ``ShapeDtypeStruct``s.

    ``jax.jit(optimizer.init)(params)`` alone does not do this: the zeros it returns do not depend
    on the parameters' values, so XLA is free to place them on one device."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(optimizer, lambda _, p: p.sharding, jax.eval_shape(optimizer.init, params),
                                 params, transform_non_params=lambda _: replicated)
