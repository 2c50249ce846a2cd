"""The decoder language model: presets, parameter counts, packing, jit, sharding over 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from runway_jax.config import PRESETS, ModelConfig, model_preset, upper_half
from runway_jax.model import TransformerLM, count_parameters
from runway_jax.sharding import state_shardings


def tokens_for(config, batch=2, length=16, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, config.vocab_size)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_parse_and_invariant_5_holds(name):
    """Invariant 5 for whole models, counted with eval_shape (the 1B preset allocates nothing)."""
    config = model_preset(name)
    assert config.rewire and config.baseline().rewired_layers() == ()
    width = config.head_dim or config.features // config.num_heads
    difference = count_parameters(config.baseline()) - count_parameters(config)
    assert difference == config.num_layers * 2 * config.features * width
    kept = config.replace(keep_runway_head_output=True)
    assert count_parameters(kept) == count_parameters(config.baseline())


def test_preset_sizes_match_their_names():
    assert 9e6 < count_parameters(model_preset("small")) < 12e6
    assert 115e6 < count_parameters(model_preset("gpt2-small").baseline()) < 130e6
    assert 0.9e9 < count_parameters(model_preset("1b")) < 1.2e9


def test_rewire_layers_chooses_the_rewired_layers():
    config = model_preset("small", rewire_layers=upper_half(6))
    assert config.rewired_layers() == (3, 4, 5)
    model = nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0)))
    rewired = [block.attention.config.rewire for block in model.blocks]
    assert rewired == [False, False, False, True, True, True]
    width = config.features // config.num_heads
    assert count_parameters(config.baseline()) - count_parameters(config) == 3 * 2 * config.features * width


@pytest.mark.parametrize("overrides,needle", [
    ({"rewire_layers": (0, 7)}, "rewire_layers"),
    ({"dtype": "float8"}, "dtype"),
    ({"num_heads": 3}, "num_heads"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"beta": -1.0}, "beta"),
])
def test_model_config_validation(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        model_preset("tiny", **overrides)


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'small'"):
        model_preset("smal")


@pytest.mark.parametrize("overrides", [
    {}, {"rewire": False}, {"position": "alibi", "tie_embeddings": False},
    {"position": "nope", "runway_span": "prefix", "dtype": "bfloat16"}, {"num_kv_heads": 1},
])
def test_forward_and_backward_under_jit(overrides):
    config = model_preset("tiny", **overrides)
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    tokens = tokens_for(config)

    @nnx.jit
    def loss_and_grads(model, tokens):
        def loss(model):
            logits = model(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return nnx.value_and_grad(loss)(model)

    loss, grads = loss_and_grads(model, tokens)
    assert model(tokens).dtype == jnp.float32
    assert abs(float(loss) - np.log(config.vocab_size)) < 1.0  # sane initialization
    leaves = jax.tree.leaves(nnx.state(grads))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) == len(leaves)  # every parameter learns


def test_packed_row_equals_separate_documents():
    """Invariant 7 through the whole model: a packed row (positions restarting per document)
    gives each document the logits it gets alone."""
    config = model_preset("tiny")
    model = TransformerLM(config, rngs=nnx.Rngs(1))
    lengths = [5, 9, 4]
    documents = [tokens_for(config, 1, n, seed=i) for i, n in enumerate(lengths)]
    packed = jnp.concatenate(documents, axis=1)
    segments = jnp.asarray(np.repeat(np.arange(3), lengths)[None], jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(n) for n in lengths])[None], jnp.int32)
    logits = model(packed, positions=positions, segment_ids=segments)
    start = 0
    for document, n in zip(documents, lengths):
        np.testing.assert_allclose(logits[:, start:start + n], model(document), atol=2e-5, rtol=0)
        start += n


def test_bad_tokens_are_named():
    model = TransformerLM(model_preset("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens must be int"):
        model(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="segment_ids.shape"):
        model(jnp.zeros((2, 3), jnp.int32), segment_ids=jnp.zeros((2, 4), jnp.int32))


@pytest.mark.parametrize("rewire", [True, False])
def test_sharded_over_8_devices_gives_the_same_logits(rewire):
    """Data, FSDP and tensor (head) parallel over 8 CPU devices == one device."""
    assert jax.device_count() == 8, "conftest.py sets --xla_force_host_platform_device_count=8"
    config = model_preset("tiny", num_heads=5 if rewire else 4, features=80, rewire=rewire)
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    tokens = tokens_for(config, batch=4, length=24)
    want = nnx.jit(lambda m, t: m(t))(model, tokens)

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh))
    tokens = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    specs = {x.sharding.spec for x in jax.tree.leaves(state)}
    assert any("model" in spec for spec in specs) and any("fsdp" in spec for spec in specs)
    got = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_default_config_is_the_tiny_preset():
    assert ModelConfig() == model_preset("tiny")
