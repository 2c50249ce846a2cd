"""eval/runway_analysis.py and eval/recall.py: the maps reproduce the layers, the estimates match
exact computations, the recall score is right for a model that recalls and one that does not."""

import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from runway_jax.attention_layer import AttentionConfig, init_weights, multi_head_attention
from runway_jax.config import model_preset
from runway_jax.data import ByteTokenizer, DataConfig, make_dataset
from runway_jax.evaluation import recall, runway_analysis
from runway_jax.model import TransformerLM
from runway_jax.training import TrainConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
import recall as recall_script  # noqa: E402  (eval/recall.py)
import runway_analysis as analysis_script  # noqa: E402  (eval/runway_analysis.py)


@pytest.mark.parametrize("options", [
    dict(rewire=True),
    dict(rewire=False),
    dict(rewire=True, position="alibi", num_heads=5, num_kv_heads=2, runway_span="prefix",
         runway_coefficient="dot", beta=0.5, keep_runway_head_output=True),
])
def test_layer_maps_reproduce_the_layer_output(options):
    """probs @ values through the output projection is the layer's own output (METHOD eq. (3)),
    so the maps are the attention the model really applies (the values computed here, apart)."""
    config = AttentionConfig(features=40 if options.get("num_heads") == 5 else 32,
                             num_heads=options.pop("num_heads", 4), **options)
    weights = init_weights(config, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 11, config.features))
    positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
    maps = runway_analysis.layer_attention(x, weights, config, positions)
    value = jnp.einsum("btD,DKd->btKd", x, weights["value"])  # kv heads, then the runway head's
    kv_heads = config.kv_heads
    values = jnp.repeat(value[:, :, :kv_heads], config.attending_heads // kv_heads, axis=2)
    values = jnp.concatenate([values, value[:, :, kv_heads:]], axis=2)  # kept runway output
    heads = jnp.einsum("bhij,bjhd->bihd", maps["probs"], values)
    rebuilt = jnp.einsum("btHd,HdD->btD", heads, weights["out"])
    np.testing.assert_allclose(rebuilt, multi_head_attention(x, weights, config), atol=1e-5)
    np.testing.assert_allclose(maps["probs"].sum(-1), 1.0, atol=1e-5)
    assert ("rho" in maps) == config.rewire
    if config.rewire:
        np.testing.assert_allclose(maps["runway"].sum(-1), 1.0, atol=1e-5)
        assert float(jnp.abs(jnp.triu(maps["runway"], 1)).max()) == 0.0  # causal
        if config.runway_span == "exact":  # METHOD (6) invariant 3: no runway, rho = 0
            assert float(jnp.abs(jnp.triu(maps["rho"], -1)).max()) == 0.0


def test_attention_maps_cover_every_layer_of_a_model():
    config = model_preset("tiny", num_layers=3, rewire_layers=(1, 2))
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, config.vocab_size)
    layers = runway_analysis.attention_maps(model, tokens)
    assert [sorted(maps) for maps in layers] == [["probs"], ["probs", "rho", "runway"], ["probs", "rho", "runway"]]
    assert layers[0]["probs"].shape == (2, 4, 9, 9) and layers[1]["probs"].shape == (2, 3, 9, 9)
    means = runway_analysis.mean_maps(layers)
    assert means[0] == {} and means[1]["rho"].shape == (9, 9)


def test_early_token_mass_of_uniform_attention_is_the_uniform_reference_and_of_a_sink_is_one():
    length, early = 10, 3
    causal = np.tril(np.ones((length, length)))
    uniform = causal / causal.sum(-1, keepdims=True)
    sink = np.zeros((length, length))
    sink[:, 0] = 1.0
    layers = [{"probs": np.broadcast_to(uniform, (2, 3, length, length))},
              {"probs": np.broadcast_to(sink, (2, 3, length, length))}]
    result = runway_analysis.early_token_mass(layers, early)
    assert result[0]["mass"] == pytest.approx(result[0]["uniform"])
    assert result[0]["uniform"] == pytest.approx(np.mean([early / (i + 1) for i in range(early, length)]))
    assert result[1]["mass"] == pytest.approx(1.0) and result[1]["mass_by_head"] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="early_tokens"):
        runway_analysis.early_token_mass(layers, length)


def test_dependence_by_distance_matches_the_exact_jacobian():
    config = model_preset("tiny", features=16, num_heads=2, mlp_dim=32)
    model = TransformerLM(config, rngs=nnx.Rngs(3))
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (1, 8), 0, config.vocab_size))
    estimate = runway_analysis.dependence_by_distance(model, tokens, probes=256)

    def hidden(x):
        x = x[None]
        for block in model.blocks:
            x = block(x, positions=jnp.arange(8)[None], segment_ids=None)
        return x[0]

    jacobian = jax.jacrev(hidden)(model.embed(jnp.asarray(tokens))[0])  # [T, D, T, D]
    norms = np.sqrt((np.asarray(jacobian) ** 2).sum(axis=(1, 3)))  # [T(i), T(j)]
    exact = [np.mean(np.diagonal(norms, -distance)) for distance in range(8)]
    np.testing.assert_allclose(estimate, exact, rtol=0.1)
    assert np.abs(np.triu(norms, 1)).max() < 1e-6  # causality: no dependence on later inputs


def test_runway_analysis_script_writes_json_and_png_with_compare(trained):
    rewired, baseline = str(trained["rewired"]), str(trained["baseline"])
    code = analysis_script.main(["--workdir", rewired, "--sequences=2", "--length=16", "--probes=2",
                                 "--compare", baseline])
    assert code == 0
    report = json.loads((trained["rewired"] / "eval" / "runway_analysis.json").read_text())
    assert (trained["rewired"] / "eval" / "runway_analysis.png").stat().st_size > 10_000
    assert report["rewire"] and report["length"] == 16 and len(report["dependence_by_distance"]) == 16
    layer = report["layers"][0]
    assert layer["rewired"] and np.asarray(layer["rho"]).shape == (16, 16)
    np.testing.assert_allclose(np.asarray(layer["runway"]).sum(-1), 1.0, atol=1e-4)
    assert len(layer["rho_mean_by_distance"]) == 16 and layer["rho_mean_by_distance"][:2] == [0.0, 0.0]
    other = report["compare"][0]
    assert not other["rewire"] and not other["layers"][0]["rewired"]
    for model_report in (report, other):
        assert all(0 <= e["mass"] <= 1 for e in model_report["early_token_mass"])


def test_runway_analysis_script_rejects_bad_input(tmp_path, trained, capsys):
    assert analysis_script.main(["--workdir", str(tmp_path / "missing")]) == 2
    assert analysis_script.main(["--workdir", str(trained["rewired"]), "--sequences=0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "config.json" in lines[0] and "--sequences=0" in lines[1]


class _RecallingModel(nnx.Module):
    """Predicts the token that followed the latest earlier occurrence of the current token: at a
    query that is the key's value, so it recalls perfectly (with ``span``: only an occurrence
    fewer than ``span`` tokens back)."""

    def __init__(self, vocab_size, span=None):
        self.vocab_size, self.span = vocab_size, span

    def __call__(self, tokens, *, positions=None, segment_ids=None):
        length = tokens.shape[1]
        visible = jnp.tril(jnp.ones((length, length), bool), -1)
        if self.span:
            visible &= jnp.arange(length)[None, :] > jnp.arange(length)[:, None] - self.span
        earlier = (tokens[:, :, None] == tokens[:, None, :]) & visible
        latest = jnp.max(jnp.where(earlier, jnp.arange(length), -1), axis=-1)
        following = jnp.take_along_axis(tokens, jnp.clip(latest + 1, 0, length - 1), axis=1)
        return 10.0 * jax.nn.one_hot(following, self.vocab_size)


def test_recall_accuracy_of_a_recalling_model_is_one_and_of_a_blind_one_zero():
    base = TrainConfig(model=model_preset("tiny"), data=DataConfig(batch_size=4))
    config = recall.recall_config(base, num_pairs=6, num_queries=5, rewire=True, seed=1)
    assert config.data.seq_len == 22 and config.data.source == "recall" and config.seed == 1
    tokenizer = ByteTokenizer()
    batch = next(iter(make_dataset(config.data, "validation", tokenizer)))
    assert batch["inputs"].shape == (4, 22) and batch["loss_mask"].sum() == 4 * 5
    perfect = recall.recall_accuracy(_RecallingModel(259), config, tokenizer, batches=3)
    assert perfect == {"accuracy": 1.0, "sequence_accuracy": 1.0, "answers": 60, "examples": 12}
    blind = recall.recall_accuracy(_RecallingModel(259), dataclasses.replace(
        config, data=dataclasses.replace(config.data, recall_queries=1)), tokenizer, batches=1)
    assert blind["answers"] == 4  # one query per example
    zero = recall.recall_accuracy(_Blind(), config, tokenizer, batches=1)
    assert zero["accuracy"] == 0.0  # argmax 0 is a key id, never a value


class _Blind(nnx.Module):
    def __call__(self, tokens, *, positions=None, segment_ids=None):
        return jnp.zeros(tokens.shape + (259,))


def test_recall_configs_differ_only_in_rewiring():
    base = TrainConfig(model=model_preset("tiny", beta=0.5))
    rewired = recall.recall_config(base, num_pairs=8, num_queries=4, rewire=True, seed=2)
    baseline = recall.recall_config(base, num_pairs=8, num_queries=4, rewire=False, seed=2)
    assert rewired.replace(model=rewired.model.replace(rewire=False)) == baseline
    assert rewired.model.beta == 0.5 and rewired.data.seq_len == 24


@pytest.mark.slow
def test_recall_script_trains_both_models_and_writes_json_and_png(tmp_path, capsys):
    workdir = tmp_path / "recall"
    argv = ["--workdir", str(workdir), "--pairs=2", "--queries=2", "--eval_batches=1", "--steps=4",
            "--batch_size=8", "--num_layers=1"]
    assert recall_script.main(argv) == 0
    report = json.loads((workdir / "eval" / "recall.json").read_text())
    assert (workdir / "eval" / "recall.png").stat().st_size > 5_000
    assert report["steps"] == 4 and report["model"]["num_layers"] == 1
    for name in ("rewired", "baseline"):
        summary = report["accuracy"][name]["2"]
        assert summary["seeds"] == 1 and 0 <= summary["mean"] <= 1 and summary["runs"][0]["answers"] == 16
        assert (workdir / "runs" / name / "pairs2" / "seed0" / "checkpoints").is_dir()
    # A second run reuses the finished training runs and gives the same scores.
    assert recall_script.main(argv) == 0
    assert json.loads((workdir / "eval" / "recall.json").read_text())["accuracy"] == report["accuracy"]
    assert "resumed" in capsys.readouterr().out
    assert recall_script.main(["--workdir", str(workdir), "--pairs=0"]) == 2
    assert recall_script.main(["--workdir", str(workdir), "--stepz=3"]) == 2


def test_recall_by_length_asks_the_same_pairs_from_farther_away():
    """MQAR at 1x/2x/4x a training length: the pairs come first and queries fill the length, so a
    model that looks back only a fixed span loses the early pairs as the sequence grows."""
    perfect = recall.recall_by_length(_RecallingModel(259), [40, 80], num_pairs=6, examples=5, batch_size=2)
    assert {n: r["accuracy"] for n, r in perfect.items()} == {40: 1.0, 80: 1.0}
    assert len(perfect[80]["example_accuracy"]) == 5
    assert recall.recall_by_length(_Blind(), [40], num_pairs=6, examples=3)[40]["accuracy"] == 0.0

    near, far = (recall.recall_by_length(_RecallingModel(259, span=30), [n], num_pairs=12, examples=6)[n]["accuracy"]
                 for n in (40, 160))
    assert far < near
    with pytest.raises(ValueError, match="must be even and hold more than 6 pairs"):
        recall.recall_by_length(_Blind(), [12], num_pairs=6, examples=1)
