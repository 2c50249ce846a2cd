"""The README's promises: its example runs, its commands exist, the benchmarks run."""

import json
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_example_runs():
    example = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    y = namespace["y"]
    assert y.shape == (2, 16, 64) and bool(jnp.all(jnp.isfinite(y)))


def test_ci_runs_exactly_the_readme_test_command():
    """The README's command verbatim, and the same pytest run in the Python 3.12 venv."""
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if "pytest" in line and not line.lstrip().startswith("#")]
    assert len(commands) == 2
    assert [f"   {command}\n" in README for command in commands].count(True) == 1
    pytest_runs = [command.split("bin/python")[-1] for command in commands]
    assert pytest_runs == [" -m pytest -x -q"] * 2


def test_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "attention.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--lengths=64,128",
                    "--repeats=1", f"--out={out}"], check=True, capture_output=True, timeout=300)
    results = json.loads(out.read_text())
    assert len(results["rows"]) == 4 and "forward+backward" in results["growth_exponents"]
    assert all(row["exact_seconds"] > 0 and row["causal_bytes"] > 0 for row in results["rows"])
    assert (tmp_path / "attention.png").stat().st_size > 10_000


def test_data_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "data.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data.py"), "--batches=3", "--steps=1",
                    "--seq_len=32", "--batch_size=2", "--bpe_vocab_size=300", f"--out={out}"],
                   check=True, capture_output=True, timeout=600)
    results = json.loads(out.read_text())
    assert results["byte_tokens_per_second"] > 0 and results["training_tokens_per_second"] > 0
    assert results["bpe_ratio"] > 0


def test_train_step_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "train_step.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--presets=tiny",
                    "--steps=1", "--seq_len=32", "--batch_size=2", f"--out={out}"],
                   check=True, capture_output=True, timeout=600)
    row = json.loads(out.read_text())["presets"]["tiny"]
    assert row["ratio"] > 0 and row["rewired_compile_seconds"] > 0


def test_decode_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "decode.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--lengths=16",
                    "--tokens=2", "--repeats=2", "--prompt=8", "--preset=tiny", f"--out={out}"],
                   check=True, capture_output=True, timeout=600)
    results = json.loads(out.read_text())
    row = results["rows"][0]
    assert row["cache_length"] == 16 and row["rounds"] == 2 and row["ratio"] > 0
    assert row["ratio_range"][0] <= row["ratio"] <= row["ratio_range"][1]
    assert results["prefill"]["rewired"]["prompt_tokens"] == 8
    assert results["prefill"]["baseline"]["parallel_tokens_per_second"] > 0


def test_memory_benchmark_counts_parameters_and_optimizer_state(tmp_path):
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--preset=tiny",
                    "--micro_batches=2,16", "--seq_len=64", f"--out={out}"],
                   check=True, capture_output=True, timeout=600)
    small, large = json.loads(out.read_text())["rows"]
    for kind in ("rewired", "baseline"):
        # float32 parameters + AdamW's two moments, at least; the donated state is aliased.
        assert small[kind]["arguments"] >= 12 * small[kind]["parameters"]
        assert small[kind]["aliased"] >= 12 * small[kind]["parameters"]
        assert large[kind]["temporaries"] > small[kind]["temporaries"]  # activations grow with the batch
    assert small["rewired"]["parameters"] < small["baseline"]["parameters"]
