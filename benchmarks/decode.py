"""Benchmark: per-token decode time with the cache, rewired vs baseline, in one run.

    python benchmarks/decode.py [--lengths=512,2048,8192] [--tokens=32] [--prompt=256]
                                [--preset=small] [--out=benchmarks/results/decode.json]

For each cache length S it prefills the cache up to S - tokens and times ``tokens`` jitted
``decode_step`` calls (batch 1, float32) for the rewired model and its baseline (same code,
``rewire=False``), and prints the time per token and the ratio rewired / baseline. Once per
model it also times filling a cache with a ``--prompt``-token prompt in one parallel ``prefill``
against feeding the same prompt token by token through ``decode_step`` (tokens/s of each).
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


def prefill_tokens_per_second(config, prompt_length):
    """``(parallel, token_by_token)`` tokens/s filling a cache with one prompt."""
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    prompt = jnp.zeros((1, prompt_length), jnp.int32)
    fill, step = nnx.jit(prefill), nnx.jit(decode_step)
    empty = init_cache(model, batch=1, length=prompt_length)
    jax.block_until_ready(fill(model, empty, prompt))  # compile
    jax.block_until_ready(step(model, empty, prompt[:, 0]))
    start = time.perf_counter()
    jax.block_until_ready(fill(model, empty, prompt))
    parallel = prompt_length / (time.perf_counter() - start)
    start, cache = time.perf_counter(), empty
    for position in range(prompt_length):
        logits, cache = step(model, cache, prompt[:, position])
    jax.block_until_ready(logits)
    return parallel, prompt_length / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    args = parser.parse_args(argv)
    results = {"backend": jax.default_backend(), "preset": args.preset, "rows": [], "prefill": {}}
    for kind, rewire in (("rewired", True), ("baseline", False)):
        config = model_preset(args.preset, vocab_size=512, rewire=rewire, dtype="float32")
        parallel, fed = prefill_tokens_per_second(config, args.prompt)
        results["prefill"][kind] = {"prompt_tokens": args.prompt, "parallel_tokens_per_second": parallel,
                                    "token_by_token_tokens_per_second": fed, "speedup": parallel / fed}
        print(f"prefill {kind}: {args.prompt} tokens, parallel {parallel:.0f} tokens/s, token by token "
              f"{fed:.0f} tokens/s, {parallel / fed:.1f}x", flush=True)
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
