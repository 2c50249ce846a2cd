"""Benchmark: rewired attention ("xla", exact and prefix spans) against standard causal attention.

    python benchmarks/attention.py [--lengths=512,1024,2048,4096,8192] [--repeats=3]
                                   [--out=benchmarks/results/attention.json]

For every length T (B=1, H=8, d=64, float32 by default) it measures, in the same run, the
forward and forward+backward wall time (median of ``--repeats`` after one warm-up) and the
compiled memory (XLA's memory analysis: temporaries + arguments + outputs) of

  * jax.nn.dot_product_attention(is_causal=True, implementation="xla") -- XLA's own standard
    attention, 8 heads (it forms the T x T logits: fast, but its memory grows as T^2)
  * causal_attention(implementation="xla")            -- standard attention from our code, 8 heads
  * rewired_attention(span="exact", implementation="xla") -- 8 rewired heads + the runway head
  * rewired_attention(span="prefix", implementation="xla")

The timed calls of all variants are interleaved (one call of each per round), so a load that comes
and goes on a shared machine affects every variant alike. It prints the ratios of the rewired
variants to the FASTER of the two standard baselines, and of our causal path to XLA's, plus the
growth exponent of each series, fitted as the slope of log(time) against log(T). METHOD (3c) puts
the floor of the rewired/standard time ratio near 1.2x.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from runway_jax import attention
from common import write_results  # benchmarks/common.py

VARIANTS = {
    "jax_nn": lambda q, k, v, rq, rk: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="xla"),
    "causal": lambda q, k, v, rq, rk: attention.causal_attention(q, k, v, implementation="xla"),
    "exact": lambda q, k, v, rq, rk: attention.rewired_attention(
        q, k, v, rq, rk, runway_span="exact", implementation="xla"),
    "prefix": lambda q, k, v, rq, rk: attention.rewired_attention(
        q, k, v, rq, rk, runway_span="prefix", implementation="xla"),
}


def measure(functions, inputs, repeats):
    """``{name: (median seconds, compiled bytes)}``; the repeats of all functions interleaved."""
    compiled, peak = {}, {}
    for name, fn in functions.items():
        compiled[name] = jax.jit(fn).lower(*inputs).compile()
        memory = compiled[name].memory_analysis()
        peak[name] = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
        jax.block_until_ready(compiled[name](*inputs))  # warm-up
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, call in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(call(*inputs))
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), peak[name]) for name in functions}


def growth_exponent(lengths, values):
    return float(np.polyfit(np.log(lengths), np.log(values), 1)[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "attention.json"))
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]

    results = {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
               "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
               "dtype": "float32", "rows": []}
    header = f"{'T':>6} {'mode':>8} " + " ".join(f"{name + ' s':>10} {name + ' MB':>10}" for name in VARIANTS)
    print(header + f" {'exact/best':>12} {'prefix/best':>12} {'ours/jax_nn':>12}   (time x/memory x)", flush=True)
    for length in lengths:
        keys = jax.random.split(jax.random.key(length), 5)
        shapes = [(args.batch, length, args.heads, args.head_dim)] * 3 + [(args.batch, length, args.head_dim)] * 2
        inputs = [jax.random.normal(key, shape, jnp.float32) for key, shape in zip(keys, shapes)]
        for mode in ("forward", "forward+backward"):
            row = {"length": length, "mode": mode}
            functions = dict(VARIANTS)
            if mode == "forward+backward":
                functions = {name: jax.grad(lambda *a, fn=fn: fn(*a).sum(), argnums=tuple(range(5)))
                             for name, fn in VARIANTS.items()}
            for name, (seconds, size) in measure(functions, inputs, args.repeats).items():
                row[f"{name}_seconds"], row[f"{name}_bytes"] = seconds, size
            best = min(("jax_nn", "causal"), key=lambda n: row[f"{n}_seconds"])
            row["best_standard"] = best
            for name in ("exact", "prefix"):
                row[f"{name}_time_ratio"] = row[f"{name}_seconds"] / row[f"{best}_seconds"]
                row[f"{name}_memory_ratio"] = row[f"{name}_bytes"] / row["causal_bytes"]
            row["causal_vs_jax_nn_time_ratio"] = row["causal_seconds"] / row["jax_nn_seconds"]
            row["causal_vs_jax_nn_memory_ratio"] = row["causal_bytes"] / row["jax_nn_bytes"]
            results["rows"].append(row)
            cells = " ".join(f"{row[f'{n}_seconds']:>10.4f} {row[f'{n}_bytes'] / 2**20:>10.1f}" for n in VARIANTS)
            print(f"{length:>6} {mode[:8]:>8} {cells} "
                  f"{row['exact_time_ratio']:>6.2f}x/{row['exact_memory_ratio']:.2f}x "
                  f"{row['prefix_time_ratio']:>6.2f}x/{row['prefix_memory_ratio']:.2f}x "
                  f"{row['causal_vs_jax_nn_time_ratio']:>6.2f}x/{row['causal_vs_jax_nn_memory_ratio']:.2f}x", flush=True)
    print("time ratios are to the faster standard baseline of the row (best_standard in the JSON); "
          "memory ratios of the rewired variants are to our causal path (both O(T)).")

    results["growth_exponents"] = {}
    if len(lengths) > 1:
        for mode in ("forward", "forward+backward"):
            rows = [r for r in results["rows"] if r["mode"] == mode]
            results["growth_exponents"][mode] = {
                name: growth_exponent([r["length"] for r in rows], [r[f"{name}_seconds"] for r in rows])
                for name in VARIANTS
            }
            exponents = ", ".join(f"{n} {e:.2f}" for n, e in results["growth_exponents"][mode].items())
            print(f"time growth exponent in T ({mode}): {exponents}")
    write_results(results, args.out)
    plot(results, os.path.splitext(args.out)[0] + ".png")
    return results


def plot(results, path):
    """Time and memory against T, log-log, one panel per measure (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot (pip install matplotlib)")
        return
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("forward", "seconds", "forward time (s)"),
              ("forward+backward", "seconds", "forward+backward time (s)"),
              ("forward+backward", "bytes", "forward+backward compiled memory (MiB)")]
    for axis, (mode, measure, title) in zip(axes, panels):
        rows = [r for r in results["rows"] if r["mode"] == mode]
        lengths = [r["length"] for r in rows]
        for name in VARIANTS:
            values = [r[f"{name}_{measure}"] / (2**20 if measure == "bytes" else 1) for r in rows]
            axis.plot(lengths, values, marker="o", label=name)
        axis.set(xscale="log", yscale="log", xlabel="sequence length T", title=title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(f"rewired vs causal attention, {results['backend']}, B={results['batch']}, "
                    f"H={results['heads']}, d={results['head_dim']}, float32")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
