"""train_and_evaluate and train/main.py: learning, files, exact resume, sharding, bad input."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from runway_jax.config import model_preset
from runway_jax.data import DataConfig
from runway_jax.training import TrainConfig, train_and_evaluate
from runway_jax.training.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny(**overrides):
    fields = dict(model=model_preset("tiny"), data=DataConfig(source="recall", seq_len=48, batch_size=8,
                                                              recall_pairs=8, recall_queries=8),
                  steps=12, log_every=1, eval_every=6, eval_batches=2, checkpoint_every=4,
                  warmup_steps=2, lr=3e-3)
    fields.update(overrides)
    return TrainConfig(**fields)


def losses_of(workdir):
    """The last logged training loss of every step in metrics.jsonl."""
    by_step = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            by_step[record["step"]] = record["loss"]
    return [by_step[s] for s in sorted(by_step)]


def test_tiny_run_learns_and_writes_its_files(tmp_path):
    config = tiny(steps=40, eval_every=20, checkpoint_every=20)
    result = train_and_evaluate(config, str(tmp_path), log=lambda *_: None)
    assert result["final_step"] == 40
    assert np.mean(result["losses"][-5:]) < np.mean(result["losses"][:5]) - 0.5
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert {"step", "loss", "learning_rate", "tokens_per_second"} <= set(train_records[0])
    assert any("validation_loss" in r for r in records)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["rewire"] is True
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "40"]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_sigterm_saves_and_the_resumed_run_is_bitwise_identical(tmp_path):
    config = tiny()
    train_and_evaluate(config, str(tmp_path / "straight"), log=lambda *_: None)

    def preempt_at_step_6(message):
        if message.startswith("step      6/"):
            os.kill(os.getpid(), signal.SIGTERM)

    first = train_and_evaluate(config, str(tmp_path / "resumed"), log=preempt_at_step_6)
    assert first["stopped_by"] == "SIGTERM" and first["final_step"] == 6
    assert "6" in os.listdir(tmp_path / "resumed" / "checkpoints")
    second = train_and_evaluate(config, str(tmp_path / "resumed"), log=lambda *_: None)
    assert second["final_step"] == 12 and len(second["losses"]) == 6
    assert losses_of(tmp_path / "resumed") == losses_of(tmp_path / "straight")  # bitwise


@pytest.mark.slow
def test_sigkill_and_restart_reproduces_the_losses(tmp_path):
    """A real process killed with SIGKILL mid-run, restarted in the same workdir."""
    flags = ["--preset=tiny", "--source=recall", "--seq_len=48", "--batch_size=8", "--recall_pairs=8",
             "--steps=24", "--log_every=1", "--checkpoint_every=4", "--eval_every=100"]
    command = [sys.executable, str(ROOT / "train" / "main.py")]
    subprocess.run(command + flags + [f"--workdir={tmp_path / 'straight'}"], check=True,
                   capture_output=True, timeout=600)
    workdir = tmp_path / "killed"
    process = subprocess.Popen(command + flags + [f"--workdir={workdir}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "12").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (workdir / "checkpoints" / "12").is_dir()
    subprocess.run(command + flags + [f"--workdir={workdir}"], check=True, capture_output=True, timeout=600)
    assert losses_of(workdir) == losses_of(tmp_path / "straight")


def test_data_by_fsdp_mesh_over_8_devices_matches_one_device(tmp_path):
    config = tiny(steps=4, checkpoint_every=100, eval_every=100)
    one = train_and_evaluate(config.replace(mesh_data=1), str(tmp_path / "one"),
                             devices=jax.devices()[:1], log=lambda *_: None)
    eight = train_and_evaluate(config.replace(mesh_data=4, mesh_fsdp=2), str(tmp_path / "eight"),
                               log=lambda *_: None)
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-5)


def test_fsdp_shards_the_optimizer_state_as_the_parameters():
    """Adam's moments are sharded like their parameters (FSDP memory), counts are replicated; a
    bare jax.jit(optimizer.init) would leave the moments whole on every device."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from runway_jax.model import TransformerLM
    from runway_jax.sharding import state_shardings
    from runway_jax.training.loop import make_mesh
    from runway_jax.training.optimizer import make_optimizer, optimizer_state_shardings

    config = tiny(mesh_data=1, mesh_fsdp=8)
    mesh = make_mesh(config)
    state = nnx.state(TransformerLM(config.model, rngs=nnx.Rngs(0)))
    params = jax.device_put(nnx.to_pure_dict(state), nnx.to_pure_dict(state_shardings(state, mesh)))
    optimizer = make_optimizer(config)
    opt_state = jax.jit(optimizer.init, out_shardings=optimizer_state_shardings(optimizer, params, mesh))(params)
    moments = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
    param_leaves = jax.tree.leaves(params)
    assert len(moments) == 2 * len(param_leaves)  # mu and nu
    shardings = {(x.shape, x.sharding.spec) for x in param_leaves}
    assert {(x.shape, x.sharding.spec) for x in moments} == shardings
    assert any(x.addressable_shards[0].data.size < x.size for x in moments)  # really split
    scalars = [x for x in jax.tree.leaves(opt_state) if x.ndim == 0]
    assert scalars and all(x.sharding == NamedSharding(mesh, PartitionSpec()) for x in scalars)


def run_main(*flags):
    return subprocess.run([sys.executable, str(ROOT / "train" / "main.py"), *flags],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("flags,needle", [
    (["--stepz=3"], "did you mean --steps?"),
    (["--preset=smal"], "did you mean 'small'?"),
    (["--source=/no/such/file.jsonl"], "does not exist"),
    (["--preset=tiny", "--mesh_data=3"], "does not match the 8 devices"),
    (["--steps=0"], "--steps=0 must be a positive integer"),
    (["--beta=-1"], "beta=-1.0 is invalid"),
    (["--seq_len=1"], "seq_len=1 is too short"),
    (["--rewire=maybe"], "--rewire='maybe' is not a valid bool"),
    (["--steps=abc"], "--steps='abc' is not a valid int"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, flags, needle):
    result = run_main(*flags, f"--workdir={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_incompatible_and_corrupt_checkpoints_are_named(tmp_path):
    config = tiny(steps=8)
    train_and_evaluate(config, str(tmp_path), log=lambda *_: None)
    with pytest.raises(ConfigError, match="different model .*features"):
        train_and_evaluate(config.replace(model=model_preset("tiny", features=32, mlp_dim=96), steps=12),
                           str(tmp_path), log=lambda *_: None)
    for item in (tmp_path / "checkpoints" / "8" / "state").rglob("*"):
        if item.is_file() and item.stat().st_size > 0:
            item.write_bytes(item.read_bytes()[: item.stat().st_size // 2])
    from runway_jax.training.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="checkpoints/8 is corrupt or truncated.*resume from step 4"):
        train_and_evaluate(config.replace(steps=12), str(tmp_path), log=lambda *_: None)


def test_main_with_defaults_help_lists_flags():
    result = run_main("--help")
    listed = result.stdout.replace("-", "_")  # tyro shows --seq-len; both spellings are accepted
    assert result.returncode == 0 and all(f"__{name}" in listed for name in ("beta", "seq_len", "steps", "rewire"))
    # main.py's own flags, parsed before the config's, are documented too.
    assert "__preset=NAME" in listed and "gpt2_small" in listed and "__workdir=DIR" in listed


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from runway_jax.training.loop import NonFiniteLoss

    config = tiny(lr=1e9, warmup_steps=0, grad_clip=0.0, checkpoint_every=1, steps=30)
    with pytest.raises(NonFiniteLoss, match="the loss became (nan|inf) at step (\\d+)") as error:
        train_and_evaluate(config, str(tmp_path), log=lambda *_: None)
    bad_step = int(str(error.value).split("at step ")[1].split(";")[0])
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert saved and max(saved) == bad_step - 1  # every good step saved, the bad one never


@pytest.mark.slow
def test_two_processes_on_localhost_match_one_process(tmp_path):
    """A real multi-host run: two processes joined by jax.distributed.initialize (CPU, gloo), one
    device each, each reading only its block of every global batch."""
    import socket

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    flags = ["--preset=tiny", "--source=recall", "--seq_len=48", "--batch_size=8", "--recall_pairs=8",
             "--steps=6", "--log_every=1", "--checkpoint_every=3", "--eval_every=100"]
    command = [sys.executable, str(ROOT / "train" / "main.py"), *flags]
    environment = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    subprocess.run(command + [f"--workdir={tmp_path / 'one'}"], env=environment, check=True,
                   capture_output=True, timeout=600)
    hosts = [subprocess.Popen(command + [f"--workdir={tmp_path / 'two'}", "--distributed=true",
                                         f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                         f"--process_id={i}"],
                              env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [host.communicate(timeout=600)[0] for host in hosts]
    assert all(host.returncode == 0 for host in hosts), outputs[0][-2000:] + outputs[1][-2000:]
    assert "on 2 cpu device(s)" in outputs[0]
    np.testing.assert_allclose(losses_of(tmp_path / "two"), losses_of(tmp_path / "one"), rtol=2e-5)


def test_mfu_peak_comes_from_the_flag_or_the_device_kind():
    from types import SimpleNamespace

    from runway_jax.training.loop import flops_per_token, peak_flops_per_device

    assert peak_flops_per_device(tiny(), SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")) == 989e12
    assert peak_flops_per_device(tiny(), SimpleNamespace(device_kind="cpu")) is None
    assert peak_flops_per_device(tiny(peak_flops_per_device=5e12), SimpleNamespace(device_kind="cpu")) == 5e12
    config = tiny()
    from runway_jax.model import count_parameters
    assert flops_per_token(config) > 6 * count_parameters(config.model)
