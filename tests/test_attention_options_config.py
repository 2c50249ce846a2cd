"""The attention options as one dataclass (issue 15): each field of ``AttentionOptions`` is a
flag, reaches every layer's ``AttentionConfig`` through ``ModelConfig.attention_config``, and
round-trips through ``config.json`` and the resume guard; workdirs saved with the options flat
(every workdir before the options were composed) still load, resume and refuse a changed
option; a fallback order is parsed at the command line into the tuple the layer passes on.

The per-field checks iterate the dataclass, so an option added later is covered unedited."""

import dataclasses
import json
import types
import typing

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from runway_jax import attention, attention_config
from runway_jax.attention_config import OPTION_FLAGS, AttentionConfig, AttentionOptions
from runway_jax.attention_layer import RewiredMultiHeadAttention
from runway_jax.config import ModelConfig, flat_fields, model_preset, nested_fields, with_defaults
from runway_jax.data import DataConfig
from runway_jax.evaluation.workdirs import load_config
from runway_jax.model import TransformerLM
from runway_jax.training import TrainConfig, train_and_evaluate
from runway_jax.training.cli import flag_names, parse_flags
from runway_jax.training.config import ConfigError
from runway_jax.training.loop import config_dict
from runway_jax.training.workdir import check_resume, record_start

FLAG_OF = {option: flag for flag, option in OPTION_FLAGS.items()}
# One key/value head: valid with runway_key "own" (it divides the 3 attending heads) and "group".
BASE_FLAGS = ["--num_kv_heads=1"]


def _has_type(value, hint) -> bool:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = typing.get_args(hint) if union else (hint,)
    return any(type(value) is (typing.get_origin(kind) or kind) for kind in allowed)


def changed_value(field: dataclasses.Field):
    """A valid value of the option other than its default, found among candidates of its type
    (the names the options accept included), so that a new option needs no edit here."""
    hint = typing.get_type_hints(AttentionOptions)[field.name]
    names = [name for value in vars(attention_config).values()
             if isinstance(value, tuple) and value and all(isinstance(n, str) for n in value)
             for name in value]
    for candidate in (True, False, 3, 0.5, 2.5, *names, ("xla", "reference")):
        if candidate == field.default or not _has_type(candidate, hint):
            continue
        try:
            model_preset("tiny", num_kv_heads=1, **{FLAG_OF[field.name]: candidate})
        except ValueError:
            continue
        return candidate
    raise AssertionError(f"no valid non-default value found for the new option {field.name!r}; "
                         "add a candidate of its type to changed_value")


def as_flag(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


OPTIONS = dataclasses.fields(AttentionOptions)


@pytest.mark.parametrize("field", OPTIONS, ids=[field.name for field in OPTIONS])
def test_every_option_is_a_flag_reaches_every_layer_and_round_trips(field, tmp_path):
    value = changed_value(field)
    flag = FLAG_OF[field.name]
    assert flag in flag_names()
    config = parse_flags([*BASE_FLAGS, f"--{flag}={as_flag(value)}"], "tiny")
    assert getattr(config.model.attention, field.name) == value
    assert getattr(config.model, flag) == value  # the flat name reads it too
    assert config.model == model_preset("tiny", num_kv_heads=1, **{flag: value})
    for layer in range(config.model.num_layers):
        assert getattr(config.model.attention_config(layer), field.name) == value

    saved = config_dict(config)
    assert saved["model"]["attention"][field.name] == (list(value) if isinstance(value, tuple) else value)
    record_start(str(tmp_path), saved, "sha", 0, {})  # config.json and run_definition.json
    assert load_config(str(tmp_path)) == config
    assert check_resume(str(tmp_path), config_dict(config), "sha") == {}
    default = config.replace(model=config.model.replace(**{flag: field.default}))
    with pytest.raises(ConfigError, match=f"model.attention.{field.name}: saved ") as error:
        check_resume(str(tmp_path), config_dict(default), "sha")
    assert "\n" not in str(error.value)


def test_attention_config_keeps_its_keyword_constructor_and_errors():
    config = AttentionConfig(features=64, num_heads=4, beta=0.5, local_window_size=8, qk_norm=True)
    assert (config.features, config.beta, config.local_window_size, config.head_width) == (64, 0.5, 8, 16)
    assert isinstance(config, AttentionOptions)
    assert dataclasses.replace(config, rewire=False).attending_heads == 4
    with pytest.raises(ValueError, match=r"^AttentionConfig: beta=-1 is invalid; use a finite number >= 0\.$"):
        AttentionConfig(features=64, num_heads=4, beta=-1)
    with pytest.raises(ValueError, match="AttentionOptions: runway_span='all' is invalid"):
        AttentionOptions(runway_span="all")
    # ModelConfig holds options only: the layers' shape is the model's.
    assert ModelConfig(attention={"beta": 0.5}).attention == AttentionOptions(beta=0.5)
    with pytest.raises(ValueError, match="attention must be an AttentionOptions"):
        ModelConfig(attention=config)


# -- workdirs saved with the options flat --------------------------------------------------------

# config.json's "model" as the code before the composed options wrote it (tiny, beta 0.5, a
# fallback order): the options among the model's fields, the fallback order one string.
FLAT_MODEL = {"vocab_size": 300, "num_layers": 1, "features": 32, "num_heads": 2, "head_dim": None,
              "num_kv_heads": None, "mlp_dim": 64, "position": "rope", "rope_base": 10000.0,
              "tie_embeddings": True, "rewire": True, "rewire_layers": None, "beta": 0.5,
              "runway_coefficient": "bilinear", "runway_span": "exact",
              "keep_runway_head_output": False, "attention_implementation": "reference,xla",
              "dtype": "float32", "param_dtype": "float32", "norm_eps": 1e-06}
FLAT_MODEL_CONFIG = model_preset("tiny", vocab_size=300, num_layers=1, features=32, num_heads=2,
                                 mlp_dim=64, beta=0.5, attention_implementation=("reference", "xla"))


def tiny_run(**overrides):
    fields = dict(model=FLAT_MODEL_CONFIG, steps=1, log_every=1, eval_every=1, eval_batches=1,
                  checkpoint_every=1, warmup_steps=0, mesh_data=1,
                  data=DataConfig(source="recall", seq_len=32, batch_size=4, recall_pairs=4,
                                  recall_queries=4))
    return TrainConfig(**{**fields, **overrides})


def flatten_saved_model(workdir):
    """Rewrite config.json, run_definition.json and the checkpoints' configs as the code before
    the composed options wrote them."""
    config_json = workdir / "config.json"
    config_json.write_text(json.dumps(dict(json.loads(config_json.read_text()), model=FLAT_MODEL)))
    definition_json = workdir / "run_definition.json"
    definition = {key: value for key, value in json.loads(definition_json.read_text()).items()
                  if not key.startswith("model.")}
    definition_json.write_text(json.dumps({**{f"model.{k}": v for k, v in FLAT_MODEL.items()}, **definition}))
    for saved in (workdir / "checkpoints").glob("*/config/metadata"):
        saved.write_text(json.dumps(dict(json.loads(saved.read_text()), model=FLAT_MODEL)))


def test_an_old_flat_workdir_loads_refuses_a_changed_option_and_resumes(tmp_path):
    train = lambda config: train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1],
                                              log=lambda *_: None)
    train(tiny_run())
    flatten_saved_model(tmp_path)
    assert load_config(str(tmp_path)).model == FLAT_MODEL_CONFIG
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"model.attention.beta: saved 0.5, now 1.0\)") as error:
        train(tiny_run(model=FLAT_MODEL_CONFIG.replace(beta=1.0)))
    assert "\n" not in str(error.value) and (tmp_path / "config.json").read_text() == before
    # The whole resume (guard, checkpoint restore against its flat config) at the saved step,
    # which trains nothing and so compiles no step.
    assert train(tiny_run())["final_step"] == 1
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert history[-1]["event"] == "resume" and history[-1]["changed"] == {}  # no model change
    assert json.loads((tmp_path / "config.json").read_text())["model"]["attention"]["beta"] == 0.5


def test_the_flat_layout_with_the_later_options_migrates_exactly(tmp_path):
    """Every option's flag name migrates from the flat layout (the window, soft cap, QK-norm, ...
    came with the nested one, but a hand-written flat config may name them)."""
    flat = dict(FLAT_MODEL, num_heads=4, num_kv_heads=1, norm_eps=1e-5, attention_implementation="xla",
                runway_key="group", attention_scale=0.25, local_window_size=5,
                attention_logits_soft_cap=30.0, qk_norm=True, rope_scaling_factor=2.0)
    model = ModelConfig(**with_defaults(flat))
    assert model.attention == AttentionOptions(
        beta=0.5, implementation="xla", runway_key="group", scale=0.25, local_window_size=5,
        logits_soft_cap=30.0, qk_norm=True, rope_scaling_factor=2.0)
    assert model.attention.qk_norm_eps == AttentionOptions().qk_norm_eps  # not the model's norm_eps
    assert with_defaults(config_dict(TrainConfig(model=model))["model"]) == with_defaults(flat)
    saved = config_dict(TrainConfig(model=model))
    (tmp_path / "config.json").write_text(json.dumps(dict(saved, model=flat)))  # no run_definition.json
    assert check_resume(str(tmp_path), saved, "sha") == {}
    now = config_dict(TrainConfig(model=model.replace(attention_logits_soft_cap=50.0)))
    with pytest.raises(ConfigError, match="model.attention.logits_soft_cap: saved 30.0, now 50.0"):
        check_resume(str(tmp_path), now, "sha")


# -- fallback orders are parsed at the command line -----------------------------------------------

def test_a_comma_separated_fallback_order_becomes_the_layers_tuple(monkeypatch):
    model = parse_flags(["--attention_implementation=xla,reference"], "tiny").model
    assert model.attention.implementation == ("xla", "reference")
    lm = nnx.eval_shape(lambda: TransformerLM(model, rngs=nnx.Rngs(0)))
    assert all(block.attention.config.implementation == ("xla", "reference") for block in lm.blocks)
    assert json.loads(json.dumps(config_dict(TrainConfig(model=model))))["model"]["attention"][
        "implementation"] == ["xla", "reference"]
    # The layer hands the tuple to the attention function as it is.
    received = []

    def recording(query, *arrays, implementation, **options):
        received.append(implementation)
        return jnp.zeros_like(query)

    monkeypatch.setattr(attention, "rewired_attention", recording)
    layer_config = model.attention_config(0)
    RewiredMultiHeadAttention(layer_config, rngs=nnx.Rngs(1))(jnp.ones((1, 4, layer_config.features)))
    assert received == [("xla", "reference")]
    assert parse_flags(["--attention_implementation=pallas_gpu"], "tiny").model.attention.implementation == "pallas_gpu"


@pytest.mark.parametrize("text", ["xla,triton", "pallas_gpu,", "triton"])
def test_a_bad_implementation_name_is_one_line_at_the_command_line(text):
    with pytest.raises(ConfigError, match="implementation=.* is invalid; use one of") as error:
        parse_flags([f"--attention_implementation={text}"], "tiny")
    assert "\n" not in str(error.value) and "separated by commas" in str(error.value)
    with pytest.raises(ValueError, match="is invalid"):  # configs take tuples, not the flag's string
        AttentionOptions(implementation="xla,reference")


def test_nested_fields_inverts_flat_fields():
    saved = config_dict(TrainConfig(model=model_preset("tiny", beta=0.5)))
    assert nested_fields(flat_fields(saved)) == saved
    assert flat_fields({"model": {"attention": {"beta": 1.0}}})["model.attention.beta"] == 1.0
