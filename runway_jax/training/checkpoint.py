"""Orbax checkpoints of a training run: train state, Grain iterator state and the config.

A step directory holds three items: ``state`` (parameters, optimizer state, step, RNG key data;
sharded arrays), ``data`` (the Grain iterator state, JSON) and ``config`` (the resolved
``TrainConfig``, JSON). Orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact; saves are asynchronous.
"""

from __future__ import annotations

import os
import re

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from runway_jax.config import flat_fields, with_defaults
from runway_jax.training.config import ConfigError


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and what to do."""


class Checkpoints:
    def __init__(self, directory: str, *, keep: int, milestones=()):
        policies = [checkpoint_managers.LatestN(n=keep)]
        if milestones:
            policies.append(checkpoint_managers.CustomSteps(steps=list(milestones)))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=True, create=True)
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.pending = None  # the step being saved in the background

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self):
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, config: dict):
        """Start saving ``step`` (asynchronously); a failure to start is a :class:`CheckpointError`.
        Call :meth:`wait` before more work depends on it: it reports a failed write."""
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config)))
        except Exception as error:
            raise CheckpointError(self._failed_save(step, error)) from None
        self.pending = step

    def saved_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore(self, step: int, abstract_state, model_config: dict):
        """``(state, data_state)`` of ``step``; the saved model config must equal ``model_config``."""
        path = os.path.join(self.directory, str(step))
        try:
            saved = self.saved_config(step)
        except Exception as error:
            raise CheckpointError(self._corrupt(step, path, error)) from None
        # Older checkpoints' model configs in today's layout; fields added since at their
        # (old-model) defaults.
        saved_model, now = flat_fields(with_defaults(saved.get("model", {}))), flat_fields(model_config)
        if saved_model != now:
            differences = sorted(k for k in set(saved_model) | set(now) if saved_model.get(k) != now.get(k))
            shown = ", ".join(f"{k}: saved {saved_model.get(k)!r} vs now {now.get(k)!r}"
                              for k in differences[:4])
            raise ConfigError(f"the checkpoint {path} was trained with a different model ({shown}); "
                              "use a new --workdir or the same model flags.")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as error:
            raise CheckpointError(self._corrupt(step, path, error)) from None
        return restored["state"], restored["data"]

    def _corrupt(self, step, path, error):
        earlier = [s for s in self.all_steps() if s < step]
        offer = (f"delete it to resume from step {earlier[-1]}: rm -r {path}" if earlier
                 else f"delete it to start over: rm -r {path}")
        return f"the checkpoint {path} is corrupt or truncated ({clean_reason(error)}); {offer}"

    def _failed_save(self, step, error):
        done = [s for s in self.all_steps() if s != step]
        kept = f"the last complete checkpoint is step {done[-1]}" if done else "no checkpoint is complete"
        return (f"saving checkpoint {step} in {self.directory} failed ({clean_reason(error)}); {kept}; "
                "free disk space (or fix the file system) and rerun to resume.")

    def wait(self):
        """Block until the background save is written; a failed one is a :class:`CheckpointError`."""
        step, self.pending = self.pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise CheckpointError(self._failed_save(step, error)) from None

    def close(self):
        self.manager.close()


_BRACKETED = re.compile(r"<[^<>]*>")
_REPR = re.compile(r"<(bound method|built-in method|function|method|pybind11)\b")


def clean_reason(error: BaseException) -> str:
    """A one-line reason from an exception: its first line, without the ``<bound method ...>`` /
    ``<... object at 0x...>`` reprs that tensorstore and pybind11 put in their messages."""
    text, previous = str(error), None
    while text != previous:  # innermost first: "<bound method f of <x object at 0x...>>"
        previous, text = text, _BRACKETED.sub(
            lambda m: "" if _REPR.match(m.group(0)) or " at 0x" in m.group(0) else m.group(0), text)
    lines = [line.strip(" :,;") for line in text.splitlines() if line.strip(" :,;")]
    if not lines:
        return type(error).__name__
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return re.sub(r"\s+", " ", lines[0])[:160]
