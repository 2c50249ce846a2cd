"""Data: the embedded corpus, local files, synthetic tasks, tokenizers and Grain pipelines.

The training and evaluation programs read every source through :func:`make_dataset`.
``DataConfig`` and ``DataError`` import no JAX or Grain; the pipeline names are imported on
first use (so that flags are checked before the heavy imports).
"""

import importlib

from runway_jax.data.config import DataConfig
from runway_jax.data.errors import DataError

_LAZY = {
    "ByteTokenizer": "runway_jax.data.tokenizers",
    "check_vocabulary": "runway_jax.data.tokenizers",
    "load_tokenizer": "runway_jax.data.tokenizers",
    "document_source": "runway_jax.data.pipeline",
    "documents": "runway_jax.data.pipeline",
    "make_dataset": "runway_jax.data.pipeline",
    "make_tokenizer": "runway_jax.data.pipeline",
}

__all__ = sorted(["DataConfig", "DataError", *_LAZY])


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'runway_jax.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
