"""Command-line flags for ``TrainConfig``, via tyro: every field of the training, model and data
configs is a flat flag (``--steps=``, ``--beta=``, ``--seq_len=``, ...).

tyro builds the flags from the dataclasses' types and defaults, so a new config field is a new
flag with no parsing code, and ``--help`` lists them all with their defaults. Around it: the
preset is chosen first (its values become the defaults), unknown flags get a one-line error with
the closest flag, ``true``/``false`` are accepted for booleans, and values are validated by the
config classes after parsing, so that a bad value is a one-line error too; a value of the wrong
type (``--steps=abc``) is found by parsing the flags one at a time and named in one line.

The model's attention options (``ModelConfig.attention``) are flags of their own, under their
flag names (``--beta=``, ``--attention_implementation=``; ``OPTION_FLAGS``), and a fallback order
of implementations is given comma-separated (``--attention_implementation=pallas_gpu,xla``) and
parsed here into the tuple the configs hold.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import io
import textwrap
import typing
from typing import Optional

import tyro

from runway_jax.attention_config import OPTION_FLAGS, AttentionOptions
from runway_jax.data import DataConfig
from runway_jax.training.config import ConfigError, TrainConfig, train_preset

_TYRO_OPTIONS = (tyro.conf.OmitArgPrefixes, tyro.conf.FlagConversionOff)


def flag_names() -> set[str]:
    """Every flag name: the training fields and the model's and data's, flattened as tyro does."""
    return set(_flags())


def flag_docs() -> dict[str, str]:
    """``{flag name: its --help text}`` (the docstring of its config field)."""
    return {name: doc for name, (_, doc) in _flags().items() if doc}


@functools.cache
def _flags() -> dict:
    """``{flag name: (type, help text)}`` of every flag."""
    flags = {}
    for name, hint, value, doc in _fields_as_flags(TrainConfig, TrainConfig()):
        if dataclasses.is_dataclass(value):  # the model's and the data's flags, unprefixed
            flags.update({inner: (inner_hint, inner_doc) for inner, inner_hint, _, inner_doc
                          in _fields_as_flags(type(value), value)})
        else:
            flags[name] = (hint, doc)
    return flags


def _fields_as_flags(config_type, config):
    """``(flag name, type, value, help text)`` of each field of ``config``, except that the
    attention options (``ModelConfig.attention``) stand in place of their field, one flag each."""
    hints, docs = typing.get_type_hints(config_type), field_docs(config_type)
    for field in dataclasses.fields(config_type):
        value = getattr(config, field.name)
        if isinstance(value, AttentionOptions):
            options = {name: rest for name, *rest in _fields_as_flags(AttentionOptions, value)}
            yield from ((flag, *options[option]) for flag, option in OPTION_FLAGS.items())
        else:
            yield field.name, hints[field.name], value, docs.get(field.name)


def _is_fallback_order(hint) -> bool:
    """A field that takes one name or a tuple of names tried in order (``implementation``)."""
    return tuple[str, ...] in typing.get_args(hint)


def _fallback_order(text: str | None):
    """``"pallas_gpu,xla"`` -> ``("pallas_gpu", "xla")``; one name (or None) stays as it is."""
    return tuple(text.split(",")) if text is not None and "," in text else text


def parse_flags(args: list[str], preset: str = "default",
                description: str = "Train a rewired (or baseline) language model.") -> TrainConfig:
    """``TrainConfig`` of ``preset`` with ``args`` (``--name=value`` flags) applied.

    ``description`` heads the ``--help`` text (a program lists its own flags there).

    tyro parses into unvalidated mirrors of the config classes; the real configs are built
    afterwards, so a bad value is reported by their own validation as a one-line error."""
    base = train_preset(preset)
    known = flag_names()
    normalized = []
    for arg in args:
        if arg.startswith("--") and arg not in ("--help", "-h"):
            name, separator, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean --{close[0]}?" if close else "; see --help"
                raise ConfigError(f"unknown flag --{name}{hint}")
            if value.lower() in ("true", "false"):
                value = value.capitalize()
            arg = f"--{name}={value}" if separator else f"--{name}"
        normalized.append(arg)
    mirror = _mirror(TrainConfig, base)
    if "--help" in normalized or "-h" in normalized:
        tyro.cli(mirror, args=normalized, config=_TYRO_OPTIONS, description=description)  # prints, exits 0
    try:
        parsed = _quiet_cli(mirror, normalized)
    except SystemExit:
        # tyro rejected a value (its own message is a multi-line box): find the flag alone.
        raise ConfigError(_wrong_type_message(mirror, normalized)) from None
    values = {field.name: getattr(parsed, field.name) for field in dataclasses.fields(parsed)}
    model_flags = {name: _fallback_order(value) if _is_fallback_order(_flags()[name][0]) else value
                   for name, value in dataclasses.asdict(values["model"]).items()}
    try:
        values["model"] = base.model.replace(**model_flags)  # the options by their flag names
        values["data"] = DataConfig(**dataclasses.asdict(values["data"]))
        return TrainConfig(**values)
    except ConfigError:
        raise
    except ValueError as error:  # ModelConfig / DataConfig validation
        raise ConfigError(str(error)) from None


def _quiet_cli(mirror, args):
    """tyro.cli without its own error printing (we print one line instead)."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return tyro.cli(mirror, args=args, config=_TYRO_OPTIONS, console_outputs=False)


def _wrong_type_message(mirror, args) -> str:
    types = {name: hint for name, (hint, _) in _flags().items()}
    for arg in args:
        if arg.startswith("--") and "=" in arg:
            try:
                _quiet_cli(mirror, [arg])
            except SystemExit:
                name, value = arg[2:].split("=", 1)
                expected = getattr(types.get(name), "__name__", None) or str(types.get(name))
                return f"--{name}={value!r} is not a valid {expected}; see --help."
    return f"the flags {' '.join(args)} do not parse; see --help."


def _mirror(config_type, default):
    """A frozen dataclass with ``config_type``'s flags (:func:`_fields_as_flags`) and types,
    ``default``'s values as defaults, and no validation; a fallback order is one string."""
    fields = []
    for name, hint, value, help_text in _fields_as_flags(config_type, default):
        if dataclasses.is_dataclass(value):
            nested = _mirror(type(value), value)
            fields.append((name, nested, dataclasses.field(default=nested())))
            continue
        if _is_fallback_order(hint):
            hint, value = Optional[str], ",".join(value) if isinstance(value, tuple) else value
        # The mirror has no source for tyro to read docstrings from: pass them on explicitly.
        hint = typing.Annotated[hint, tyro.conf.arg(help=help_text)] if help_text else hint
        fields.append((name, hint, dataclasses.field(default=value)))
    return dataclasses.make_dataclass(config_type.__name__, fields, frozen=True)


@functools.cache
def field_docs(config_type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal right after each field of a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(config_type)))
    body = tree.body[0].body
    docs = {}
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs
