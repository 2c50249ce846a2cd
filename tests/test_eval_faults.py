"""Bad input to the evaluation programs: every case is refused up front (before a model is loaded)
with exit code 2 and one line naming the flag, and nothing is written; results are written
atomically; the figures label their axes plainly and mark chance and the training length."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))

# (name, script, flags after --workdir=TRAINED, the flag the message must name, more it must say).
# "{missing}" and "{untrained}" are workdirs the fixture makes (the second has no checkpoint).
FLAG_CASES = [
    ("passkey_zero_length", "passkey.py", ["--lengths=0"], "--lengths", "> 0"),
    ("perplexity_zero_length", "perplexity.py", ["--lengths=0"], "--lengths", "> 0"),
    ("perplexity_text_length", "perplexity.py", ["--lengths=abc"], "--lengths", "numbers"),
    ("perplexity_under_a_token", "perplexity.py", ["--lengths=0.01"], "--lengths", "under one token"),
    ("perplexity_windows", "perplexity.py", ["--max_windows=0"], "--max_windows", "positive"),
    ("passkey_depth", "passkey.py", ["--depths=0,1.5"], "--depths", "[0, 1]"),
    ("passkey_trials", "passkey.py", ["--trials=-2"], "--trials", "positive"),
    ("passkey_trials_text", "passkey.py", ["--trials=two"], "--trials", "whole number"),
    ("passkey_seed", "passkey.py", ["--seed=-1"], "--seed", ">= 0"),
    ("passkey_typo", "passkey.py", ["--lenghts=2"], "--lenghts", "did you mean --lengths"),
    ("passkey_abbreviation", "passkey.py", ["--length=2"], "--length", "did you mean --lengths"),
    ("zero_shot_batch", "zero_shot.py", ["--tasks=arc_easy", "--batch_size=0"], "--batch_size", "positive"),
    ("zero_shot_task", "zero_shot.py", ["--tasks=arc_eazy"], "--tasks", "not shipped"),
    ("zero_shot_no_task", "zero_shot.py", ["--tasks=,"], "--tasks", "names no task"),
    ("zero_shot_format", "zero_shot.py", ["--tasks=arc_easy", "--format=xml"], "--format", "not one of"),
    ("analysis_early", "runway_analysis.py", ["--length=16", "--early_tokens=16"], "--early_tokens", "below"),
    ("analysis_length", "runway_analysis.py", ["--length=1"], "--length", ">= 2"),
    ("analysis_probes", "runway_analysis.py", ["--probes=0"], "--probes", "positive"),
    ("compare_typo", "perplexity.py", ["--compare", "{missing}"], "--compare", "does not exist"),
    ("compare_untrained", "passkey.py", ["--compare={untrained}"], "--compare", "has no checkpoint yet"),
]
# eval/recall.py trains its own models: its --workdir need not exist, and must still not after.
RECALL_CASES = [
    ("recall_pairs", ["--pairs=0"], "--pairs", "[1, 64]"),
    ("recall_seeds", ["--seeds=a,b"], "--seeds", "integers"),
    ("recall_queries", ["--queries=0"], "--queries", "[1, 10000]"),
    ("recall_batches", ["--eval_batches=-1"], "--eval_batches", "positive"),
]


def _run(script, argv):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.run([sys.executable, str(ROOT / "eval" / script), *argv], capture_output=True,
                             text=True, env=env, timeout=300)
    return process.returncode, process.stdout, process.stderr


def _snapshot(path):
    """Every file under ``path`` with its size and modification time."""
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in pathlib.Path(path).rglob("*") if p.is_file())


def _one_line_error(stderr, flag, detail):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert flag in lines[0] and detail in lines[0], lines[0]


@pytest.fixture(scope="module")
def refused(trained, tmp_path_factory):
    """Every bad-input case run as its own process (a few at a time), with the trained
    workdirs' files before and after."""
    root = tmp_path_factory.mktemp("refused")
    untrained = root / "untrained"
    untrained.mkdir()
    shutil.copy(trained["rewired"] / "config.json", untrained / "config.json")
    names = {"missing": str(root / "missing"), "untrained": str(untrained)}
    jobs = {name: (script, [f"--workdir={trained['rewired']}"] + [a.format(**names) for a in argv])
            for name, script, argv, _, _ in FLAG_CASES}
    jobs.update({name: ("recall.py", [f"--workdir={root / 'recall'}", *argv]) for name, argv, _, _ in RECALL_CASES})
    before = {name: _snapshot(trained[name]) for name in trained}
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(jobs, pool.map(lambda job: _run(*job), jobs.values())))
    after = {name: _snapshot(trained[name]) for name in trained}
    return {"results": results, "unchanged": before == after, "root": root}


@pytest.mark.parametrize("name, flag, detail", [(c[0], *c[-2:]) for c in FLAG_CASES + RECALL_CASES])
def test_a_bad_flag_is_one_line_naming_it_exit_2_before_any_model_is_loaded(refused, name, flag, detail):
    code, stdout, stderr = refused["results"][name]
    assert code == 2, (stdout, stderr)
    _one_line_error(stderr, flag, detail)
    assert stdout == ""  # no model was loaded, let alone evaluated ("DIR: step N, ...")


def test_refused_runs_write_nothing(refused):
    assert refused["unchanged"]
    assert not (refused["root"] / "recall").exists() and not (refused["root"] / "missing").exists()
    assert sorted(p.name for p in (refused["root"] / "untrained").iterdir()) == ["config.json"]


def test_flags_are_checked_before_the_heavy_imports(trained):
    """A refused flag never gets as far as Orbax or matplotlib (nor JAX, where importing
    ``runway_jax`` alone does not import it)."""
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import runway_jax.files;"
        "light = 'jax' not in sys.modules; import passkey;"
        "code = passkey.main(['--workdir=' + sys.argv[2], '--lengths=0']);"
        "heavy = ['orbax.checkpoint', 'matplotlib', 'runway_jax.evaluation.workdirs']"
        " + (['jax', 'flax'] if light else []);"
        "print(code, [m for m in heavy if m in sys.modules])"
    )
    process = subprocess.run([sys.executable, "-c", probe, str(ROOT / "eval"), str(trained["rewired"])],
                             capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert process.stdout.strip() == "2 []", process.stdout + process.stderr


def test_an_eval_path_that_is_a_file_is_refused_before_evaluating(trained, tmp_path):
    """WORKDIR/eval cannot be created (a file holds its name): the run stops before evaluating."""
    workdir = tmp_path / "copy"
    shutil.copytree(trained["rewired"], workdir, ignore=shutil.ignore_patterns("eval"))
    (workdir / "eval").write_text("not a directory")
    before = _snapshot(workdir)
    code, stdout, stderr = _run("perplexity.py", [f"--workdir={workdir}", "--lengths=1"])
    assert code == 2 and stdout == ""
    _one_line_error(stderr, "--workdir", "is a file")
    assert _snapshot(workdir) == before


def test_a_read_only_workdir_is_refused_before_evaluating(trained, monkeypatch, capsys):
    """Tests run as root, where chmod does not stop writes: the probe write fails as on a
    read-only file system."""
    import errno
    import tempfile

    import passkey as passkey_script  # eval/passkey.py

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert passkey_script.main([f"--workdir={trained['rewired']}", "--lengths=1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    _one_line_error(captured.err, "--workdir", "Read-only file system")


def test_lengths_no_held_out_document_reaches_are_one_line_naming_the_flag(trained, capsys):
    import perplexity as perplexity_script  # eval/perplexity.py

    eval_dir = trained["rewired"] / "eval"
    before = _snapshot(eval_dir) if eval_dir.exists() else []
    assert perplexity_script.main([f"--workdir={trained['rewired']}", "--lengths=64", "--max_windows=1"]) == 2
    _one_line_error(capsys.readouterr().err, "--lengths", "no held-out document")
    assert (_snapshot(eval_dir) if eval_dir.exists() else []) == before


def test_every_flag_of_every_program_says_what_it_does(monkeypatch):
    from runway_jax.evaluation import flags

    class Captured(Exception):
        pass

    parsers = []

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise Captured

    monkeypatch.setattr(flags.FlagParser, "parse_known_args", capture)
    import passkey, perplexity, recall, runway_analysis, zero_shot  # noqa: E401  (eval/*.py)

    for program in (passkey, perplexity, recall, runway_analysis, zero_shot):
        with pytest.raises(Captured):
            program.main([])
    assert len(parsers) == 5
    for parser in parsers:
        for action in parser._actions:
            assert action.help and len(action.help) > 10, (parser.prog, action.option_strings)


def test_recall_pair_limit_is_the_task_key_vocabulary():
    import recall as recall_script  # eval/recall.py

    from runway_jax.evaluation import recall

    assert recall_script.MAX_PAIRS == recall.NUM_KEYS


def test_zero_shot_formats_are_the_readers_formats():
    import zero_shot as zero_shot_script  # eval/zero_shot.py

    from runway_jax.data import benchmark_formats

    assert set(zero_shot_script.FORMATS) == {"auto", "olmo", *benchmark_formats.FORMATS}


# --- atomic writes ------------------------------------------------------------------------------


def test_a_report_that_fails_mid_write_leaves_the_previous_one_whole(tmp_path):
    from runway_jax.evaluation.reports import run_evaluation

    (tmp_path / "eval").mkdir()
    previous = {"rewire": True, "value": 1}
    (tmp_path / "eval" / "thing.json").write_text(json.dumps(previous))
    unserializable = {"rewire": True, "value": 2, "array": object()}  # json.dump fails half-way
    with pytest.raises(TypeError):
        run_evaluation("thing", str(tmp_path), [], lambda w: (unserializable, None), lambda *a: None)
    assert json.loads((tmp_path / "eval" / "thing.json").read_text()) == previous
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["thing.json"]  # no temporary left


def test_benchmark_results_that_fail_mid_write_leave_the_previous_ones_whole(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import write_results  # benchmarks/common.py

    path = tmp_path / "results.json"
    write_results({"ms": 1.0}, str(path))
    with pytest.raises(TypeError):
        write_results({"ms": 2.0, "bad": object()}, str(path))
    assert json.loads(path.read_text()) == {"ms": 1.0} and os.listdir(tmp_path) == ["results.json"]


# --- figures --------------------------------------------------------------------------------------


@pytest.fixture
def figures(monkeypatch, tmp_path):
    """The figures the plot functions make, kept open instead of only written."""
    from runway_jax.evaluation import plots

    made = []
    real = plots.save_png

    def keep(figure, path, dpi=100):
        made.append(figure)
        real(figure, path, dpi)

    monkeypatch.setattr(plots, "save_png", keep)
    return made


def _labels(axis, which="x"):
    ticks = axis.get_xticklabels() if which == "x" else axis.get_yticklabels()
    return [tick.get_text() for tick in ticks if tick.get_text()]


def test_perplexity_plot_has_plain_length_ticks_and_marks_the_training_length(figures, tmp_path):
    from runway_jax.evaluation import perplexity

    def curve(scale):
        return {n: {"perplexity": scale * (10 + n / 32), "position_loss": list(np.linspace(3, 4, n))}
                for n in (32, 64, 128, 256)}

    perplexity.plot({"a": curve(1.0), "b": curve(1.1)}, 32, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 10_000
    left, right = figures[0].axes
    assert _labels(left) == ["32 (train)", "64", "128", "256"]
    plain = _labels(left, "y") + [tick.get_text() for tick in left.get_yticklabels(minor=True)]
    assert plain and all(text == "" or text.replace(".", "").isdigit() for text in plain), plain
    for axis in (left, right):  # the dashed training-length line, named in the legend
        assert any(line.get_label() == "training length (32)" and list(line.get_xdata()) == [32, 32]
                   for line in axis.get_lines())


def test_passkey_heatmaps_show_chance_and_trials_per_cell(figures, tmp_path):
    from runway_jax.evaluation import passkey

    grid = {"lengths": [32, 64], "depths": [0.0, 1.0], "exact_accuracy": [[0.0, 0.5], [1.0, 0.25]],
            "rank_accuracy": [[0.25, 0.5], [1.0, 0.0]], "trials": 4, "chance_rank_accuracy": 0.1,
            "training_length": 32}
    passkey.plot({"model": grid}, str(tmp_path / "k.png"))
    exact, rank = figures[0].axes[:2]  # then their colour bars
    assert "chance 0.10" in rank.get_title() and "4 trials per cell" in rank.get_title()
    assert "chance 1/90,000" in exact.get_title()
    assert sorted(text.get_text() for text in exact.texts) == ["0/4", "1/4", "2/4", "4/4"]
    assert _labels(rank, "y") == ["32 (train)", "64"]


def test_recall_plot_draws_chance_and_plain_pair_ticks(figures, tmp_path):
    from runway_jax.evaluation import recall

    summary = {"mean": 0.5, "min": 0.4, "max": 0.6}
    recall.plot({"rewired": {4: summary, 16: summary}, "baseline": {4: summary, 16: summary}},
                str(tmp_path / "r.png"))
    (axis,) = figures[0].axes
    assert _labels(axis) == ["4", "16"]
    chance = [line for line in axis.get_lines() if line.get_label().startswith("chance: 1 / pairs")]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [0.25, 0.0625]


def test_runway_analysis_bars_are_ticked_at_the_layers(figures, tmp_path):
    from runway_jax.evaluation import runway_analysis

    early = [{"mass": 0.4, "uniform": 0.3}, {"mass": 0.6, "uniform": 0.3}]
    curves = {name: {"maps": [{}, {}], "early": early, "distance": np.linspace(2, 1, 8)}
              for name in ("rewired", "baseline")}
    runway_analysis.plot(curves, str(tmp_path / "a.png"))
    mass = figures[0].axes[2]
    assert list(mass.get_xticks()) == [0, 1] and mass.get_xlim()[0] > -1
    assert mass.get_ylim() == pytest.approx((0, 1.3 * 0.6))
