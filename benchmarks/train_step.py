"""Benchmark: training-step throughput of rewired vs baseline models, in one run.

    python benchmarks/train_step.py [--presets=tiny,small] [--steps=10]
                                    [--out=benchmarks/results/train_step.json]

For each model preset it builds the rewired model and its baseline (``rewire=False``, same code),
times the library's jitted AdamW step (``runway_jax.training.steps.train_step``) on one fixed
batch of the embedded corpus (seq_len 256, batch 16), and prints tokens/s, compile time and the
ratio rewired / baseline (target: >= 0.85).
"""

import argparse
import functools
import os
import time

import jax
from flax import nnx

from runway_jax import TransformerLM, model_preset
from runway_jax.data import DataConfig, make_dataset, make_tokenizer
from runway_jax.training import TrainConfig
from runway_jax.training.optimizer import make_optimizer
from runway_jax.training.steps import train_step
from common import write_results  # benchmarks/common.py


def measure(model_config, data_config, batch, steps):
    config = TrainConfig(model=model_config, data=data_config)
    graphdef, state = nnx.split(TransformerLM(model_config, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    optimizer = make_optimizer(config)
    opt_state = optimizer.init(params)
    step = jax.jit(functools.partial(train_step, graphdef=graphdef, abstract_state=state,
                                     optimizer=optimizer, z_loss=0.0, grad_accum_steps=1))
    start = time.perf_counter()
    step_count = jax.numpy.int32(0)
    compiled = step.lower(params, opt_state, step_count, batch).compile()
    compile_seconds = time.perf_counter() - start
    params, opt_state, step_count, metrics = compiled(params, opt_state, step_count, batch)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        params, opt_state, step_count, metrics = compiled(params, opt_state, step_count, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    return data_config.batch_size * data_config.seq_len / seconds, compile_seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "train_step.json"))
    args = parser.parse_args(argv)
    data_config = DataConfig(seq_len=args.seq_len, batch_size=args.batch_size)
    batch = next(iter(make_dataset(data_config, "train", make_tokenizer(data_config))))
    results = {"backend": jax.default_backend(), "seq_len": args.seq_len,
               "batch_size": args.batch_size, "presets": {}}
    for name in args.presets.split(","):
        row = {}
        for kind, rewire in (("rewired", True), ("baseline", False)):
            model_config = model_preset(name, vocab_size=512, rewire=rewire, dtype="float32")
            row[f"{kind}_tokens_per_second"], row[f"{kind}_compile_seconds"] = measure(
                model_config, data_config, batch, args.steps)
        row["ratio"] = row["rewired_tokens_per_second"] / row["baseline_tokens_per_second"]
        results["presets"][name] = row
        print(f"{name:>10}: rewired {row['rewired_tokens_per_second']:,.0f} tokens/s "
              f"(compile {row['rewired_compile_seconds']:.1f} s), baseline "
              f"{row['baseline_tokens_per_second']:,.0f} tokens/s (compile "
              f"{row['baseline_compile_seconds']:.1f} s), ratio {row['ratio']:.2f}x", flush=True)
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
