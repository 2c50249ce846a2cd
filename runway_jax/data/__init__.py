"""Data: the embedded corpus, local files, synthetic tasks, tokenizers and Grain pipelines.

The training and evaluation programs read every source through :func:`make_dataset`.
"""

from runway_jax.data.errors import DataError
from runway_jax.data.pipeline import (DataConfig, document_source, documents, make_dataset,
                                      make_tokenizer)
from runway_jax.data.tokenizers import ByteTokenizer, check_vocabulary, load_tokenizer

__all__ = ["ByteTokenizer", "DataConfig", "DataError", "check_vocabulary", "document_source", "documents",
           "load_tokenizer", "make_dataset", "make_tokenizer"]
