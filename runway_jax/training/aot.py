"""Ahead-of-time compilation of the sharded training and evaluation steps, e.g. for a TPU
topology from a CPU host (``train/compile.py``).

With ``libtpu`` installed, ``jax.experimental.topologies`` describes the chips of a TPU slice
(``"v5e:2x2"``) as compile-only devices; a ``jax.jit`` lowered for abstract arguments sharded over
a mesh of them is compiled by the real TPU compiler (Mosaic kernels included), and XLA's
``memory_analysis()`` / ``cost_analysis()`` describe the program one device runs. Nothing is
allocated: the model, optimizer state and batch are ``jax.ShapeDtypeStruct`` s with shardings.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from runway_jax import attention
from runway_jax.model import TransformerLM, count_parameters
from runway_jax.sharding import state_shardings
from runway_jax.training.config import TrainConfig
from runway_jax.training.loop import flops_per_token
from runway_jax.training.optimizer import make_optimizer, optimizer_state_shardings
from runway_jax.training.steps import eval_step, train_step

GIB = 2**30

# HBM per chip by jax.Device.device_kind (vendors' data sheets): libtpu's compile-only devices do
# not report their memory (memory_stats() needs an addressable device).
HBM_PER_CHIP = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5e": 16 * GIB,
                "TPU v5": 95 * GIB, "TPU v5p": 95 * GIB, "TPU v6 lite": 32 * GIB,
                "TPU v6e": 32 * GIB, "TPU7x": 192 * GIB}

EXAMPLE_TOPOLOGIES = "v5e:2x2, v5e:4x4, v5p:2x2x1, v5p:4x4x4, v6e:2x2, v4:2x2x1"


_FIT_HINT = ("lower the batch per device (--batch_size, a larger --topology), raise --grad_accum_steps, "
             "or shard differently (--mesh_data, --mesh_fsdp, --mesh_model).")


class CompileError(RuntimeError):
    """A program cannot be compiled for the requested target; the message says why and what to do."""


def libtpu_available() -> bool:
    return bool(os.environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str) -> list:
    """The compile-only devices of TPU topology ``name`` (e.g. ``"v5e:2x2"``, ``"v5p:4x4x4"``)."""
    if not libtpu_available():
        raise CompileError("compiling for a TPU topology needs libtpu, which is not installed: "
                           "install the tpu extra: pip install -e '.[tpu]'")
    # Compile-only use claims no chip, so it need not take libtpu's one-process-per-host lock
    # (/tmp/libtpu_lockfile) from other compiles or tests running beside it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        with _quiet_stderr():
            return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as error:  # libtpu raises JaxRuntimeError (INVALID_ARGUMENT) for bad names
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
    match = re.fullmatch(r"[A-Za-z0-9_ ]+[:=_]([0-9]+(?:x[0-9]+)*)", name)
    if match and "chips_per_host_bounds" in message:
        # A slice smaller than one host's default chips (v5e:1x1): make it one host of its own size.
        bounds = [int(n) for n in match.group(1).split("x")] + [1] * 3
        try:
            return list(topologies.get_topology_desc(
                platform="tpu", topology_name=name, chips_per_host_bounds=bounds[:3]).devices)
        except Exception as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise CompileError(f"--topology={name!r} is not a TPU topology libtpu knows ({message}); "
                       f"use e.g. {EXAMPLE_TOPOLOGIES}.")


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: libtpu's start-up prints warnings about the TPU VM metadata a
    CPU host lacks (accelerator type, worker hostnames); its errors still raise as exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def hbm_per_device(devices) -> int | None:
    """Bytes of HBM one device can use: the chip's, split between the devices on one chip (v4's
    two TensorCores are two devices here); None for kinds not in ``HBM_PER_CHIP`` (CPUs)."""
    per_chip = HBM_PER_CHIP.get(devices[0].device_kind)
    if per_chip is None:
        return None
    chips = len({tuple(getattr(d, "coords", (d.id,))) for d in devices})
    return per_chip * chips // len(devices)


def _abstract_model(config: TrainConfig):
    return nnx.split(nnx.eval_shape(lambda: TransformerLM(config.model, rngs=nnx.Rngs(0))))


def abstract_train_state(config: TrainConfig, mesh) -> dict:
    """The training state of ``train_and_evaluate`` (``params``, ``opt_state``, ``step``, ``rng``)
    as ``jax.ShapeDtypeStruct`` s sharded over ``mesh`` as the loop shards it."""
    _, abstract_state = _abstract_model(config)
    shardings = nnx.to_pure_dict(state_shardings(abstract_state, mesh))
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(abstract_state), shardings)
    optimizer = make_optimizer(config)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(optimizer.init, params),
                             optimizer_state_shardings(optimizer, params, mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(config.seed)))
    return {"params": params, "opt_state": opt_state,
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
            "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated)}


def abstract_batch(config: TrainConfig, mesh) -> dict:
    """One global batch as the data pipeline yields it, sharded over data x fsdp."""
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    shape = (config.data.batch_size, config.data.seq_len)
    tokens = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
    return {"inputs": tokens, "targets": tokens, "segment_ids": tokens, "positions": tokens,
            "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)}


def compiled_figures(compiled) -> dict:
    """Per-device memory (bytes) and cost of one compiled program, from XLA's own analyses."""
    memory = compiled.memory_analysis()
    figures = {
        "arguments_bytes": memory.argument_size_in_bytes,
        "outputs_bytes": memory.output_size_in_bytes,
        "aliased_bytes": memory.alias_size_in_bytes,  # donated inputs reused as outputs
        "temporaries_bytes": memory.temp_size_in_bytes,
        "generated_code_bytes": memory.generated_code_size_in_bytes,
        # XLA's own peak (its buffer assignment's heap simulation), where the JAX line exposes it.
        "xla_peak_bytes": getattr(memory, "peak_memory_in_bytes", None),
    }
    figures["sum_bytes"] = (figures["arguments_bytes"] + figures["outputs_bytes"]
                            - figures["aliased_bytes"] + figures["temporaries_bytes"]
                            + figures["generated_code_bytes"])
    figures["peak_bytes"] = max(figures["sum_bytes"], figures["xla_peak_bytes"] or 0)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of one dict on older JAX
    figures["flops"] = float(cost.get("flops", 0.0)) if cost else None
    figures["bytes_accessed"] = float(cost.get("bytes accessed", 0.0)) if cost else None
    figures["transcendentals"] = float(cost.get("transcendentals", 0.0)) if cost else None
    return figures


def compile_jitted(jitted, *args, platform):
    """(compiled, trace+lower seconds, compile seconds); an out-of-memory compile is a CompileError."""
    start = time.perf_counter()
    # implementation=None picks the target's kernels. The context is read while tracing, which
    # jit's cache does not key on: callers pass a jit made for this compile (never one traced
    # before), so the trace cannot come from a cache.
    with attention.compiling_for(platform):
        lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as error:
        text = str(error)
        if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
            detail = next((line.strip() for line in text.splitlines() if "memory" in line.lower()), text[:200])
            raise CompileError(f"the program does not fit in device memory ({detail}); {_FIT_HINT}") from None
        raise
    return compiled, lowered_at - start, time.perf_counter() - lowered_at


def compile_train_step(config: TrainConfig, mesh) -> dict:
    """Compile ``train_step`` (AdamW, donated state) and ``eval_step`` for ``mesh``'s devices;
    returns the report: per-device memory and cost of each, compile times, and whether the
    training step's peak fits the device's HBM."""
    devices = list(mesh.devices.flat)
    platform = devices[0].platform
    graphdef, abstract_state = _abstract_model(config)
    state = abstract_train_state(config, mesh)
    batch = abstract_batch(config, mesh)
    optimizer = make_optimizer(config)
    train_fn = jax.jit(functools.partial(
        train_step, graphdef=graphdef, abstract_state=abstract_state, optimizer=optimizer,
        z_loss=config.z_loss, grad_accum_steps=config.grad_accum_steps), donate_argnums=(0, 1, 2))
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, abstract_state=abstract_state))
    report = {"device_kind": devices[0].device_kind, "platform": platform,
              "num_devices": len(devices), "mesh": dict(mesh.shape),
              "parameters": count_parameters(config.model),
              "attention_implementation": _implementation_for(config, platform),
              "batch_size": config.data.batch_size, "seq_len": config.data.seq_len,
              "grad_accum_steps": config.grad_accum_steps}
    with jax.set_mesh(mesh):  # the kernels' shard_map reads the context mesh
        for name, fn, args in (("train_step", train_fn, (state["params"], state["opt_state"], state["step"], batch)),
                               ("eval_step", eval_fn, (state["params"], batch))):
            compiled, lower_seconds, compile_seconds = compile_jitted(fn, *args, platform=platform)
            report[name] = {**compiled_figures(compiled), "lower_seconds": lower_seconds,
                            "compile_seconds": compile_seconds,
                            "tpu_custom_calls": compiled.as_text().count('custom_call_target="tpu_custom_call"')}
    tokens = config.data.batch_size * config.data.seq_len
    # The loop's analytic count (6 N + 12 L T D per token), per device, for comparison.
    report["train_step"]["analytic_flops"] = flops_per_token(config) * tokens / len(devices)
    report["hbm_per_device_bytes"] = hbm_per_device(devices)
    report["fits"] = (None if report["hbm_per_device_bytes"] is None
                      else report["train_step"]["peak_bytes"] <= report["hbm_per_device_bytes"])
    return report


def _implementation_for(config: TrainConfig, platform: str) -> str:
    chosen = config.model.attention.implementation
    if chosen is None:
        return attention.default_implementation(platform)
    return ",".join(chosen) if isinstance(chosen, (tuple, list)) else chosen


def fit_error(report: dict) -> str | None:
    """One line saying the training step does not fit the device's HBM, or None."""
    if report["fits"] is not False:
        return None
    need, have = report["train_step"]["peak_bytes"] / GIB, report["hbm_per_device_bytes"] / GIB
    return (f"the training step needs {need:.2f} GiB per device but a {report['device_kind']} device "
            f"has {have:.0f} GiB of HBM; {_FIT_HINT}")


def _size(n) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _flops(n) -> str:
    return f"{n / 1e12:.3f} TFLOP" if n >= 1e11 else f"{n / 1e9:.3f} GFLOP"


def format_report(report: dict) -> list[str]:
    """The report as printable lines (per device)."""
    lines = [f"{report['num_devices']} x {report['device_kind']} devices, mesh {report['mesh']}, "
             f"{report['parameters']:,} parameters, attention {report['attention_implementation']}, "
             f"batch {report['batch_size']} x {report['seq_len']}"]
    for name in ("train_step", "eval_step"):
        f = report[name]
        xla_peak = "n/a" if f["xla_peak_bytes"] is None else _size(f["xla_peak_bytes"])
        lines.append(
            f"{name} per device: arguments {_size(f['arguments_bytes'])}, outputs "
            f"{_size(f['outputs_bytes'])} (aliased to arguments {_size(f['aliased_bytes'])}), temporaries "
            f"{_size(f['temporaries_bytes'])}, generated code {_size(f['generated_code_bytes'])}; "
            f"peak {_size(f['peak_bytes'])} (XLA peak_memory_in_bytes {xla_peak}, sum {_size(f['sum_bytes'])}); "
            f"{_flops(f['flops'] or 0)}, {_size(f['bytes_accessed'] or 0)} accessed (cost_analysis); "
            f"{f['tpu_custom_calls']} Pallas TPU kernel calls; traced in {f['lower_seconds']:.1f} s, "
            f"compiled in {f['compile_seconds']:.1f} s")
    lines.append(f"train_step analytic 6N + 12LTD per device: {_flops(report['train_step']['analytic_flops'])}")
    hbm = report["hbm_per_device_bytes"]
    lines.append("HBM per device: unknown for this device kind" if hbm is None else
                 f"HBM per device {_size(hbm)}: the training step "
                 f"{'fits' if report['fits'] else 'does NOT fit'} "
                 f"(peak = {report['train_step']['peak_bytes'] / hbm:.1%} of it)")
    return lines
