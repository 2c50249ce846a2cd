"""``train_and_evaluate(config, workdir)``: sharded training with Orbax checkpoints and exact resume.

Files in ``workdir``: ``config.json`` (the resolved config), ``metrics.jsonl`` (one JSON object
per logged step and per validation, never two for one step) and the same scalars in
``tensorboard/``, ``checkpoints/`` (Orbax), ``tokenizer.json`` for BPE, and the lock, run
definition and history of :mod:`runway_jax.training.workdir`.
A second call on the same workdir resumes from the latest checkpoint: parameters, optimizer
state, step, RNG and the Grain iterator state come back, so the losses continue bitwise as if the
run had never stopped (on CPU). SIGTERM/SIGINT finish the current step, save and return with
``stopped_by`` set. A save that fails (disk full) is reported at the next step, before more work
depends on it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from runway_jax.data import check_vocabulary, make_dataset, make_tokenizer
from runway_jax.data.tokenizers import TOKENIZER_FILE
from runway_jax.model import TransformerLM, count_parameters
from runway_jax.sharding import state_shardings
from runway_jax.training.checkpoint import Checkpoints
from runway_jax.training.config import ConfigError, TrainConfig
from runway_jax.training.metrics import MetricsLog
from runway_jax.training.optimizer import learning_rate_schedule, make_optimizer, optimizer_state_shardings
from runway_jax.training.resources import check_memory, checkpoint_bytes
from runway_jax.training.steps import eval_step, train_step
from runway_jax.training.workdir import (check_free_disk, check_resume, open_workdir, record_start,
                                         saved_steps, tokenizer_fingerprint)


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or Inf loss; the last good checkpoint is kept."""


class StoppedBeforeTraining(Exception):
    """SIGINT/SIGTERM (the signal's name is ``args[0]``) arrived during start-up: nothing trained."""


def config_dict(config: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))  # tuples -> lists, as JSON


def make_mesh(config: TrainConfig, devices=None):
    """A (data, fsdp, model) mesh over ``devices``; the batch is sharded over data x fsdp."""
    devices = devices if devices is not None else jax.devices()
    inner = config.mesh_fsdp * config.mesh_model
    data = config.mesh_data if config.mesh_data != -1 else len(devices) // inner
    if data < 1 or data * inner != len(devices):
        raise ConfigError(f"the mesh --mesh_data={config.mesh_data} x --mesh_fsdp={config.mesh_fsdp} x "
                          f"--mesh_model={config.mesh_model} does not match the {len(devices)} devices.")
    if config.data.batch_size % (data * config.mesh_fsdp * config.grad_accum_steps):
        raise ConfigError(f"--batch_size={config.data.batch_size} must be divisible by the "
                          f"{data * config.mesh_fsdp} data-parallel devices x --grad_accum_steps="
                          f"{config.grad_accum_steps}.")
    return jax.make_mesh((data, config.mesh_fsdp, config.mesh_model), ("data", "fsdp", "model"),
                         axis_types=(AxisType.Auto,) * 3, devices=devices)


def flops_per_token(config: TrainConfig) -> float:
    """Training FLOPs per token: 6 N for the weights + 12 L T D for attention (forward+backward)."""
    model = config.model
    return 6 * count_parameters(model) + 12 * model.num_layers * config.data.seq_len * model.features


# Dense bf16 peak FLOP/s per chip, by jax.Device.device_kind prefix (vendors' data sheets).
PEAK_FLOPS = {"NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12,
              "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
              "TPU v4": 275e12}


def peak_flops_per_device(config: TrainConfig, device) -> float | None:
    """The flag's value, else the data-sheet peak of ``device``'s kind, else None (e.g. CPUs)."""
    if config.peak_flops_per_device:
        return config.peak_flops_per_device
    kind = getattr(device, "device_kind", "")
    return next((peak for prefix, peak in PEAK_FLOPS.items() if kind.startswith(prefix)), None)


class _Stop:
    """Remembers a SIGTERM/SIGINT so the loop can finish its step and save (preemption)."""

    def __init__(self):
        self.requested = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train_and_evaluate(config: TrainConfig, workdir: str, *, devices=None, log=print) -> dict:
    """Train ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns a summary.

    Every check runs before anything is written to ``workdir``: the workdir itself (a directory,
    writable, not locked by another run), the mesh, tokenizer and vocabulary, both data splits,
    the resume guard (the run must be defined as the saved one), the memory of the parameters
    and optimizer state, and the disk space of a checkpoint."""
    lock = jax.process_index() == 0  # one holder of the lock (and one writer) per workdir
    with _Stop() as stop, open_workdir(workdir, lock=lock) as opened:
        return _train(config, workdir, opened, stop, devices=devices, log=log)


def _train(config, workdir, opened, stop, *, devices, log):
    def check_stop():  # between start-up phases: a signal there stops before anything is written
        if stop.requested:
            raise StoppedBeforeTraining(stop.requested)

    writer = jax.process_index() == 0
    mesh = make_mesh(config, devices)
    resume_step = (saved_steps(workdir) or [None])[-1]
    # A fresh run trains its BPE anew (a tokenizer.json left by a failed start is not reused),
    # and keeps it only once every check passed.
    train_bpe = config.data.tokenizer == "bpe" and (
        resume_step is None or not os.path.isfile(os.path.join(workdir, TOKENIZER_FILE)))
    tokenizer = make_tokenizer(config.data, workdir, retrain=train_bpe)
    check_vocabulary(tokenizer, config.model.vocab_size)
    check_stop()
    process = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_data = make_dataset(config.data, "train", tokenizer, **process)
    make_dataset(config.data, "validation", tokenizer, **process)  # too few documents: fail now
    check_stop()
    saved_config = config_dict(config)
    fingerprint = tokenizer_fingerprint(tokenizer)
    changes = check_resume(workdir, saved_config, fingerprint) if resume_step is not None else {}
    check_memory(config, mesh)
    check_free_disk(workdir, checkpoint_bytes(config))
    check_stop()

    # Every check passed: from here on the workdir is written.
    if writer:
        if train_bpe:
            tokenizer.save()
        record_start(workdir, saved_config, fingerprint, resume_step or 0, changes)
        if changes:
            log("resuming with changes: " + ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changes.items()))

    # Model and optimizer, sharded by the parameters' logical axes.
    model = TransformerLM(config.model, rngs=nnx.Rngs(config.seed))
    graphdef, state = nnx.split(model)
    abstract_state = nnx.state(nnx.eval_shape(lambda: TransformerLM(config.model, rngs=nnx.Rngs(0))))
    param_shardings = nnx.to_pure_dict(state_shardings(state, mesh))
    # From host copies: every process holds the same initial values (same seed), and
    # device_put of host data is how a global array is built across processes.
    params = jax.device_put(jax.tree.map(np.asarray, nnx.to_pure_dict(state)), param_shardings)
    del model, state
    optimizer = make_optimizer(config)
    opt_state = jax.jit(optimizer.init, out_shardings=optimizer_state_shardings(optimizer, params, mesh))(params)
    train_state = {"params": params, "opt_state": opt_state, "step": jnp.int32(0),
                   "rng": jax.random.key_data(jax.random.key(config.seed))}
    replicated = NamedSharding(mesh, PartitionSpec())
    train_state = jax.tree.map(  # scalars such as Adam's count: replicated over the mesh too
        lambda x: x if getattr(x.sharding, "mesh", None) == mesh else jax.device_put(np.asarray(x), replicated),
        train_state)
    iterator = iter(train_data)

    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                              milestones=config.milestones)
    latest = checkpoints.latest_step()
    if latest is not None:
        shardings = jax.tree.map(lambda x: x.sharding, train_state)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                train_state)
        train_state, data_state = checkpoints.restore(latest, abstract, saved_config["model"])
        # Orbax may place restored scalars on one device; put everything where training expects it.
        train_state = jax.device_put(train_state, shardings)
        iterator.set_state(data_state)
        log(f"resumed from {checkpoints.directory}/{latest}")
    start_step = int(train_state["step"])
    metrics_log = MetricsLog(workdir, start_step=start_step, enabled=writer)
    opened.keep = True  # the workdir now holds this run's files: never removed on failure

    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    step_fn = jax.jit(functools.partial(
        train_step, graphdef=graphdef, abstract_state=abstract_state, optimizer=optimizer,
        z_loss=config.z_loss, grad_accum_steps=config.grad_accum_steps), donate_argnums=(0, 1, 2))
    evaluate_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, abstract_state=abstract_state))
    schedule = learning_rate_schedule(config)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops = flops_per_token(config)
    peak = peak_flops_per_device(config, mesh.devices.flat[0])

    def to_global(batch):
        return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}

    def validate(step):
        data = make_dataset(config.data, "validation", tokenizer, **process)
        total, tokens = 0.0, 0.0
        for batch, _ in zip(data, range(config.eval_batches)):
            metrics = jax.device_get(evaluate_fn(train_state["params"], to_global(batch)))
            total += float(metrics["loss"]) * float(metrics["tokens"])
            tokens += float(metrics["tokens"])
        loss = total / max(tokens, 1.0)
        record = {"step": step, "validation_loss": loss, "validation_perplexity": math.exp(min(loss, 50))}
        metrics_log.write(record)
        log(f"step {step:6d}  validation loss {loss:.4f}  perplexity {record['validation_perplexity']:.2f}")
        return record

    def save(step):
        checkpoints.save(step, train_state, iterator.get_state(), saved_config)

    log(f"training {'rewired' if config.model.rewire else 'baseline'} model "
        f"({count_parameters(config.model):,} parameters) on {mesh.devices.size} "
        f"{jax.default_backend()} device(s), mesh {dict(mesh.shape)}, steps {start_step}..{config.steps}")
    losses, last_validation = [], None
    window_seconds, window_steps = 0.0, 0  # time in training steps only (not eval or saving)
    stop_reason = None
    with jax.set_mesh(mesh):
        for step in range(start_step, config.steps):
            step_start = time.perf_counter()
            batch = to_global(next(iterator))
            params, opt_state, step_count, metrics = step_fn(
                train_state["params"], train_state["opt_state"], train_state["step"], batch)
            loss = float(metrics["loss"])  # syncs every step: a bad loss is caught before any save
            if checkpoints.pending is not None:
                checkpoints.wait()  # the save overlapped this step; a failed one stops the run now
            if not math.isfinite(loss):
                checkpoints.wait()
                raise NonFiniteLoss(
                    f"the loss became {loss} at step {step + 1}; the last good checkpoint "
                    f"({checkpoints.latest_step()}) is kept; lower --lr or raise --warmup_steps.")
            train_state = {"params": params, "opt_state": opt_state, "step": step_count,
                           "rng": train_state["rng"]}
            losses.append(loss)
            window_seconds += time.perf_counter() - step_start
            window_steps += 1
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                rate = window_steps * tokens_per_step / window_seconds
                record = {"step": done, "loss": loss, "learning_rate": float(schedule(step)),
                          "tokens_per_second": rate, "grad_norm": float(metrics["grad_norm"])}
                if peak:
                    record["mfu"] = rate * flops / (peak * mesh.devices.size)
                metrics_log.write(record)
                eta = (config.steps - done) * window_seconds / window_steps
                mfu = f"  mfu {record['mfu']:.1%}" if "mfu" in record else ""
                log(f"step {done:6d}/{config.steps}  loss {loss:.4f}  lr {record['learning_rate']:.2e}  "
                    f"{rate:,.0f} tokens/s  {rate * flops / 1e12:.3f} TFLOP/s{mfu}  eta {_duration(eta)}")
                window_seconds, window_steps = 0.0, 0
            if done % config.eval_every == 0 or done == config.steps:
                last_validation = validate(done)
            if stop.requested:
                stop_reason = stop.requested
                save(done)
                log(f"{stop.requested}: saved step {done}, stopping")
                break
            if done % config.checkpoint_every == 0 or done == config.steps or done in config.milestones:
                save(done)
    if start_step >= config.steps:  # already trained: still report where the model stands
        log(f"the workdir is already at step {start_step} of {config.steps}; nothing to train")
        last_validation = metrics_log.validation_at(start_step) or validate(start_step)
    checkpoints.wait()
    checkpoints.close()
    metrics_log.close()
    return {"losses": losses, "final_step": int(train_state["step"]), "validation": last_validation,
            "stopped_by": stop_reason}


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
