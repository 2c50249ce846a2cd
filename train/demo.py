"""Train a tiny rewired language model on generated data on the CPU and print its loss falling.

    python train/demo.py [--steps=200] [--baseline]

The data is a fixed random Markov chain over 64 tokens in which every token has 4 likely
successors, so the loss can fall from ln(vocab) to about ln(4) = 1.39. This is a smoke test of
the library; ``train/main.py`` (the real training program) replaces it as the main job.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from runway_jax import TransformerLM, count_parameters, model_preset

VOCAB, SUCCESSORS = 64, 4


def markov_batches(seed, batch_size, length):
    """An endless stream of ``[batch_size, length]`` token arrays from one random Markov chain."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, VOCAB, size=(VOCAB, SUCCESSORS))
    while True:
        tokens = np.empty((batch_size, length), np.int32)
        tokens[:, 0] = rng.integers(0, VOCAB, batch_size)
        for t in range(1, length):
            choice = rng.integers(0, SUCCESSORS, batch_size)
            tokens[:, t] = successors[tokens[:, t - 1], choice]
        yield jnp.asarray(tokens)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--baseline", action="store_true", help="standard attention (rewire=False)")
    args = parser.parse_args()
    if min(args.steps, args.batch_size) < 1 or args.seq_len < 2:
        parser.error("--steps and --batch_size must be >= 1 and --seq_len >= 2")

    config = model_preset("tiny", vocab_size=VOCAB, rewire=not args.baseline)
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
    kind = "rewired" if config.rewire else "baseline"
    print(f"{kind} tiny model, {count_parameters(config):,} parameters, backend {jax.default_backend()}")

    @nnx.jit
    def train_step(model, optimizer, tokens):
        def loss_fn(model):
            logits = model(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    batches = markov_batches(0, args.batch_size, args.seq_len + 1)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = train_step(model, optimizer, next(batches))
        if step == 1 or step % 20 == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            rate = step * args.batch_size * args.seq_len / elapsed
            eta = elapsed / step * (args.steps - step)
            print(f"step {step:4d}  loss {float(loss):.3f}  {rate:,.0f} tokens/s  eta {eta:.0f}s",
                  flush=True)
    print(f"final loss {float(loss):.3f} (start ln({VOCAB}) = {np.log(VOCAB):.3f}, floor ~ln(4) = 1.386)")


if __name__ == "__main__":
    main()
