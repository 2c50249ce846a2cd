"""Benchmark: memory of one training step, rewired vs baseline, from XLA's compiled program.

    python benchmarks/memory.py [--preset=gpt2-small] [--micro_batches=4,16] [--seq_len=1024]
                                [--out=benchmarks/results/memory.json]

Nothing is allocated: the jitted ``train_step`` (AdamW, float32 master weights, the preset's
compute dtype) is lowered for abstract inputs of one device's micro-batch and compiled, and
``memory_analysis()`` reports its arguments (parameters, optimizer state, batch), outputs and
temporaries (activations kept for the backward, gradients). Run it on the target machine for the
target's numbers; on a CPU the attention runs the ``"xla"`` path, so it is an estimate of what a
GPU/TPU needs (the Pallas kernels hold less). The recipe in docs/results.md uses it to choose
``--batch_size`` / ``--grad_accum_steps``: activations grow with the micro-batch, the rest does not.
"""

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from runway_jax import TransformerLM
from runway_jax.model import count_parameters
from runway_jax.training import train_preset
from runway_jax.training.optimizer import make_optimizer
from runway_jax.training.steps import train_step
from common import write_results  # benchmarks/common.py

GIB = 2**30


def step_memory(config, micro_batch):
    """Compiled memory (bytes) of one training step on ``micro_batch`` sequences."""
    model = nnx.eval_shape(lambda: TransformerLM(config.model, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(model)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                          nnx.to_pure_dict(abstract_state))
    optimizer = make_optimizer(config)
    opt_state = jax.eval_shape(optimizer.init, params)
    tokens = jax.ShapeDtypeStruct((micro_batch, config.data.seq_len), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens, "segment_ids": tokens, "positions": tokens,
             "loss_mask": jax.ShapeDtypeStruct(tokens.shape, jnp.float32)}
    step = jax.jit(functools.partial(train_step, graphdef=graphdef, abstract_state=abstract_state,
                                     optimizer=optimizer, z_loss=config.z_loss, grad_accum_steps=1),
                   donate_argnums=(0, 1, 2))
    analysis = step.lower(params, opt_state, jax.ShapeDtypeStruct((), jnp.int32), batch).compile().memory_analysis()
    return {"arguments": analysis.argument_size_in_bytes, "outputs": analysis.output_size_in_bytes,
            "temporaries": analysis.temp_size_in_bytes, "aliased": analysis.alias_size_in_bytes,
            # Donated parameters and optimizer state are reused for the outputs.
            "peak_estimate": analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--micro_batches", default="4,16", help="sequences per device per step")
    parser.add_argument("--seq_len", type=int, default=None, help="default: the preset's")
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    args = parser.parse_args(argv)
    base = train_preset(args.preset)
    if args.seq_len:
        base = base.replace(data=dataclasses.replace(base.data, seq_len=args.seq_len))
    results = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
               "preset": args.preset, "seq_len": base.data.seq_len, "rows": []}
    for micro_batch in (int(n) for n in args.micro_batches.split(",")):
        row = {"micro_batch": micro_batch}
        for kind, rewire in (("rewired", True), ("baseline", False)):
            config = base.replace(model=base.model.replace(rewire=rewire))
            row[kind] = step_memory(config, micro_batch)
            row[kind]["parameters"] = count_parameters(config.model)
            print(f"{args.preset} {kind:>8} micro-batch {micro_batch:>3} x {base.data.seq_len}: "
                  f"arguments {row[kind]['arguments'] / GIB:.2f} GiB, temporaries "
                  f"{row[kind]['temporaries'] / GIB:.2f} GiB, peak ~{row[kind]['peak_estimate'] / GIB:.2f} GiB",
                  flush=True)
        row["ratio"] = row["rewired"]["peak_estimate"] / row["baseline"]["peak_estimate"]
        print(f"  rewired / baseline peak: {row['ratio']:.3f}x", flush=True)
        results["rows"].append(row)
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
