"""The loss and the jitted training and evaluation steps, over pure parameter dicts.

Parameters travel as the plain nested dict of arrays that ``nnx.to_pure_dict`` gives (float32),
so optax and Orbax see ordinary pytrees; the model is rebuilt from its graph definition inside
the step. Compute runs in ``ModelConfig.dtype`` (bfloat16 for mixed precision).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def bind(graphdef, abstract_state, params):
    """The model with ``params`` (a pure dict) in place of its parameters."""
    state = jax.tree.map(lambda x: x, abstract_state)  # a fresh copy to fill
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def loss_and_metrics(params, batch, graphdef, abstract_state, z_loss):
    """Mean next-token cross entropy over ``loss_mask`` (+ optional z-loss)."""
    model = bind(graphdef, abstract_state, params)
    logits = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    mask = batch["loss_mask"]
    tokens = jnp.maximum(mask.sum(), 1.0)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    loss = (cross_entropy * mask).sum() / tokens
    total = loss
    if z_loss:
        log_z = jax.nn.logsumexp(logits, axis=-1)
        total = total + z_loss * (jnp.square(log_z) * mask).sum() / tokens
    return total, {"loss": loss, "tokens": mask.sum()}


def train_step(params, opt_state, step, batch, *, graphdef, abstract_state, optimizer, z_loss,
               grad_accum_steps):
    """One optimizer step on a (global) batch, accumulating over ``grad_accum_steps`` slices.

    Returns ``(params, opt_state, step + 1, metrics)``; the step counter is advanced on device so
    that it stays a proper global array on multi-host meshes."""
    grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)

    def micro(batch_part):
        (_, metrics), grads = grad_fn(params, batch_part, graphdef, abstract_state, z_loss)
        return grads, metrics

    if grad_accum_steps == 1:
        grads, metrics = micro(batch)
    else:
        parts = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

        def accumulate(total, part):
            grads, metrics = micro(part)
            return jax.tree.map(jnp.add, total, (grads, metrics)), None

        zeros = jax.tree.map(jnp.zeros_like, (params, {"loss": jnp.float32(0), "tokens": jnp.float32(0)}))
        (grads, metrics), _ = jax.lax.scan(accumulate, zeros, parts)
        grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
        metrics = {"loss": metrics["loss"] / grad_accum_steps, "tokens": metrics["tokens"]}
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return params, opt_state, step + 1, metrics


def eval_step(params, batch, *, graphdef, abstract_state):
    _, metrics = loss_and_metrics(params, batch, graphdef, abstract_state, 0.0)
    return metrics
