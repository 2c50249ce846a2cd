"""The training workdir as a resource: checked, created and locked before any work, guarded on
resume, and removed again if a failed start created it and left nothing of use. No JAX here, so
programs run these checks before importing it.

Files kept here besides the training outputs (see :mod:`runway_jax.training.loop`):

  .lock                    held with ``fcntl.flock`` for the whole run (the holder's pid inside);
                           the OS releases it when the holder exits or crashes, so a stale file
                           is simply reclaimed. Readers (evaluation) need no lock.
  run_definition.json      what defines the run (model, tokenizer and its hash, seq_len, data
                           source); a resume that differs in any of it is refused.
  history.jsonl            one record per start: time, step, and the safe changes (more steps,
                           a new learning rate, ...) made on resume.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time

from runway_jax.config import flat_fields, nested_fields, with_defaults
from runway_jax.files import write_json, write_text

LOCK_FILE = ".lock"
DEFINITION_FILE = "run_definition.json"
HISTORY_FILE = "history.jsonl"
CONFIG_FILE = "config.json"

# DataConfig fields that define the run's data; the rest (batch_size, worker_count, ...) may change.
DEFINING_DATA_FIELDS = ("source", "validation_source", "text_field", "tokenizer", "seq_len", "packing")
SYNTHETIC_DATA_FIELDS = {"recall": ("recall_pairs", "recall_queries"),
                         "passkey": ("passkey_filler_chars", "passkey_digits")}


class WorkdirError(RuntimeError):
    """The workdir cannot be used (a file, not writable, in use, full, unreadable); one line."""


def check_workdir(path: str) -> None:
    """Fail unless ``path`` is, or can be created as, a writable directory. Writes nothing."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"--workdir={path} is a file, not a directory; choose another --workdir.")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise WorkdirError(f"--workdir={path} cannot be created: {existing} is a file; choose another --workdir.")
    # os.access alone is not enough: root passes it on read-only mounts.
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir={path} is not writable (no write permission on {existing}); "
                           "choose another --workdir or fix the permissions.")


def probe_write(directory: str) -> None:
    """Write and remove a small file in ``directory``: the one test that read-only file systems,
    quotas and permissions all fail."""
    try:
        descriptor, name = tempfile.mkstemp(dir=directory, prefix=".write-probe.")
        try:
            os.write(descriptor, b"probe")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
            os.remove(name)
    except OSError as error:
        raise WorkdirError(f"--workdir={directory} is not writable ({error.strerror or error}); "
                           "choose another --workdir or fix the file system.") from None


class Workdir:
    """An open workdir: ``created`` if this run made it; set ``keep`` once it holds real work."""

    def __init__(self, path: str, created: bool, locked: bool):
        self.path, self.created, self.locked, self.keep = path, created, locked, False


_OPEN: dict[str, Workdir] = {}  # workdirs this process holds (flock is per open file, not per process)


@contextlib.contextmanager
def open_workdir(path: str, *, lock: bool = True):
    """Check, create and (with ``lock``) lock ``path`` for the block. If the block fails and this
    call created the directory and nothing set ``keep``, the directory is removed again.
    Nested calls on the same path in one process share the first one's lock."""
    key = os.path.realpath(path)
    if key in _OPEN:
        yield _OPEN[key]
        return
    check_workdir(path)
    created = not os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise WorkdirError(f"--workdir={path} cannot be created ({error.strerror or error}); "
                           "choose another --workdir.") from None
    workdir = Workdir(path, created, lock)
    handle = None
    try:
        probe_write(path)
        handle = _lock(path) if lock else None
        _OPEN[key] = workdir
        yield workdir
    except BaseException:
        if created and lock and not workdir.keep:
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        _OPEN.pop(key, None)
        if handle is not None:
            handle.close()  # releases the flock


def _lock(path: str):
    lock_path = os.path.join(path, LOCK_FILE)
    # Not an atomic replace: the lock lives on this very file (inode), so it is opened in place.
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            handle.close()
            raise WorkdirError(f"cannot lock {lock_path} ({error.strerror}); choose another --workdir.") from None
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise WorkdirError(f"--workdir={path} is in use by another training run (pid {holder}); wait "
                           f"for it to finish or stop it (kill {holder}), or use another --workdir.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def read_json_file(path: str, what: str):
    """JSON from ``path``; a missing, unreadable or truncated file is a one-line error naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise WorkdirError(f"{path} ({what}) is not valid JSON (truncated? {error.msg} at line "
                           f"{error.lineno}); restore it, or start over in a new --workdir.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise WorkdirError(f"cannot read {path} ({what}): {getattr(error, 'strerror', None) or error}.") from None


def saved_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints (Orbax renames a step directory to its number only once
    it is fully written), without opening Orbax."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what the tokenizer is: "byte", or the bytes of its tokenizer.json / SentencePiece
    model, so that two tokenizers of the same vocabulary size still differ."""
    digest = hashlib.sha256()
    if hasattr(tokenizer, "tokenizer"):  # HuggingFace tokenizers
        digest.update(tokenizer.tokenizer.to_str().encode("utf-8"))
    elif hasattr(tokenizer, "processor"):  # SentencePiece
        digest.update(tokenizer.processor.serialized_model_proto())
    else:
        digest.update(str(getattr(tokenizer, "name", type(tokenizer).__name__)).encode("utf-8"))
    return digest.hexdigest()


def run_definition(config: dict, tokenizer_sha256: str | None) -> dict:
    """The fields of a resolved config (``config_dict``) that define a run, flat: ``model.*``
    (``model.attention.beta``, ...), the defining data fields, and the tokenizer's hash."""
    data = config["data"]
    definition = flat_fields(config["model"], "model.")
    names = DEFINING_DATA_FIELDS + SYNTHETIC_DATA_FIELDS.get(data["source"], ())
    definition.update({name: data[name] for name in names})
    if tokenizer_sha256 is not None:
        definition["tokenizer_sha256"] = tokenizer_sha256
    return definition


def check_resume(workdir: str, config: dict, tokenizer_sha256: str) -> dict:
    """Compare the run about to resume in ``workdir`` with the one saved there; raise a one-line
    error listing every defining field that differs (with both values); return the other changes
    ``{field: [saved, now]}``. Reads only."""
    from runway_jax.training.config import ConfigError

    saved_config = read_json_file(os.path.join(workdir, CONFIG_FILE), "the saved training config")
    # The saved model in today's layout (earlier versions saved the attention options flat);
    # fields added since the run was saved count at their defaults, which reproduce the models
    # saved before they existed (so a flag setting one otherwise is a change of model).
    saved_config = dict(saved_config, model=with_defaults(saved_config.get("model", {})))
    path = os.path.join(workdir, DEFINITION_FILE)
    # Workdirs from before run_definition.json: the definition from config.json, without the hash.
    saved = (_with_model_migrated(read_json_file(path, "what defines the run")) if os.path.isfile(path)
             else run_definition(saved_config, None))
    now = run_definition(config, tokenizer_sha256)
    differing = [name for name in sorted(set(saved) | set(now))
                 if name in saved and saved.get(name) != now.get(name)]
    if differing:
        shown = "; ".join(f"{name}: saved {saved.get(name)!r}, now {now.get(name)!r}" for name in differing)
        raise ConfigError(f"cannot resume {workdir}: it holds a run with a different model or data "
                          f"({shown}); pass the saved values or use a new --workdir.")
    return _changes(saved_config, config)


def _with_model_migrated(definition: dict) -> dict:
    """A saved run definition with its ``model.*`` entries in today's layout (``with_defaults``):
    older ones hold the attention options flat (``model.beta``) and lack the fields added since."""
    model = nested_fields({key.removeprefix("model."): value for key, value in definition.items()
                           if key.startswith("model.")})
    others = {key: value for key, value in definition.items() if not key.startswith("model.")}
    return {**others, **flat_fields(with_defaults(model), "model.")}


def _changes(saved, now, prefix=""):
    changes = {}
    for name in sorted(set(saved) | set(now)):
        old, new = saved.get(name), now.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            changes.update(_changes(old, new, f"{prefix}{name}."))
        elif old != new:
            changes[f"{prefix}{name}"] = [old, new]
    return changes


def record_start(workdir: str, config: dict, tokenizer_sha256: str, step: int, changes: dict) -> None:
    """Write config.json, run_definition.json and a history.jsonl record, each atomically."""
    write_json(os.path.join(workdir, CONFIG_FILE), config)
    write_json(os.path.join(workdir, DEFINITION_FILE), run_definition(config, tokenizer_sha256))
    path = os.path.join(workdir, HISTORY_FILE)
    previous = open(path, encoding="utf-8").read() if os.path.isfile(path) else ""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": "resume" if step else "start",
              "step": step, "pid": os.getpid(), "changed": changes}
    write_text(path, previous + json.dumps(record) + "\n")


def check_free_disk(workdir: str, needed_bytes: int) -> None:
    """Fail if the workdir's file system cannot hold one more checkpoint of ``needed_bytes``."""
    free = shutil.disk_usage(workdir).free
    if free < needed_bytes:
        raise WorkdirError(f"a checkpoint needs about {format_bytes(needed_bytes)} but the file system of "
                           f"--workdir={workdir} has {format_bytes(free)} free; free space or choose another --workdir.")


def host_memory_bytes() -> int | None:
    """Memory available to this process (MemAvailable of /proc/meminfo, else sysconf)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(count: int) -> str:
    """``count`` bytes as MiB or GiB, for messages."""
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"
