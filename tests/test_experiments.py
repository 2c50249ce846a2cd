"""experiments/study.py --quick: the whole study pipeline (train, evaluate, recall, tables,
figures) end to end at toy scale, and resuming it reuses every run."""

import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import configs  # noqa: E402  (experiments/configs.py)
import report  # noqa: E402  (experiments/report.py)
import round2  # noqa: E402  (experiments/round2.py)
import round2_report  # noqa: E402  (experiments/round2_report.py)
import round2_retrieval  # noqa: E402  (experiments/round2_retrieval.py)
import study  # noqa: E402  (experiments/study.py)

from runway_jax.model import count_parameters  # noqa: E402


def test_runs_differ_from_the_base_only_in_their_fields_and_matched_baselines_bracket_rewired():
    full = configs.study()
    assert len({run.name for run in full.runs}) == len(full.runs)
    configs_by_name = {run.name: configs.run_config(full.base, run) for run in full.runs}
    rewired, baseline = configs_by_name["rewired/seed0"], configs_by_name["baseline/seed0"]
    assert rewired.replace(model=rewired.model.replace(rewire=False)) == baseline
    assert configs_by_name["rewired/seed1"].data.shuffle_seed == 1
    model = full.base.model
    saved = 2 * model.features * (model.features // model.num_heads) * model.num_layers  # METHOD (1)
    parameters = {name: count_parameters(configs_by_name[f"{name}/seed0"].model)
                  for name in ("rewired", "baseline", "baseline_matched_heads")}
    assert parameters["baseline"] - parameters["rewired"] == saved
    assert parameters["rewired"] - parameters["baseline_matched_heads"] == saved
    assert sum(run.seed == 0 for run in full.runs if run.group.startswith("rewired_")) == 7


@pytest.mark.slow
def test_quick_study_writes_results_tables_and_figures(tmp_path, capsys):
    assert study.main(["--quick", f"--workdir={tmp_path}"]) == 0
    out = tmp_path / "results"
    summary = json.loads((out / "results.json").read_text())
    assert summary["quick"] and len(summary["runs"]) == len(configs.study(quick=True).runs)
    groups = {run["group"] for run in summary["runs"]}
    assert {"rewired", "baseline", "baseline_matched_heads", "rewired_nope", "rewired_beta_0.5"} <= groups
    first = summary["runs"][0]
    assert set(first) >= {"perplexity", "passkey", "zero_shot", "early_token_mass", "validation_perplexity"}
    assert summary["recall"]["accuracy"]["rewired"]["2"]["seeds"] == 1
    tables = (out / "tables.md").read_text()
    for heading in ("Perplexity", "seed by seed", "loss by position", "Passkey", "Zero-shot", "first 4 tokens",
                    "recall"):
        assert heading in tables
    for figure in ("perplexity", "ablations", "passkey", "early_tokens", "zero_shot", "recall"):
        assert (out / f"{figure}.png").stat().st_size > 5_000
    capsys.readouterr()
    # A second call trains nothing new and reuses the cached evaluations.
    assert study.main(["--quick", f"--workdir={tmp_path}", "--skip_recall"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["runs"] == summary["runs"]


def test_published_tables_are_what_report_makes_of_the_published_results(tmp_path):
    """docs/results/tables.md (quoted by docs/results.md) must follow from docs/results/results.json."""
    published = ROOT / "docs" / "results"
    summary = json.loads((published / "results.json").read_text())
    assert not summary["quick"] and len(summary["runs"]) == len(configs.study().runs)
    assert [run["run"] for run in summary["runs"]] == [run.name for run in configs.study().runs]
    report.write(summary, str(tmp_path))
    strip = lambda text: text.split("-->", 1)[1]  # the header names the generating command
    assert strip((tmp_path / "tables.md").read_text()) == strip((published / "tables.md").read_text())


@pytest.mark.slow
def test_quick_round2_writes_intervals_window_losses_tables_and_figures(tmp_path, capsys):
    """experiments/round2.py --quick end to end: every run of both parts trained and scored on
    the same windows, each comparison with both intervals at each length, the per-window losses
    in an npz that reproduces the intervals, and a second call that trains nothing."""
    import numpy as np
    from runway_jax.evaluation import bootstrap

    assert round2.main(["--quick", f"--workdir={tmp_path}"]) == 0
    out = tmp_path / "round2"
    summary = json.loads((out / "results.json").read_text())
    names = {run.name for part, runs in round2.parts(quick=True).items() for run in runs if part != "retrieval"}
    assert {f"{run['group']}/seed{run['seed']}" for run in summary["runs"]} == names
    lengths = [str(n) for n in summary["lengths"]]
    assert set(summary["comparisons"]) == {"rewired - baseline", "rewired - baseline_matched_heads",
                                           "rewired_beta_0.5 - rewired"}
    losses = np.load(out / "window_losses.npz", allow_pickle=False)
    for length in lengths:
        result = summary["comparisons"]["rewired - baseline"][length]
        for kind in ("items", "seeds_and_items"):
            assert result[kind]["low"] <= result[kind]["difference"] <= result[kind]["high"]
        assert result["verdict"] in bootstrap.VERDICTS and len(result["per_seed"]) == 2
        assert result["seeds_and_items"]["items"] == round2.QUICK_WINDOWS
        # The published per-window losses give the same interval again.
        pair = [np.stack([losses[f"{group}/seed{seed}/{length}"] for seed in (0, 1)])
                for group in ("rewired", "baseline")]
        again = bootstrap.paired_difference(*pair)
        np.testing.assert_allclose(again["low"], result["seeds_and_items"]["low"], rtol=1e-4)
    tables = (out / "tables.md").read_text()
    assert "over seeds and windows" in tables and "rewired_beta_0.5 - rewired" in tables
    for figure in ("perplexity_intervals", "beta", "passkey_heatmaps", "recall_by_length"):
        assert (out / f"{figure}.png").stat().st_size > 5_000
    # Retrieval: the rewired and baseline runs trained on the mixture, scored on the same prompts.
    retrieval = summary["retrieval"]
    assert {run["run"] for run in retrieval["runs"]} == {run.name for run in round2_retrieval.runs(quick=True)}
    assert all(run["passkey"]["filler"] == "text" for run in retrieval["runs"])
    comparison = retrieval["comparison"]
    assert comparison["passkey_rank"]["grid"]["seeds_and_items"]["items"] == 2 * 3 * 2  # lengths x depths x trials
    assert set(comparison["recall"]) == {"256", "512"}
    assert "passkey rank, whole grid" in tables and "recall @ 512" in tables
    assert round2_retrieval.compare(round2_report.runs_by_group_and_seed(retrieval["runs"])) == \
        json.loads(json.dumps(comparison))  # the published runs give the same intervals again
    capsys.readouterr()
    assert round2.main(["--quick", f"--workdir={tmp_path}", "--parts=precision"]) == 0
    printed = capsys.readouterr().out
    assert "nothing to train" in printed and "] length " not in printed  # no evaluation again


@pytest.mark.parametrize("script", ["round2", "study"])
def test_a_signal_during_training_stops_the_study_without_scoring_the_half_trained_run(
        script, tmp_path, monkeypatch, capsys):
    """The trainer saves and returns early on SIGTERM; the study must stop there (exit 143 and
    how to continue), not score the half-trained model nor start the next run (round 2's first
    beta run was once scored at step 556 of 1000 this way)."""
    import runner  # experiments/runner.py

    trained, scored = [], []

    def fake_train(config, run_dir, devices=None, log=print):
        trained.append(run_dir)
        stopped = len(trained) == 2
        return {"stopped_by": "SIGTERM" if stopped else None, "final_step": 7 if stopped else config.steps}

    module = {"round2": round2, "study": study}[script]
    monkeypatch.setattr(runner, "train_and_evaluate", fake_train)
    monkeypatch.setattr(module, "evaluate", lambda run, *args, **kwargs: scored.append(run.name) or {})
    assert module.main(["--quick", f"--workdir={tmp_path}"]) == 143
    assert len(trained) == 2 and len(scored) == 1
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert "stopped by SIGTERM at step 7 (saved); run the same command again to continue" in printed
    assert not list(tmp_path.rglob("results.json"))


def test_round2_flags_fail_in_one_line(capsys):
    with pytest.raises(SystemExit):
        round2.main(["--parts=precision,recall"])
    assert "--parts='precision,recall': choose from precision, beta, retrieval" in capsys.readouterr().err


def test_published_round2_tables_and_intervals_follow_from_the_published_results(tmp_path):
    """docs/results/round2/tables.md (quoted by docs/results.md) is what round2_report makes of
    the published results.json, and every published interval is what the bootstrap gives again
    from the published per-window losses."""
    import numpy as np
    from runway_jax.evaluation import bootstrap

    published = ROOT / "docs" / "results" / "round2"
    summary = json.loads((published / "results.json").read_text())
    assert not summary["quick"]
    expected = {run.name for part in summary["parts"] if part != "retrieval" for run in round2.parts()[part]}
    assert {f"{run['group']}/seed{run['seed']}" for run in summary["runs"]} == expected
    round2_report.write(summary, str(tmp_path))
    strip = lambda text: text.split("-->", 1)[1]  # the header names the generating command
    assert strip((tmp_path / "tables.md").read_text()) == strip((published / "tables.md").read_text())
    losses = np.load(published / "window_losses.npz", allow_pickle=False)
    for name, by_length in summary["comparisons"].items():
        candidate, reference = name.split(" - ")
        for length, result in by_length.items():
            pair = [np.stack([losses[f"{group}/seed{seed}/{length}"] for seed in (0, 1, 2)])
                    for group in (candidate, reference)]
            again = bootstrap.paired_difference(*pair)
            for key in ("difference", "low", "high"):
                np.testing.assert_allclose(again[key], result["seeds_and_items"][key], rtol=1e-3,
                                           atol=1e-4, err_msg=f"{name} @ {length}: {key}")


def test_retrieval_comparison_finds_a_lost_middle_and_a_better_model():
    """round2_retrieval.compare on made-up outcomes: a baseline that finds the key only at the
    ends of the prompt has a lost-in-the-middle gap; a rewired model that finds it everywhere
    has none and is better on the whole grid; recall differences carry their own verdict."""
    rng = np.random.default_rng(0)
    depths, lengths, trials = [0.0, 0.25, 0.5, 0.75, 1.0], [512, 1024], 10
    ends = np.isin(depths, round2_retrieval.END_DEPTHS)

    def run(everywhere, recall_accuracy):
        outcomes = (rng.random((len(lengths), len(depths), trials)) < np.where(everywhere | ends, 0.9, 0.1)[None, :, None])
        grid = {"lengths": lengths, "depths": depths, "trials": trials,
                "rank_correct": outcomes.astype(int).tolist(), "exact_correct": outcomes.astype(int).tolist()}
        return {"passkey": grid, "training_length": 512,
                "recall": {"512": {"example_accuracy": (recall_accuracy + 0.01 * rng.standard_normal(32)).tolist()}}}

    evaluated = {"retrieval_rewired": {s: run(True, 0.6) for s in range(3)},
                 "retrieval_baseline": {s: run(False, 0.6) for s in range(3)}}
    comparison = round2_retrieval.compare(evaluated)
    rank = comparison["passkey_rank"]
    assert rank["grid"]["verdict"] == "better" and rank["grid"]["seeds_and_items"]["items"] == 100
    assert rank["middle_gap"]["retrieval_baseline"]["verdict"] == "better"  # the middle is worse
    assert rank["middle_gap"]["retrieval_rewired"]["verdict"] == "not decided"
    assert rank["middle_gap"]["rewired - baseline"]["verdict"] == "better"  # a smaller gap
    assert comparison["recall"]["512"]["verdict"] == "not decided"
    assert "| baseline | rank |" in round2_retrieval.table(comparison)
