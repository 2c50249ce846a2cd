"""runway_jax.evaluation.bootstrap: paired bootstrap intervals of a rewired-minus-baseline
difference and the verdict they allow."""

import numpy as np
import pytest

from runway_jax.evaluation import bootstrap


def paired_losses(seed, seeds=3, items=200, shift=0.0, seed_spread=0.0):
    """Per-window mean losses of two models that share the windows' difficulty (the pairing)."""
    rng = np.random.default_rng(seed)
    difficulty = rng.gamma(4.0, 0.4, size=items)  # shared by both models
    seed_offsets = rng.normal(0.0, seed_spread, size=(seeds, 1))
    baseline = difficulty + rng.normal(0.0, 0.05, size=(seeds, items)) + seed_offsets
    rewired = difficulty + rng.normal(0.0, 0.05, size=(seeds, items)) + shift
    return rewired, baseline


def test_a_clear_gain_is_better_and_its_interval_holds_the_point_estimate():
    rewired, baseline = paired_losses(0, shift=-0.05)
    result = bootstrap.paired_difference(rewired, baseline)
    assert result["low"] <= result["difference"] <= result["high"] < 0
    assert result["relative_low"] <= result["relative"] <= result["relative_high"] < 0
    np.testing.assert_allclose(result["difference"], np.exp(rewired.mean()) - np.exp(baseline.mean()))
    assert bootstrap.verdict(result) == "better"
    assert bootstrap.verdict(bootstrap.paired_difference(baseline, rewired)) == "worse"
    # An accuracy (identity transform, higher is better) reverses the reading.
    accuracy = bootstrap.paired_difference(-rewired, -baseline, transform=lambda x: x)
    assert bootstrap.verdict(accuracy, lower_is_better=False) == "better"


def test_no_difference_is_not_decided():
    rewired, baseline = paired_losses(1, shift=0.0)
    result = bootstrap.paired_difference(rewired, baseline)
    assert result["low"] < 0 < result["high"]
    assert bootstrap.verdict(result) == "not decided"


def test_pairing_makes_the_interval_narrow_and_seeds_widen_it():
    """The windows' shared difficulty cancels in the paired difference (an unpaired interval
    would be as wide as the spread of difficulty), and seed-to-seed noise only shows when the
    seeds are resampled."""
    rewired, baseline = paired_losses(2, shift=-0.02, seed_spread=0.05)
    items = bootstrap.paired_difference(rewired, baseline, resample="items")
    both = bootstrap.paired_difference(rewired, baseline, resample="seeds_and_items")
    unpaired_spread = np.exp(baseline.mean()) * baseline.mean(axis=0).std() / np.sqrt(200)
    assert items["high"] - items["low"] < unpaired_spread
    assert both["high"] - both["low"] > 2 * (items["high"] - items["low"])


def test_intervals_cover_the_true_difference_about_95_percent_of_the_time():
    """Coverage over 200 simulated evaluations with a known mean difference (one seed pair, so
    the item bootstrap is the whole story): within binomial noise of 95%."""
    covered = 0
    for trial in range(200):
        rng = np.random.default_rng(1000 + trial)
        difficulty = rng.normal(1.0, 0.3, size=60)
        rewired = difficulty - 0.02 + rng.normal(0, 0.05, size=60)
        baseline = difficulty + rng.normal(0, 0.05, size=60)
        result = bootstrap.paired_difference(rewired, baseline, transform=lambda x: x,
                                             resamples=1000, seed=trial)
        covered += result["low"] <= -0.02 <= result["high"]
    assert 0.89 <= covered / 200 <= 0.99, covered


def test_bad_input_is_one_line():
    with pytest.raises(ValueError, match="must pair the same seeds and items"):
        bootstrap.paired_difference(np.zeros((3, 5)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="resample="):
        bootstrap.paired_difference(np.zeros(5), np.zeros(5), resample="windows")
