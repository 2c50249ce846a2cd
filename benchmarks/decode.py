"""Benchmark: cached decoding, rewired vs baseline, measured side by side in one run.

    python benchmarks/decode.py [--lengths=512,2048,8192] [--tokens=16] [--repeats=5]
                                [--prompt=256] [--preset=small]
                                [--out=benchmarks/results/decode.json]

Per-token decode: for each cache length S both models (the rewired one and its baseline, same
code with ``rewire=False``) prefill a cache up to ``S - tokens``; then ``--repeats`` rounds each
time ``tokens`` jitted ``decode_step`` calls per model from that same cache (caches are values,
so every round starts alike), the two models interleaved and their order alternated, so that
machine noise falls on both. Reported: the median time per token of each model and the median
of the per-round ratios rewired / baseline (batch 1, float32).

Prefill: once per model, filling a cache with a ``--prompt``-token prompt in one parallel
``prefill`` against feeding the same prompt token by token through ``decode_step`` (tokens/s).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from runway_jax import TransformerLM, model_preset
from runway_jax.decoding import decode_step, init_cache, prefill
from common import write_results  # benchmarks/common.py

KINDS = (("rewired", True), ("baseline", False))


def make_model(preset, rewire):
    return TransformerLM(model_preset(preset, vocab_size=512, rewire=rewire, dtype="float32"),
                         rngs=nnx.Rngs(0))


def prefilled(model, length, tokens):
    """A jitted ``decode_step`` (compiled) and a cache filled up to ``length - tokens``."""
    step = nnx.jit(decode_step)
    prompt = jnp.zeros((1, length - tokens), jnp.int32)
    _, cache = nnx.jit(prefill)(model, init_cache(model, batch=1, length=length), prompt)
    jax.block_until_ready(step(model, cache, jnp.zeros((1,), jnp.int32)))  # compile
    return step, cache


def time_steps(model, step, cache, tokens):
    """Seconds per token of ``tokens`` decode steps from ``cache``."""
    token = jnp.zeros((1,), jnp.int32)
    start = time.perf_counter()
    for _ in range(tokens):
        logits, cache = step(model, cache, token)
    jax.block_until_ready(logits)
    return (time.perf_counter() - start) / tokens


def decode_row(models, length, tokens, repeats):
    ready = {kind: prefilled(model, length, tokens) for kind, model in models.items()}
    times = {kind: [] for kind in models}
    ratios = []
    for round_ in range(repeats):
        order = list(models) if round_ % 2 == 0 else list(models)[::-1]
        for kind in order:
            times[kind].append(time_steps(models[kind], *ready[kind], tokens))
        ratios.append(times["rewired"][-1] / times["baseline"][-1])
    row = {"cache_length": length, "tokens_per_round": tokens, "rounds": repeats}
    for kind in models:
        row[f"{kind}_seconds_per_token"] = statistics.median(times[kind])
    row["ratio"] = statistics.median(ratios)
    row["ratio_range"] = [min(ratios), max(ratios)]
    return row


def prefill_tokens_per_second(model, prompt_length, repeats=3):
    """``(parallel, token_by_token)`` tokens/s filling a cache with one prompt (the parallel
    prefill: the median of ``repeats`` calls, one call being short)."""
    prompt = jnp.zeros((1, prompt_length), jnp.int32)
    fill, step = nnx.jit(prefill), nnx.jit(decode_step)
    empty = init_cache(model, batch=1, length=prompt_length)
    jax.block_until_ready(fill(model, empty, prompt))  # compile
    jax.block_until_ready(step(model, empty, prompt[:, 0]))
    # The prompt's columns as ready arrays: slicing inside the timed loop would time the slices.
    columns = [jnp.zeros((1,), jnp.int32) for _ in range(prompt_length)]
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fill(model, empty, prompt))
        seconds.append(time.perf_counter() - start)
    parallel = prompt_length / statistics.median(seconds)
    start, cache = time.perf_counter(), empty
    for column in columns:
        logits, cache = step(model, cache, column)
    jax.block_until_ready(logits)
    return parallel, prompt_length / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.tokens < 1 or args.repeats < 1 or min(lengths) <= args.tokens:
        parser.error(f"--tokens={args.tokens} and --repeats={args.repeats} must be >= 1 and every "
                     f"cache length in --lengths={args.lengths} longer than --tokens")
    models = {kind: make_model(args.preset, rewire) for kind, rewire in KINDS}
    results = {"backend": jax.default_backend(), "preset": args.preset, "rows": [], "prefill": {}}
    for kind, model in models.items():
        parallel, fed = prefill_tokens_per_second(model, args.prompt)
        results["prefill"][kind] = {"prompt_tokens": args.prompt,
                                    "parallel_tokens_per_second": parallel,
                                    "token_by_token_tokens_per_second": fed,
                                    "speedup": parallel / fed}
        print(f"prefill {kind}: {args.prompt} tokens, parallel {parallel:.0f} tokens/s, token by "
              f"token {fed:.0f} tokens/s, {parallel / fed:.1f}x", flush=True)
    for done, length in enumerate(lengths, 1):
        start = time.perf_counter()
        row = decode_row(models, length, args.tokens, args.repeats)
        results["rows"].append(row)
        low, high = row["ratio_range"]
        print(f"cache {length:>6}: rewired {row['rewired_seconds_per_token'] * 1e3:.2f} ms/token, "
              f"baseline {row['baseline_seconds_per_token'] * 1e3:.2f} ms/token, ratio "
              f"{row['ratio']:.2f}x (rounds {low:.2f}-{high:.2f}) "
              f"[{done}/{len(lengths)}, {time.perf_counter() - start:.0f} s]", flush=True)
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
