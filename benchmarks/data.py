"""Benchmark: is the input pipeline fast enough? Pipeline tokens/s vs a training step's tokens/s.

    python benchmarks/data.py [--batches=200] [--steps=10] [--out=benchmarks/results/data.json]

Measures, in one run on the embedded Shakespeare corpus (seq_len 256, batch 16): the rate at
which ``make_dataset`` delivers training batches with the byte tokenizer and with a 4096-token
BPE (trained here first, its training time reported separately), and the rate of a jitted AdamW
training step of the ``small`` preset (~10M parameters) on this machine. A ratio well above 1
means the pipeline is not the bottleneck.
"""

import argparse
import os
import tempfile
import time

import jax

from runway_jax import model_preset
from runway_jax.data import DataConfig, make_dataset, make_tokenizer
from common import write_results  # benchmarks/common.py
from train_step import measure  # benchmarks/train_step.py, beside this file


def pipeline_rate(config, tokenizer, batches):
    start = time.perf_counter()
    iterator = iter(make_dataset(config, "train", tokenizer))
    next(iterator)  # setup (tokenizing the corpus once) is reported separately
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    return batches * config.batch_size * config.seq_len / elapsed, setup


def training_rate(config, batch, steps):
    """Tokens/s of the library's jitted AdamW step on the ``small`` preset."""
    return measure(model_preset("small", vocab_size=512), config, batch, steps)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--bpe_vocab_size", type=int, default=4096)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "data.json"))
    args = parser.parse_args(argv)

    results = {"backend": jax.default_backend(), "seq_len": args.seq_len, "batch_size": args.batch_size}
    byte_config = DataConfig(seq_len=args.seq_len, batch_size=args.batch_size)
    byte_tokenizer = make_tokenizer(byte_config)
    results["byte_tokens_per_second"], results["byte_setup_seconds"] = pipeline_rate(
        byte_config, byte_tokenizer, args.batches)
    print(f"pipeline, byte tokenizer: {results['byte_tokens_per_second']:,.0f} tokens/s "
          f"(setup {results['byte_setup_seconds']:.1f} s)", flush=True)

    with tempfile.TemporaryDirectory() as workdir:
        bpe_config = DataConfig(seq_len=args.seq_len, batch_size=args.batch_size, tokenizer="bpe",
                                bpe_vocab_size=args.bpe_vocab_size)
        start = time.perf_counter()
        bpe_tokenizer = make_tokenizer(bpe_config, workdir)
        results["bpe_training_seconds"] = time.perf_counter() - start
        results["bpe_tokens_per_second"], results["bpe_setup_seconds"] = pipeline_rate(
            bpe_config, bpe_tokenizer, args.batches)
    print(f"pipeline, BPE {args.bpe_vocab_size}: {results['bpe_tokens_per_second']:,.0f} tokens/s "
          f"(BPE training {results['bpe_training_seconds']:.1f} s, setup {results['bpe_setup_seconds']:.1f} s)",
          flush=True)

    batch = next(iter(make_dataset(byte_config, "train", byte_tokenizer)))
    results["training_tokens_per_second"] = training_rate(byte_config, batch, args.steps)
    print(f"training step, small preset: {results['training_tokens_per_second']:,.0f} tokens/s")
    for name in ("byte", "bpe"):
        results[f"{name}_ratio"] = results[f"{name}_tokens_per_second"] / results["training_tokens_per_second"]
        print(f"{name} pipeline / training = {results[f'{name}_ratio']:.1f}x")
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
