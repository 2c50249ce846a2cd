"""Loading a training workdir: its config, tokenizer and the latest checkpoint's parameters."""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from runway_jax.config import ModelConfig, with_defaults
from runway_jax.data import DataConfig, make_tokenizer
from runway_jax.model import TransformerLM
from runway_jax.training.checkpoint import Checkpoints
from runway_jax.training.config import ConfigError, TrainConfig
from runway_jax.training.loop import config_dict
from runway_jax.training.optimizer import make_optimizer


def load_config(workdir: str) -> TrainConfig:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path} does not exist; is {workdir!r} a training workdir (train/main.py --workdir)?")
    try:
        with open(path) as handle:
            saved = json.load(handle)
        model = ModelConfig(**with_defaults(saved.pop("model")))  # older layouts migrated
        data = DataConfig(**saved.pop("data"))
        saved["milestones"] = tuple(saved.get("milestones", ()))
        return TrainConfig(model=model, data=data, **saved)
    except ConfigError:  # the config's own validation already names the field
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        # Cut short, edited, or written by another version: name the file, not a Python internal.
        raise ConfigError(f"{path} is not a readable training config ({type(error).__name__}: {error}); "
                          "restore it or train the run again.") from None


def load_trained(workdir: str):
    """``(model, config, tokenizer, step)`` of the latest checkpoint in ``workdir``."""
    config = load_config(workdir)
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    step = checkpoints.latest_step()
    if step is None:
        raise ConfigError(f"{workdir!r} has no checkpoint yet; train first (train/main.py --workdir={workdir}).")
    abstract_model = nnx.eval_shape(lambda: TransformerLM(config.model, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    params = nnx.to_pure_dict(abstract_state)
    opt_state = jax.eval_shape(make_optimizer(config).init, params)
    abstract = {"params": params, "opt_state": opt_state,
                "step": jax.ShapeDtypeStruct((), "int32"), "rng": jax.ShapeDtypeStruct((2,), "uint32")}
    state, _ = checkpoints.restore(step, abstract, config_dict(config)["model"])
    checkpoints.close()
    nnx.replace_by_pure_dict(abstract_state, state["params"])
    model = nnx.merge(graphdef, abstract_state)
    tokenizer = make_tokenizer(config.data, workdir)
    return model, config, tokenizer, step
