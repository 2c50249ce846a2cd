"""eval/: loading a trained workdir and the perplexity-vs-length evaluation."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from runway_jax.evaluation import perplexity
from runway_jax.evaluation.workdirs import load_trained
from runway_jax.training.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
import perplexity as perplexity_script  # noqa: E402  (eval/perplexity.py)


def test_load_trained_restores_the_latest_parameters(trained):
    model, config, tokenizer, step = load_trained(str(trained["rewired"]))
    assert step == 6 and config.model.rewire and config.data.seq_len == 32
    tokens = np.asarray(tokenizer.encode("line 1 of document 2. "))[None]
    assert np.isfinite(np.asarray(model(tokens))).all()
    with pytest.raises(ConfigError, match="not .*training workdir|does not exist"):
        load_trained(str(trained["rewired"] / "nope"))


def test_windows_are_shared_between_documents_and_spread_over_each():
    documents = [np.arange(100), np.arange(1000, 1030), np.arange(2000, 2250)]
    rows = perplexity.windows(documents, 9, max_windows=7)
    # Capacities of 10, 3 and 25 windows; round-robin gives 3, 2 and 2 of them, evenly spaced from
    # each document's first window to its last (window 4.5 of 0..9 rounds to 4).
    np.testing.assert_array_equal(rows[:, 0], [0, 40, 90, 1000, 1020, 2000, 2240])
    assert rows.shape == (7, 10) and np.all(np.diff(rows, axis=1) == 1)
    assert len(perplexity.windows(documents, 9, max_windows=100)) == 10 + 3 + 25
    assert perplexity.windows(documents, 300, max_windows=4).shape == (0, 301)


def test_perplexity_script_writes_json_and_png_with_compare(trained):
    code = perplexity_script.main([f"--workdir={trained['rewired']}", "--lengths=1,2,4",
                                   "--max_windows=3", "--compare", str(trained["baseline"])])
    assert code == 0
    report = json.loads((trained["rewired"] / "eval" / "perplexity.json").read_text())
    assert sorted(report["lengths"], key=int) == ["32", "64", "128"]
    for length, result in report["lengths"].items():
        assert len(result["position_loss"]) == int(length) and np.isfinite(result["perplexity"])
    assert report["compare"][0]["rewire"] is False
    assert (trained["rewired"] / "eval" / "perplexity.png").stat().st_size > 10_000


def test_perplexity_script_names_a_missing_workdir(tmp_path, capsys):
    assert perplexity_script.main([f"--workdir={tmp_path}"]) == 2
    assert "config.json does not exist" in capsys.readouterr().err


class _InductionModel(nnx.Module):
    """A stand-in model that retrieves perfectly: at position t it predicts the token that followed
    the latest earlier occurrence of the 7 tokens ending at t (here: "key is " -> the key)."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def __call__(self, tokens, *, positions=None, segment_ids=None):
        length, context = tokens.shape[1], 7
        shifted = [jnp.pad(tokens, ((0, 0), (k, 0)), constant_values=-1)[:, :length] for k in range(context)]
        match = jnp.ones((tokens.shape[0], length, length), bool)
        for window in shifted:
            match &= window[:, :, None] == window[:, None, :]
        match &= jnp.tril(jnp.ones((length, length), bool), -1)[None]
        latest = jnp.max(jnp.where(match, jnp.arange(length), -1), axis=-1)  # [B, T]
        following = jnp.take_along_axis(tokens, jnp.clip(latest + 1, 0, length - 1), axis=1)
        return jnp.where((latest >= 0)[..., None], 20.0 * jax.nn.one_hot(following, self.vocab_size), 0.0)


def test_passkey_scores_a_retrieving_model_perfectly_and_a_blind_one_at_chance():
    from runway_jax.data import ByteTokenizer
    from runway_jax.evaluation import passkey

    tokenizer = ByteTokenizer()
    results = passkey.passkey_grid(_InductionModel(259), tokenizer, [300], [0.0, 0.5, 1.0], trials=2)
    assert results["exact_accuracy"] == [[1.0, 1.0, 1.0]] and results["rank_accuracy"] == [[1.0, 1.0, 1.0]]
    assert 250 < results["prompt_tokens"][0] < 350
    blind = passkey.passkey_grid(TransformerLMStub(), tokenizer, [120], [0.5], trials=3)
    assert blind["exact_accuracy"] == [[0.0]]


def test_passkey_in_real_filler_text_pairs_trials_and_hits_the_asked_length():
    """With ``filler_text`` the key hides in real text cut from it (not the repeated FILLER); the
    prompt is the asked length in tokens, and each trial's outcome is kept so that two models'
    grids pair up trial by trial (the prompts depend only on the seed)."""
    from runway_jax.data import ByteTokenizer, documents
    from runway_jax.data.config import DataConfig
    from runway_jax.evaluation import passkey

    tokenizer = ByteTokenizer()
    text = " ".join(documents(DataConfig(), "validation"))
    results = passkey.passkey_grid(_InductionModel(259), tokenizer, [400], [0.0, 1.0], trials=3,
                                   filler_text=text)
    assert results["filler"] == "text" and 370 < results["prompt_tokens"][0] < 430
    assert results["rank_correct"] == [[[1, 1, 1], [1, 1, 1]]] and results["exact_accuracy"] == [[1.0, 1.0]]
    blind = passkey.passkey_grid(TransformerLMStub(), tokenizer, [400], [0.0, 1.0], trials=3, filler_text=text)
    assert np.asarray(blind["exact_correct"]).shape == (1, 2, 3) and not np.any(blind["exact_correct"])
    # The same prompts for both models, cut from the text.
    from runway_jax.data import synthetic
    prompt, _ = synthetic.passkey(0, (400 * 10_000 + 0) * 1_000, filler_chars=200, depth=0.0, filler_text=text)
    assert "The grass is green" not in prompt and prompt.split("is the pass key. ")[1][:40] in text


class TransformerLMStub(nnx.Module):
    """Uniform predictions: never reproduces a key."""

    def __call__(self, tokens, *, positions=None, segment_ids=None):
        return jnp.zeros(tokens.shape + (259,))


def test_passkey_scores_from_one_cached_prefill_equal_full_forward_passes(trained):
    """The cached scorer (one prefill, then decoding; prompts right-padded to a bucket) gives the
    candidates' log-likelihoods and the greedy answer of full forward passes over each sequence."""
    from runway_jax.evaluation import passkey

    for name in ("rewired", "baseline"):
        model, _, tokenizer, _ = load_trained(str(trained[name]))
        prompt = tokenizer.encode("line 2 of document 3. line 2 of document 3. The pass key is ")
        candidates = [tokenizer.encode(text) for text in ("12345", "line 2", "9")]
        greedy, scores = passkey.score_answers(model, prompt, candidates)
        expected_greedy, expected = passkey._score_by_forward_passes(model, prompt, candidates, 6)
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(greedy, expected_greedy)
        full = model(jnp.asarray(np.concatenate([prompt, candidates[1]])[None]))
        direct = jax.nn.log_softmax(full[0], -1)[np.arange(len(prompt) - 1, len(prompt) + 5), candidates[1]]
        np.testing.assert_allclose(scores[1], float(direct.sum()), rtol=1e-5, atol=1e-4)


def test_passkey_script_writes_json_and_heatmap(trained):
    import passkey as passkey_script  # eval/passkey.py

    assert passkey_script.main([f"--workdir={trained['rewired']}", "--lengths=2", "--depths=0,1",
                                "--trials=1", "--compare", str(trained["baseline"])]) == 0
    report = json.loads((trained["rewired"] / "eval" / "passkey.json").read_text())
    assert report["depths"] == [0.0, 1.0] and len(report["exact_accuracy"][0]) == 2
    assert report["chance_rank_accuracy"] == 0.1 and report["compare"][0]["rewire"] is False
    assert (trained["rewired"] / "eval" / "passkey.png").stat().st_size > 10_000


def test_generate_script_continues_the_prompt_as_generate_does(trained, capsys):
    import generate as generate_script  # eval/generate.py

    from runway_jax.decoding import generate

    workdir = str(trained["rewired"])
    assert generate_script.main([f"--workdir={workdir}", "--prompt=line 1 of", "--max_new_tokens=12"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    model, _, tokenizer, _ = load_trained(workdir)
    prompt = list(tokenizer.encode("line 1 of"))
    tokens = generate(model, jnp.asarray([prompt]), max_new_tokens=12, end_token=tokenizer.eos_id)
    new = [int(t) for t in tokens[0, len(prompt):]]
    new = new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
    assert printed == "line 1 of" + tokenizer.decode(new) and len(printed) > len("line 1 of")
    assert generate_script.main([f"--workdir={workdir}", "--prompt=x", "--temperature=1",
                                 "--top_k=5", "--top_p=0.9", "--seed=3", "--max_new_tokens=4"]) == 0
    capsys.readouterr()
    assert generate_script.main([f"--workdir={workdir}", "--prompt=x", "--top_p=2"]) == 2
    assert "--top_p=2 is out of range" in capsys.readouterr().err
