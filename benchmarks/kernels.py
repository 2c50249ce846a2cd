"""Benchmark: the fused Pallas kernels against standard attention and the "xla" path.

    python benchmarks/kernels.py [--lengths=1024,4096,16384] [--batch=4] [--heads=16]
                                 [--head_dim=128] [--repeats=5]
                                 [--out=benchmarks/results/kernels.json]

Both sides are one attention layer of ``--heads`` heads: standard attention over all of them, and
the rewired layer's ``H - 1`` attending heads steered by the runway head (METHOD (1)). On a GPU
or TPU, for every T (bfloat16), it times forward and forward+backward (median of ``--repeats``
after a warm-up) of

  * ``standard``: ``jax.nn.dot_product_attention(is_causal=True)`` -- cuDNN on GPU, XLA otherwise;
  * ``kernel_exact`` / ``kernel_prefix``: ``rewired_attention`` with the default implementation
    (``pallas_gpu`` / ``pallas_tpu``);
  * ``xla_exact``: ``rewired_attention(implementation="xla")``;

and prints achieved TFLOP/s (analytic FLOPs of METHOD (3c), see ``runway_jax.kernels.cost_model``)
and time ratios against ``standard`` and ``xla_exact``. Target: the exact kernel within 1.3x of
cuDNN causal attention forward+backward on an H100. Forward+backward runs the Pallas backward
kernels of METHOD (3d); achieved TFLOP/s for it counts 3.5x the forward FLOPs.

On CPU (no kernel to time) it prints the analytic FLOP and HBM-traffic estimate of one call at the
kernels' default TPU blocks (128 x 128) instead, for the rewired kernel (both spans) and standard
flash attention, counted the same way.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from runway_jax import attention
from runway_jax.kernels import cost_model, tiling
from common import write_results  # benchmarks/common.py

TERA = 1e12


def analytic_rows(lengths, batch, heads, width, itemsize=2):
    rows = []
    for length in lengths:
        standard_flops, standard_bytes = cost_model.standard_attention_cost(
            batch, length, heads, heads, width, itemsize)
        row = {"length": length, "standard_forward_flops": standard_flops,
               "standard_forward_hbm_bytes": standard_bytes}
        # A rewired layer of H heads: H - 1 attending heads and the runway head (METHOD (1)).
        for span in attention.RUNWAY_SPANS:
            flops, _, hbm = cost_model.forward_cost(batch, length, heads - 1, heads - 1, width, itemsize,
                                                runway_span=span)
            back_flops, _, back_hbm = cost_model.backward_cost(batch, length, heads - 1, heads - 1, width,
                                                           itemsize, runway_span=span)
            row.update({
                f"{span}_forward_flops": flops, f"{span}_forward_hbm_bytes": hbm,
                f"{span}_forward_backward_flops": flops + back_flops,
                f"{span}_forward_backward_hbm_bytes": hbm + back_hbm,
                f"{span}_flop_ratio_to_standard": flops / standard_flops,
            })
        # The GPU kernel's default: smaller tiles, and rho re-formed by every head group.
        gpu = tiling.BlockSizes.gpu_default()
        groups = -(-(heads - 1) // gpu.heads_per_program)  # padded up to whole groups
        tiles = dict(block_q=gpu.block_q, block_k=gpu.block_k)
        gpu_standard, _ = cost_model.standard_attention_cost(batch, length, heads, heads, width, itemsize, **tiles)
        gpu_exact, _, _ = cost_model.forward_cost(batch, length, groups * gpu.heads_per_program, heads - 1, width,
                                              itemsize, runway_span="exact", head_groups=groups, **tiles)
        row["gpu_head_groups"] = groups
        row["gpu_exact_flop_ratio_to_standard"] = gpu_exact / gpu_standard
        rows.append(row)
    return rows


def print_analytic(rows, batch, heads, width):
    print(f"analytic cost per call, B={batch} H={heads} d={width} bfloat16, 128x128 tiles "
          "(forward; forward+backward assumes a fused backward of 2.5x the forward flops)")
    print(f"{'T':>6} {'standard fwd':>14} {'exact fwd':>12} {'exact/std':>9} {'prefix fwd':>12} "
          f"{'prefix/std':>10} {'exact f+b':>12} {'std HBM':>10} {'exact HBM':>10}")
    for r in rows:
        print(f"{r['length']:>6} {r['standard_forward_flops'] / TERA:>11.3f} TF "
              f"{r['exact_forward_flops'] / TERA:>9.3f} TF {r['exact_flop_ratio_to_standard']:>8.3f}x "
              f"{r['prefix_forward_flops'] / TERA:>9.3f} TF {r['prefix_flop_ratio_to_standard']:>9.3f}x "
              f"{r['exact_forward_backward_flops'] / TERA:>9.3f} TF "
              f"{r['standard_forward_hbm_bytes'] / 2**20:>7.0f} MiB "
              f"{r['exact_forward_hbm_bytes'] / 2**20:>7.0f} MiB")
    first = rows[0]
    gpu = tiling.BlockSizes.gpu_default()
    print(f"GPU kernel defaults ({gpu.block_q} x {gpu.block_k} tiles, {first['gpu_head_groups']} head groups that each re-form "
          f"rho): exact forward {first['gpu_exact_flop_ratio_to_standard']:.2f}x the FLOPs of standard attention")


def measure(fn, inputs, repeats):
    compiled = jax.jit(fn).lower(*inputs).compile()
    jax.block_until_ready(compiled(*inputs))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def variants(backend):
    standard = "cudnn" if backend == "gpu" else "xla"
    return {
        "standard": lambda q, k, v, rq, rk: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=standard),
        # A rewired layer of H heads attends with H - 1 of them (the last is the runway head).
        "kernel_exact": lambda q, k, v, rq, rk: attention.rewired_attention(
            q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], rq, rk, runway_span="exact"),
        "kernel_prefix": lambda q, k, v, rq, rk: attention.rewired_attention(
            q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], rq, rk, runway_span="prefix"),
        "xla_exact": lambda q, k, v, rq, rk: attention.rewired_attention(
            q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], rq, rk, runway_span="exact", implementation="xla"),
    }


def timed_rows(lengths, batch, heads, width, repeats, backend):
    rows = []
    for length in lengths:
        keys = jax.random.split(jax.random.key(length), 5)
        shapes = [(batch, length, heads, width)] * 3 + [(batch, length, width)] * 2
        inputs = [jax.random.normal(k, s, jnp.bfloat16) for k, s in zip(keys, shapes)]
        analytic = analytic_rows([length], batch, heads, width)[0]
        for mode in ("forward", "forward+backward"):
            row = {"length": length, "mode": mode}
            for name, fn in variants(backend).items():
                if mode == "forward+backward":
                    fn = jax.grad(lambda *a, fn=fn: fn(*a).astype(jnp.float32).sum(),
                                  argnums=tuple(range(5)))
                try:
                    row[f"{name}_seconds"] = measure(fn, inputs, repeats)
                except Exception as error:  # e.g. cuDNN unavailable, out of memory at 16k
                    row[f"{name}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                    continue
                span = "prefix" if name == "kernel_prefix" else "exact"
                flops = (analytic["standard_forward_flops"] if name == "standard"
                         else analytic[f"{span}_forward_flops"])
                if mode == "forward+backward":
                    flops *= 3.5
                row[f"{name}_tflops"] = flops / row[f"{name}_seconds"] / TERA
            for name in ("kernel_exact", "kernel_prefix", "xla_exact"):
                if f"{name}_seconds" in row and "standard_seconds" in row:
                    row[f"{name}_ratio_to_standard"] = row[f"{name}_seconds"] / row["standard_seconds"]
                if f"{name}_seconds" in row and "xla_exact_seconds" in row:
                    row[f"{name}_ratio_to_xla"] = row[f"{name}_seconds"] / row["xla_exact_seconds"]
            rows.append(row)
            cells = " ".join(
                f"{n}={row[f'{n}_seconds'] * 1e3:.2f}ms/{row[f'{n}_tflops']:.0f}TF/s"
                if f"{n}_seconds" in row else f"{n}=failed" for n in variants(backend))
            ratio = row.get("kernel_exact_ratio_to_standard")
            print(f"T={length} {mode}: {cells}"
                  + (f"  exact/standard={ratio:.2f}x" if ratio is not None else ""), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "kernels.json"))
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    backend = jax.default_backend()
    results = {"device": str(jax.devices()[0]), "backend": backend, "batch": args.batch,
               "heads": args.heads, "head_dim": args.head_dim, "dtype": "bfloat16",
               "analytic": analytic_rows(lengths, args.batch, args.heads, args.head_dim)}
    print_analytic(results["analytic"], args.batch, args.heads, args.head_dim)
    if backend in ("gpu", "tpu"):
        results["timed"] = timed_rows(lengths, args.batch, args.heads, args.head_dim,
                                      args.repeats, backend)
    else:
        results["timed"] = None
        results["note"] = (
            f"measured on {results['device']} (no GPU or TPU): no kernel times, only the analytic "
            "estimate above. What CPU can check is in tests/test_kernels.py: the kernels' "
            "forward and backward in Pallas interpret mode against METHOD's direct evaluation, "
            "and jax.export lowering for platforms tpu and cuda at B=4 T=4096 H=16 d=128 "
            "bfloat16. Run this script on an H100 or a TPU for times; the target is the exact "
            "kernel within 1.3x of cuDNN causal attention forward+backward on an H100.")
        print(results["note"])
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
