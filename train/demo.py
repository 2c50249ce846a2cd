"""Train a tiny rewired language model on the embedded Shakespeare corpus on the CPU.

    python train/demo.py [--steps=200] [--baseline]

Bytes of 38 plays in, 4 held-out plays for validation: the training loss falls from ln(259) and
the validation loss is printed at the end. A smoke test of the library and its data pipeline;
``train/main.py`` (the real training program) replaces it as the main job.
"""

import argparse
import time

import jax
import numpy as np
import optax
from flax import nnx

from runway_jax import TransformerLM, count_parameters, model_preset
from runway_jax.data import DataConfig, make_dataset, make_tokenizer


def loss_fn(model, batch):
    logits = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return (losses * batch["loss_mask"]).sum() / batch["loss_mask"].sum()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--baseline", action="store_true", help="standard attention (rewire=False)")
    args = parser.parse_args()
    if min(args.steps, args.batch_size) < 1 or args.seq_len < 2:
        parser.error("--steps and --batch_size must be >= 1 and --seq_len >= 2")

    data = DataConfig(seq_len=args.seq_len, batch_size=args.batch_size)
    tokenizer = make_tokenizer(data)
    config = model_preset("tiny", rewire=not args.baseline)
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
    kind = "rewired" if config.rewire else "baseline"
    print(f"{kind} tiny model, {count_parameters(config):,} parameters, backend {jax.default_backend()}")

    @nnx.jit
    def train_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return loss

    batches = iter(make_dataset(data, "train", tokenizer))
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = train_step(model, optimizer, next(batches))
        if step == 1 or step % 20 == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            rate = step * args.batch_size * args.seq_len / elapsed
            eta = elapsed / step * (args.steps - step)
            print(f"step {step:4d}  loss {float(loss):.3f}  {rate:,.0f} tokens/s  eta {eta:.0f}s",
                  flush=True)
    evaluate = nnx.jit(loss_fn)
    validation = [float(evaluate(model, b)) for b, _ in zip(make_dataset(data, "validation", tokenizer), range(20))]
    print(f"validation loss {np.mean(validation):.3f} nats/byte over {len(validation)} batches "
          f"(start ln({tokenizer.vocab_size}) = {np.log(tokenizer.vocab_size):.3f})")


if __name__ == "__main__":
    main()
