"""Training faults: nothing lost, ever (issue 17). Each case is a real call of the library or of
train/main.py (a subprocess where processes matter: the lock, SIGKILL, Ctrl-C), asserting the
exit code, a one-line message and that no work was lost or written where it should not be."""

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import pytest

from runway_jax.config import model_preset
from runway_jax.data import DataConfig, DataError
from runway_jax.training import TrainConfig, train_and_evaluate
from runway_jax.training.checkpoint import CheckpointError, clean_reason
from runway_jax.attention_config import AttentionOptions
from runway_jax.training.cli import field_docs, flag_docs, flag_names, parse_flags
from runway_jax.training.config import ConfigError
from runway_jax.training.workdir import WorkdirError

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "train" / "main.py")
ONE_DEVICE = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
STEPS = 12
# A tiny synthetic run: recall examples need no files and no tokenizer training.
FLAGS = ["--preset=tiny", "--source=recall", "--seq_len=32", "--batch_size=4", "--recall_pairs=4",
         "--recall_queries=4", "--log_every=1", "--checkpoint_every=2", "--eval_every=3",
         "--eval_batches=1", "--mesh_data=1"]
# In this process (8 CPU devices from conftest): the same run over all of them.
IN_PROCESS = [flag for flag in FLAGS if flag not in ("--mesh_data=1", "--batch_size=4")] + ["--batch_size=8"]


def quiet(*_):
    pass


def tiny(**overrides):
    fields = dict(model=model_preset("tiny"),
                  data=DataConfig(source="recall", seq_len=32, batch_size=4, recall_pairs=4, recall_queries=4),
                  steps=4, log_every=1, eval_every=4, eval_batches=1, checkpoint_every=2,
                  warmup_steps=1, mesh_data=1)
    fields.update(overrides)
    return TrainConfig(**fields)


def train(config, workdir):
    return train_and_evaluate(config, str(workdir), devices=jax.devices()[:1], log=quiet)


def snapshot(directory):
    """{relative path: sha256} of every file under ``directory``."""
    root = pathlib.Path(directory)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def records(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def run_main(argv):
    """``train/main.py``'s ``main(argv)`` in this process: ``(exit code, stdout, stderr)``."""
    sys.path.insert(0, str(ROOT / "train"))
    try:
        import main
    finally:
        sys.path.pop(0)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def subprocess_env(tmp_path_factory):
    """One CPU device and a persistent compilation cache shared by this file's training
    subprocesses: a run that is not killed compiles (and writes the cache), the restarts read it."""
    return {**ONE_DEVICE, "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture
def corpus(tmp_path):
    texts = [f"line {i} of document {d}: the quick brown fox. " * 20 for d in range(8) for i in range(2)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


# -- flags: one line, exit 2, before JAX is imported -------------------------------------------

BAD_FLAGS = [
    (["--bogus=1"], "unknown flag --bogus"),
    (["--lr=nan"], "--lr=nan must be a finite number"),
    (["--lr=inf"], "--lr=inf must be a finite number"),
    (["--lr=0"], "--lr=0.0 must be > 0"),
    (["--lr=-1"], "--lr=-1.0 must be >= 0"),
    (["--b2=1.5"], "--b2=1.5"),
    (["--rope_base=inf"], "rope_base=inf is invalid; use a positive finite number"),
    (["--attention_implementation=xla,triton"], "implementation=('xla', 'triton') is invalid"),
    (["--steps=abc"], "--steps='abc' is not a valid int"),
    (["--workdir=FILE"], "is a file, not a directory"),
    (["--workdir=FILE/sub"], "cannot be created"),
]


def test_bad_flags_and_workdirs_exit_2_with_one_line_before_jax_is_imported(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    cases = [[arg.replace("FILE", str(a_file)) for arg in flags] for flags, _ in BAD_FLAGS]
    cases = [case if any(a.startswith("--workdir") for a in case) else case + [f"--workdir={tmp_path / 'w'}"]
             for case in cases]
    program = (
        "import contextlib, io, json, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'train')!r})\n"
        "import main\n"
        "results = []\n"
        f"for argv in {cases!r}:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        code = main.main(argv)\n"
        "    results.append([code, err.getvalue(), 'jax' in sys.modules])\n"
        "print(json.dumps(results))\n")
    output = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert output.returncode == 0, output.stderr
    for (flags, needle), (code, stderr, jax_imported) in zip(BAD_FLAGS, json.loads(output.stdout)):
        assert code == 2 and needle in stderr and len(stderr.strip().splitlines()) == 1, (flags, stderr)
        assert not jax_imported, flags
    assert not (tmp_path / "w").exists()  # nothing created for a bad flag


def test_help_describes_every_flag():
    for config_type in (TrainConfig, type(model_preset("tiny")), DataConfig, AttentionOptions):
        undocumented = {f for f in config_type.__dataclass_fields__ if f not in ("model", "data")} - set(field_docs(config_type))
        assert not undocumented, (config_type.__name__, undocumented)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_flags(["--help"])
    text = " ".join(out.getvalue().replace("│", " ").split())
    docs = flag_docs()
    for name in flag_names():
        flag = "--" + name.replace("_", "-")
        where = text.find(flag + " ")
        # The flag, its metavar (e.g. "{None}|INT", "[INT [INT ...]]"), then its description.
        assert where >= 0 and docs[name][:12] in text[where: where + len(flag) + 40], (flag, text[where:][:80])


# -- the workdir lock --------------------------------------------------------------------------


def test_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path, subprocess_env):
    workdir = tmp_path / "w"
    first = subprocess.Popen([sys.executable, MAIN, *FLAGS, f"--steps={STEPS}", f"--workdir={workdir}"],
                             env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (workdir / "metrics.jsonl").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    start = time.time()
    second = subprocess.run([sys.executable, MAIN, *FLAGS, f"--steps={STEPS}", "--lr=1e-3", f"--workdir={workdir}"],
                            env=subprocess_env, capture_output=True, text=True, timeout=120)
    refused_after = time.time() - start
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and refused_after < 60
    assert "jax" not in second.stderr  # refused before JAX started
    train_steps = [r["step"] for r in records(workdir) if "loss" in r]
    assert train_steps == list(range(1, STEPS + 1))  # one run's records, one per step


# -- SIGKILL at random moments: one record per step, bitwise the same losses -------------------


def test_sigkill_at_random_moments_loses_nothing_and_duplicates_nothing(tmp_path, subprocess_env):
    flags = [*FLAGS, f"--steps={STEPS}"]

    def command(workdir):
        return [sys.executable, MAIN, *flags, f"--workdir={workdir}"]

    subprocess.run(command(tmp_path / "straight"), env=subprocess_env, check=True, capture_output=True,
                   timeout=300)
    workdir = tmp_path / "killed"
    chooser = random.Random(17)
    kills = 0
    while kills < 3:
        reached = max([r["step"] for r in records(workdir)] if (workdir / "metrics.jsonl").exists() else [0])
        target = chooser.randint(reached + 1, min(STEPS - 1, reached + 3))
        process = subprocess.Popen(command(workdir), env=subprocess_env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while process.poll() is None and time.time() < deadline:
            log = workdir / "metrics.jsonl"
            if log.exists() and any(line.startswith(f'{{"step": {target},') for line in log.read_text().splitlines()):
                break
            time.sleep(0.02)
        time.sleep(chooser.uniform(0, 0.3))
        if process.poll() is not None:
            break  # finished before the kill
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    finished = subprocess.run(command(workdir), env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert kills == 3
    logged, straight = records(workdir), records(tmp_path / "straight")
    train_steps = [r["step"] for r in logged if "loss" in r]
    validation_steps = [r["step"] for r in logged if "validation_loss" in r]
    assert train_steps == list(range(1, STEPS + 1))
    assert validation_steps == [3, 6, 9, 12]
    losses = [(r["step"], r.get("loss"), r.get("validation_loss")) for r in logged]
    assert losses == [(r["step"], r.get("loss"), r.get("validation_loss")) for r in straight]  # bitwise
    history = [json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines()]
    assert len(history) == 4 and history[0]["event"] == "start" and history[-1]["event"] == "resume"


# -- the resume guard --------------------------------------------------------------------------


def test_resume_refuses_a_different_run_and_writes_nothing(tmp_path, corpus):
    data = DataConfig(source=str(corpus), validation_source=str(corpus), seq_len=32, batch_size=4)
    config = tiny(data=data, model=model_preset("tiny", vocab_size=300))
    train(config, tmp_path)
    before = snapshot(tmp_path)
    # Byte -> BPE with the same vocabulary size, another seq_len, another depth: all named at once.
    other = config.replace(steps=6, model=model_preset("tiny", vocab_size=300, num_layers=3),
                           data=dataclasses.replace(data, tokenizer="bpe", bpe_vocab_size=259, seq_len=16))
    with pytest.raises(ConfigError) as error:
        train(other, tmp_path)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    for needle in ("model.num_layers: saved 2, now 3", "seq_len: saved 32, now 16",
                   "tokenizer: saved 'byte', now 'bpe'", "tokenizer_sha256: saved"):
        assert needle in message, message
    assert snapshot(tmp_path) == before  # config.json, tokenizer.json, metrics: untouched

    # Safe changes resume, and are recorded.
    result = train(config.replace(steps=6, lr=1e-3, eval_every=3), tmp_path)
    assert result["final_step"] == 6
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 4 and history[-1]["changed"] == {
        "eval_every": [4, 3], "lr": [0.003, 0.001], "steps": [4, 6]}
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 6


def test_truncated_config_and_checkpoint_errors_name_the_file_in_one_line(tmp_path):
    train(tiny(), tmp_path)
    config_json = tmp_path / "config.json"
    text = config_json.read_text()
    config_json.write_text(text[: len(text) // 2])
    with pytest.raises(WorkdirError, match=re.escape(str(config_json)) + r" .*is not valid JSON"):
        train(tiny(steps=6), tmp_path)
    config_json.write_text(text)
    for item in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
        if item.is_file() and item.stat().st_size > 0:
            item.write_bytes(item.read_bytes()[: item.stat().st_size // 2])
    with pytest.raises(CheckpointError) as error:
        train(tiny(steps=6), tmp_path)
    message = str(error.value)
    assert "checkpoints/4 is corrupt or truncated" in message and "resume from step 2" in message
    assert "<bound method" not in message and " at 0x" not in message and len(message.splitlines()) == 1


def test_clean_reason_drops_binding_reprs():
    error = ValueError("DATA_LOSS: Error reading <bound method PyCapsule.read of <pybind11_object at "
                       "0x7f00>> from file\nsecond line")
    assert clean_reason(error) == "DATA_LOSS: Error reading from file"
    assert clean_reason(OSError(28, "No space left on device")) == "No space left on device"


# -- checks before training: nothing written, no workdir left behind ---------------------------


def test_too_few_documents_fails_before_training_and_leaves_no_workdir(tmp_path):
    one_document = tmp_path / "mycorpus.txt"
    one_document.write_text("To be, or not to be, that is the question. " * 200)
    workdir = tmp_path / "new"
    config = tiny(data=DataConfig(source=str(one_document), seq_len=32, batch_size=4), steps=20)
    with pytest.raises(DataError, match="too few documents for a validation split"):
        train(config, workdir)
    assert not workdir.exists()
    with pytest.raises(DataError, match="is a directory; pass the files in it"):
        train(config.replace(data=DataConfig(source=str(tmp_path), seq_len=32, batch_size=4)), workdir)
    assert not workdir.exists()


def test_too_large_bpe_then_the_suggested_fix_works(tmp_path, corpus):
    workdir = tmp_path / "w"
    workdir.mkdir()  # made by the user: kept, but nothing is written into it by a failed start
    data = DataConfig(source=str(corpus), validation_source=str(corpus), seq_len=32, batch_size=4,
                      tokenizer="bpe", bpe_vocab_size=300)
    small_model = model_preset("tiny", vocab_size=260)
    with pytest.raises(DataError, match=r"has 2\d\d tokens but the model's vocab_size is 260; set the model's vocab_size >= "):
        train(tiny(data=data, steps=1, model=small_model), workdir)
    assert list(workdir.iterdir()) == [workdir / ".lock"]
    # The other fix, a smaller BPE: trained anew, not the larger one of the failed start.
    result = train(tiny(data=dataclasses.replace(data, bpe_vocab_size=260), steps=1, model=small_model), workdir)
    assert result["final_step"] == 1
    assert len(json.loads((workdir / "tokenizer.json").read_text())["model"]["vocab"]) <= 260


def test_a_model_too_large_for_memory_is_refused_before_allocating(tmp_path):
    workdir = tmp_path / "w"
    code, out, err = run_main([*IN_PROCESS, "--vocab_size=4000000000", f"--workdir={workdir}"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"parameters and AdamW state need [\d.]+ GiB, you have [\d.]+ GiB", err), err
    assert not workdir.exists()


def test_not_enough_disk_for_a_checkpoint_is_refused(tmp_path, monkeypatch):
    import shutil

    from runway_jax.training import workdir as workdir_module

    monkeypatch.setattr(workdir_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 1000))
    with pytest.raises(WorkdirError, match="a checkpoint needs about .* MiB but the file system .* has 0.0 MiB free"):
        train(tiny(), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_unwritable_workdir_is_refused(tmp_path, monkeypatch):
    from runway_jax.training import workdir as workdir_module

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    # As root, chmod does not stop writes; a read-only mount is what the probe write detects.
    monkeypatch.setattr(workdir_module.tempfile, "mkstemp", read_only)
    (tmp_path / "w").mkdir()
    code, _, err = run_main([*IN_PROCESS, f"--workdir={tmp_path / 'w'}"])
    assert code == 2 and "is not writable (Read-only file system)" in err and len(err.strip().splitlines()) == 1


# -- faults during training --------------------------------------------------------------------


def test_a_failed_checkpoint_save_stops_the_run_at_once(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def disk_full(self):
        raise RuntimeError("RESOURCE_EXHAUSTED: writing <bound method Writer.write of <pybind11_object "
                           "at 0x7f1234>>: No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", disk_full)
    code, _, err = run_main([*IN_PROCESS, "--steps=8", f"--workdir={tmp_path}"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "saving checkpoint 2 " in err and "failed (RESOURCE_EXHAUSTED: writing : No space left" in err, err
    # Stopped in the step after the save (the one the save overlapped), before logging it.
    assert max(r["step"] for r in records(tmp_path)) == 2


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_and_exits_with_its_own_code(tmp_path, signum, code):
    log = tmp_path / "metrics.jsonl"

    def send_at_step_4():  # a validation ran at step 3, none at the step the run stops at
        deadline = time.time() + 240
        while time.time() < deadline:
            if log.exists() and '"step": 4,' in log.read_text():
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.01)

    sender = threading.Thread(target=send_at_step_4)
    sender.start()
    exit_code, out, err = run_main([*IN_PROCESS, "--steps=40", f"--workdir={tmp_path}"])
    sender.join()
    assert exit_code == code, err
    stopped = max(r["step"] for r in records(tmp_path))
    assert str(stopped) in os.listdir(tmp_path / "checkpoints")
    summary = out.strip().splitlines()[-1]
    assert summary.startswith(f"no validation at step {stopped} (stopped by {signal.Signals(signum).name}")
    assert "the last one, at step 3, had perplexity" in summary


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    workdir = tmp_path / "w"
    process = subprocess.Popen([sys.executable, MAIN, *FLAGS, f"--workdir={workdir}"], env=ONE_DEVICE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # importing JAX and building the run take longer
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
    assert not workdir.exists() or "stopped by SIGINT" in out
