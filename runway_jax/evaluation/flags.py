"""The evaluation programs' flag checks, run before any model is loaded.

Every check raises :class:`FlagError`, whose one-line message names the flag, the bad value and
what to give instead; :func:`fail` prints it and returns exit code 2. No JAX here (nor anything
that imports it), so that a program can reject a typo in a second, before the slow imports, and
every workdir of ``--workdir`` and ``--compare`` is checked before the first model is evaluated.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
import tempfile

from runway_jax.training.workdir import saved_steps


class FlagError(ValueError):
    """A flag value that cannot work; the message names the flag and the fix."""


class _DefaultsShown(argparse.HelpFormatter):
    """``--help`` lines end with the default, where there is one to show."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return action.help
        return f"{action.help} (default: {action.default})"


class FlagParser(argparse.ArgumentParser):
    """``argparse`` with one-line errors (usage is in ``--help``) and no abbreviated flags, so that
    ``--length`` is not silently taken for ``--lengths``."""

    def __init__(self, description: str, **kwargs):
        super().__init__(description=description, allow_abbrev=False, formatter_class=_DefaultsShown, **kwargs)

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            known = [flag for action in self._actions for flag in action.option_strings]
            name = unknown[0].split("=", 1)[0]
            if not name.startswith("-"):
                self.error(f"unexpected argument {name!r}; flags are written --name=value")
            close = difflib.get_close_matches(name, known, n=1)
            self.error(f"unknown flag {name}" + (f"; did you mean {close[0]}?" if close else ""))
        return parsed

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parser(docstring: str, *, compare: bool = True,
           workdir_help: str = "training workdir to evaluate (train/main.py --workdir); "
                               "results go to WORKDIR/eval/", epilog: str | None = None) -> FlagParser:
    """The parser every evaluation program starts from: ``--workdir`` and ``--compare``."""
    flags = FlagParser(docstring.splitlines()[0], epilog=epilog)
    flags.add_argument("--workdir", required=True, help=workdir_help)
    if compare:
        flags.add_argument("--compare", nargs="*", default=[], metavar="OTHER_WORKDIR",
                           help="other training workdirs (e.g. the baseline) evaluated the same way and "
                                "drawn on the same plot")
    return flags


def fail(error: Exception) -> int:
    """Print ``error`` as the one-line message of a refused run; the exit code 2."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------
# Values


def integer(flag: str, value, *, low: int = 1, high: int | None = None) -> int:
    """``value`` (text or int) as an integer in ``[low, high]``."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise FlagError(f"{flag}={value!r} is not a whole number (it must be {_bounds(low, high)}).") from None
    if number < low or (high is not None and number > high):
        raise FlagError(f"{flag}={value} must be {_bounds(low, high)}.")
    return number


def _bounds(low, high):
    return f"in [{low}, {high}]" if high is not None else "positive" if low == 1 else f">= {low}"


def integers(flag: str, text, *, low: int = 1, high: int | None = None) -> list[int]:
    """A comma list of integers, each in ``[low, high]``."""
    values = [part for part in str(text).split(",") if part.strip()]
    if not values:
        raise FlagError(f"{flag}={text!r} is empty; give a comma list of integers, e.g. {flag}=1,2,4.")
    try:
        numbers = [int(part.strip()) for part in values]
    except ValueError:
        raise FlagError(f"{flag}={text!r} is not a comma list of integers, e.g. {flag}=1,2,4.") from None
    if any(number < low or (high is not None and number > high) for number in numbers):
        raise FlagError(f"{flag}={text!r}: every value must be {_bounds(low, high)}.")
    return numbers


def positive_floats(flag: str, text) -> list[float]:
    """A comma list of finite numbers > 0, e.g. multiples of the training length."""
    numbers = _floats(flag, text)
    if any(number <= 0 for number in numbers):
        raise FlagError(f"{flag}={text!r}: every value must be > 0, e.g. {flag}=1,2,4.")
    return numbers


def fractions(flag: str, text) -> list[float]:
    """A comma list of numbers in ``[0, 1]``, e.g. relative depths."""
    numbers = _floats(flag, text)
    if any(not 0.0 <= number <= 1.0 for number in numbers):
        raise FlagError(f"{flag}={text!r}: every value must be in [0, 1], e.g. {flag}=0,0.5,1.")
    return numbers


def choice(flag: str, value: str, choices) -> str:
    if value not in choices:
        raise FlagError(f"{flag}={value!r} is not one of {', '.join(choices)}.")
    return value


def _floats(flag, text):
    parts = [part.strip() for part in str(text).split(",")]
    if not any(parts):
        raise FlagError(f"{flag}={text!r} is empty; give a comma list of numbers, e.g. {flag}=1,2,4.")
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        raise FlagError(f"{flag}={text!r} is not a comma list of numbers, e.g. {flag}=1,2,4.") from None
    if not all(math.isfinite(number) for number in numbers):
        raise FlagError(f"{flag}={text!r}: every value must be a finite number.")
    return numbers


# ---------------------------------------------------------------------------------------------
# Workdirs


def trained_workdir(flag: str, path: str) -> dict:
    """The saved config (``config.json`` as a dict) of the trained run in ``path``: the directory
    exists and holds ``config.json`` and at least one finished checkpoint."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FlagError(f"{flag}={path!r} does not exist; give a training workdir (one with config.json "
                        "and checkpoints/, made by train/main.py --workdir).")
    if not os.path.isdir(path):
        raise FlagError(f"{flag}={path!r} is a file, not a training workdir (a directory with config.json).")
    if not os.path.isfile(config_path):
        raise FlagError(f"{flag}={path!r}: {config_path} does not exist; is it a training workdir "
                        "(train/main.py --workdir)?")
    try:
        with open(config_path) as handle:
            saved = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FlagError(f"{flag}={path!r}: {config_path} cannot be read ({error}); restore it or train "
                        "the run again.") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("data"), dict) or "seq_len" not in saved["data"]:
        raise FlagError(f"{flag}={path!r}: {config_path} is not a training config (no data.seq_len); "
                        "give a workdir made by train/main.py.")
    if not saved_steps(path):
        raise FlagError(f"{flag}={path!r} has no checkpoint yet; train first "
                        f"(train/main.py --workdir={path}).")
    return saved


def trained_workdirs(args) -> dict[str, dict]:
    """``{workdir: saved config}`` of ``--workdir`` and every ``--compare``, all checked before
    anything is evaluated."""
    configs = {args.workdir: trained_workdir("--workdir", args.workdir)}
    for other in getattr(args, "compare", []):
        configs.setdefault(other, trained_workdir("--compare", other))
    return configs


def at_least_one_token(flag: str, multiples, configs: dict[str, dict]) -> None:
    """Multiples of the training length must give a token or more in every workdir of
    ``configs`` (``{workdir: saved config}``; their training lengths can differ)."""
    for workdir, saved in configs.items():
        seq_len = saved["data"]["seq_len"]
        if int(min(multiples) * seq_len) < 1:
            raise FlagError(f"{flag}: {min(multiples):g} x the training length {seq_len} of {workdir} "
                            f"is under one token; give multiples >= {1 / seq_len:.3g}.")


def writable_output(workdir: str, name: str = "eval") -> str:
    """``WORKDIR/name``, after a probe write shows that it can be created and written (a read-only
    disk, a file in its place); nothing is left behind, the directory itself is made at write time."""
    out = os.path.join(workdir, name)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise FlagError(f"--workdir={workdir!r}: {out} is a file, so the results cannot be written there; "
                        "move it away.")
    existing = out
    while not os.path.isdir(existing):  # the nearest existing ancestor gets the probe
        if os.path.lexists(existing):
            raise FlagError(f"--workdir={workdir!r}: {existing} is a file, not a directory.")
        parent = os.path.dirname(os.path.abspath(existing))
        if parent == os.path.abspath(existing):
            break
        existing = parent
    try:
        descriptor, probe = tempfile.mkstemp(dir=existing, prefix=".write-probe-")
        os.close(descriptor)
        os.remove(probe)
    except OSError as error:
        raise FlagError(f"--workdir={workdir!r}: cannot write {out} ({error.strerror}); evaluate a "
                        "writable copy of the workdir.") from None
    return out
