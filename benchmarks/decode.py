"""Benchmark: per-token decode time with the cache, rewired vs baseline, in one run.

    python benchmarks/decode.py [--lengths=512,2048] [--tokens=32] [--preset=small]
                                [--out=benchmarks/results/decode.json]

For each cache length S it prefills the cache up to S - tokens and times ``tokens`` jitted
``decode_step`` calls (batch 1, float32) for the rewired model and its baseline (same code,
``rewire=False``), and prints the time per token and the ratio rewired / baseline.
"""

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from runway_jax import TransformerLM, model_preset
from runway_jax.decoding import decode_step, init_cache, prefill
from common import write_results  # benchmarks/common.py


def seconds_per_token(config, length, tokens):
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    step = nnx.jit(decode_step)
    token = jnp.zeros((1,), jnp.int32)
    prompt = jnp.zeros((1, length - tokens - 1), jnp.int32)
    _, cache = nnx.jit(prefill)(model, init_cache(model, batch=1, length=length), prompt)
    logits, cache = step(model, cache, token)  # compile
    jax.block_until_ready(logits)
    start = time.perf_counter()
    for _ in range(tokens):
        logits, cache = step(model, cache, token)
    jax.block_until_ready(logits)
    return (time.perf_counter() - start) / tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    args = parser.parse_args(argv)
    results = {"backend": jax.default_backend(), "preset": args.preset, "rows": []}
    for length in (int(n) for n in args.lengths.split(",")):
        row = {"cache_length": length}
        for kind, rewire in (("rewired", True), ("baseline", False)):
            config = model_preset(args.preset, vocab_size=512, rewire=rewire, dtype="float32")
            row[f"{kind}_seconds_per_token"] = seconds_per_token(config, length, args.tokens)
        row["ratio"] = row["rewired_seconds_per_token"] / row["baseline_seconds_per_token"]
        results["rows"].append(row)
        print(f"cache {length:>6}: rewired {row['rewired_seconds_per_token'] * 1e3:.2f} ms/token, "
              f"baseline {row['baseline_seconds_per_token'] * 1e3:.2f} ms/token, ratio {row['ratio']:.2f}x",
              flush=True)
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
