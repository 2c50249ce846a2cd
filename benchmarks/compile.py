"""Benchmark: the attention kernels compiled for real TPUs (and GPUs) from this host, no chip needed.

    python benchmarks/compile.py [--quick] [--lengths=1024,4096,16384] [--chips=v5e:1x1,v6e:1x1]
                                 [--out=benchmarks/results/compile.json]

For each TPU chip (one device of a libtpu topology), each T, forward and forward+backward
(``value_and_grad`` of the summed output), B=4, H=16, d=128, bfloat16, it compiles with the real
TPU compiler and prints success, compile time, XLA's memory analysis (temporaries, peak) and cost
analysis (FLOPs, bytes accessed) of

  * ``pallas_tpu_exact`` / ``pallas_tpu_prefix``: ``rewired_attention`` on the fused Mosaic kernels;
  * ``xla_exact``: ``rewired_attention(implementation="xla")``, the blocked pure-XLA path;
  * ``splash``: standard causal attention, ``jax.experimental.pallas.ops.tpu.splash_attention``
    (``make_splash_mha`` with a ``CausalMask``, its default 128-row blocks, as our kernels'),

and the ratios of each to ``splash``. Both sides are one attention layer of H heads: splash
attends with all 16; the rewired layer with H - 1 = 15 heads steered by the runway head (METHOD
(1)). XLA's cost analysis of a Pallas call is the ``pl.CostEstimate`` the kernel carries (ours:
``runway_jax.kernels.cost_model``); splash carries none, so its FLOPs and bytes are counted by the
same analytic model as ours (``cost_model.standard_attention_cost``; forward+backward = 3.5x the
forward, as ``benchmarks/kernels.py`` counts), and the output says which source each figure has.
``xla_exact``'s FLOPs are XLA's static count, which counts a loop body once: an undercount for the
blocked path, whose loops run over key blocks (its ratio falls as T grows). ``--quick``: T=1024 on
v5e only. Then the Mosaic GPU kernels exported for CUDA (:func:`mosaic_gpu_rows`: whether each
lowers, i.e. fits an H100's shared memory, and the cost model's FLOP ratio), and the Triton
section: ``benchmarks/gpu_compile.py``'s ``gpu_compile_report()`` (PTX/SASS registers, spills,
shared memory) when it can run, else why not.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import make_single_device_sharding

from runway_jax import attention
from runway_jax.kernels import cost_model
from runway_jax.training.aot import CompileError, compile_jitted, compiled_figures, topology_devices
from common import write_results  # benchmarks/common.py

MIB = 2**20
SPANS = ("exact", "prefix")


def rewired(span, implementation):
    def fn(q, k, v, rq, rk):
        return attention.rewired_attention(q, k, v, rq, rk, runway_span=span, implementation=implementation)
    return fn


def splash(length, heads):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((length, length))] * heads)
    kernel = kernel_lib.make_splash_mha(mask, block_sizes=kernel_lib.BlockSizes.get_default(),
                                        head_shards=1, q_seq_shards=1)

    def fn(q, k, v):  # [B, H, T, d], its native layout; splash does not scale the logits
        return jax.vmap(kernel)(q * (q.shape[-1] ** -0.5), k, v)
    return fn


def variants(length, batch, heads, width, device):
    """``{name: (fn, abstract inputs)}`` of one T."""
    shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=make_single_device_sharding(device))
    rewired_inputs = [shape(batch, length, heads - 1, width)] * 3 + [shape(batch, length, width)] * 2
    found = {f"pallas_tpu_{span}": (rewired(span, "pallas_tpu"), rewired_inputs) for span in SPANS}
    found["xla_exact"] = (rewired("exact", "xla"), rewired_inputs)
    found["splash"] = (splash(length, heads), [shape(batch, heads, length, width)] * 3)
    return found


def with_backward(fn, count):
    loss = lambda *a: fn(*a).astype(jnp.float32).sum()
    return lambda *a: jax.value_and_grad(loss, argnums=tuple(range(count)))(*a)


def compile_row(fn, inputs):
    try:
        compiled, _, seconds = compile_jitted(jax.jit(fn), *inputs, platform="tpu")
    except Exception as error:  # a kernel the TPU compiler rejects is a result, not a crash
        return {"compiled": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    figures = compiled_figures(compiled)
    return {"compiled": True, "compile_seconds": seconds,
            "tpu_custom_calls": compiled.as_text().count('custom_call_target="tpu_custom_call"'),
            **{k: figures[k] for k in ("temporaries_bytes", "peak_bytes", "xla_peak_bytes",
                                       "arguments_bytes", "outputs_bytes", "flops", "bytes_accessed")}}


def standard_analytic(batch, length, heads, width, mode):
    flops, hbm = cost_model.standard_attention_cost(batch, length, heads, heads, width, 2)
    return (flops, hbm) if mode == "forward" else (3.5 * flops, 3 * hbm)


def tpu_rows(chips, lengths, batch, heads, width):
    rows = []
    for chip in chips:
        device = topology_devices(chip)[0]
        for length in lengths:
            for mode in ("forward", "forward+backward"):
                row = {"chip": chip, "device_kind": device.device_kind, "length": length, "mode": mode}
                for name, (fn, inputs) in variants(length, batch, heads, width, device).items():
                    if mode == "forward+backward":
                        fn = with_backward(fn, len(inputs))
                    row[name] = compile_row(fn, inputs)
                base = row["splash"]
                if base.get("compiled"):
                    base["xla_cost_flops"], base["xla_cost_bytes_accessed"] = base["flops"], base["bytes_accessed"]
                if base.get("compiled") and base["flops"] < 0.01 * standard_analytic(batch, length, heads, width, mode)[0]:
                    # No CostEstimate on splash's pallas_calls: count it as ours are counted.
                    base["flops"], base["bytes_accessed"] = standard_analytic(batch, length, heads, width, mode)
                    base["cost_source"] = "analytic (splash carries no pl.CostEstimate)"
                elif base.get("compiled"):
                    base["cost_source"] = "XLA cost_analysis"
                for name in ("pallas_tpu_exact", "pallas_tpu_prefix", "xla_exact"):
                    if row[name].get("compiled") and base.get("compiled"):
                        row[name]["cost_source"] = ("XLA cost_analysis = the kernels' pl.CostEstimate"
                                                    if name.startswith("pallas") else "XLA cost_analysis")
                        row[name]["ratio_to_splash"] = {
                            key: row[name][key] / base[key] if base[key] else None
                            for key in ("flops", "bytes_accessed", "temporaries_bytes", "peak_bytes",
                                        "compile_seconds")}
                rows.append(row)
                print_row(row)
    return rows


def print_row(row):
    cells = []
    for name in ("pallas_tpu_exact", "pallas_tpu_prefix", "xla_exact", "splash"):
        r = row[name]
        if not r.get("compiled"):
            cells.append(f"{name}: FAILED {r['error']}")
            continue
        ratio = r.get("ratio_to_splash")
        cells.append(
            f"{name}: {r['compile_seconds']:.1f}s tmp {r['temporaries_bytes'] / MIB:.0f} MiB peak "
            f"{r['peak_bytes'] / MIB:.0f} MiB {r['flops'] / 1e9:.1f} GFLOP {r['bytes_accessed'] / MIB:.0f} MiB"
            + (f" (x splash: flops {ratio['flops']:.2f}, peak {ratio['peak_bytes']:.2f})" if ratio else ""))
    print(f"{row['chip']} T={row['length']} {row['mode']}:\n  " + "\n  ".join(cells), flush=True)


def mosaic_gpu_rows(lengths, batch, heads, width):
    """The Mosaic GPU kernels (``pallas_mosaic_gpu``, default BlockSizes) exported for CUDA from
    this host, forward and forward+backward: lowering succeeds only if every program's shared
    memory fits an H100's 227 KiB (Mosaic GPU checks it while lowering; registers and timings
    need the GPU itself). With the cost model's FLOP ratio to standard attention over H heads."""
    from runway_jax import kernels
    from runway_jax.kernels import mosaic_gpu, tiling

    blocks = tiling.BlockSizes.mosaic_gpu_default()
    rows = []
    for length in lengths:
        shape = jax.ShapeDtypeStruct
        args = ([shape((batch, length, heads, width), jnp.bfloat16)] * 3
                + [shape((batch, length, width), jnp.bfloat16)] * 2)
        for span in SPANS:
            def forward(q, k, v, rq, rk, span=span):
                return kernels.rewired_attention(
                    q, k, v, rq, rk, implementation="pallas_mosaic_gpu", beta=1.0,
                    runway_coefficient="bilinear", runway_span=span, segment_ids=None, scale=None)
            for mode, fn in (("forward", forward), ("forward+backward", with_backward(forward, 5))):
                row = {"target": "cuda (Mosaic GPU, sm_90a)", "variant": f"pallas_mosaic_gpu_{span}",
                       "length": length, "mode": mode, "block_sizes": blocks.__dict__,
                       "forward_flop_ratio_cost_model": mosaic_gpu.flop_ratio(
                           heads, width, length, runway_span=span, block_q=blocks.block_q,
                           block_k=blocks.block_k, heads_per_program=blocks.heads_per_program)}
                start = time.perf_counter()
                try:
                    text = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()
                    row.update(lowered=True, kernel_calls=text.count("@mosaic_gpu"))
                except Exception as error:  # e.g. shared memory over the limit
                    row.update(lowered=False, error=str(error).splitlines()[0][:300])
                row["seconds"] = round(time.perf_counter() - start, 2)
                print(f"{row['variant']:<26} T={length:<6} {mode:<17} lowered={row['lowered']} "
                      f"in {row['seconds']:.1f} s, forward FLOPs / standard (cost model) "
                      f"{row['forward_flop_ratio_cost_model']:.2f}x", flush=True)
                rows.append(row)
    return rows


def gpu_section():
    try:
        from gpu_compile import gpu_compile_report  # benchmarks/gpu_compile.py
    except Exception as error:
        reason = f"benchmarks/gpu_compile.py not importable ({type(error).__name__}: {error})"
        print(f"GPU section skipped: {reason}")
        return {"skipped": reason}
    try:
        report = gpu_compile_report()
    except Exception as error:
        reason = f"gpu_compile_report() failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
        print(f"GPU section skipped: {reason}")
        return {"skipped": reason}
    print(f"GPU section: {report}")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T=1024 on v5e only")
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--chips", default="v5e:1x1,v6e:1x1", help="libtpu topology names, one device used")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "compile.json"))
    args = parser.parse_args(argv)
    lengths = [1024] if args.quick else [int(n) for n in args.lengths.split(",")]
    chips = ["v5e:1x1"] if args.quick else args.chips.split(",")
    results = {"jax": jax.__version__, "batch": args.batch, "heads": args.heads,
               "head_dim": args.head_dim, "dtype": "bfloat16", "note": (
                   "compiled, not run: XLA memory_analysis/cost_analysis per device. Pallas calls' "
                   "FLOPs and bytes are their pl.CostEstimate; splash's are analytic; xla_exact's count each "
                   "loop body once (an undercount). The rewired "
                   "layer attends with H - 1 heads + the runway head, splash with H heads.")}
    start = time.perf_counter()
    try:
        results["tpu"] = tpu_rows(chips, lengths, args.batch, args.heads, args.head_dim)
    except CompileError as error:  # libtpu missing or an unknown chip name
        print(f"TPU section skipped: {error}")
        results["tpu"] = {"skipped": str(error)}
    results["mosaic_gpu"] = mosaic_gpu_rows(lengths, args.batch, args.heads, args.head_dim)
    results["gpu"] = gpu_section()
    results["seconds"] = time.perf_counter() - start
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
