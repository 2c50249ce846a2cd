"""``DataConfig``: where tokens come from and how they are cut into batches. No JAX or Grain
here, so that flags are validated before either is imported."""

from __future__ import annotations

import dataclasses
from typing import Optional

from runway_jax.data.errors import DataError

SYNTHETIC_SOURCES = ("recall", "passkey")
PACKINGS = ("auto", "chunk", "pack")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from and how they are cut into batches; validated on construction."""

    source: str = "shakespeare"
    """"shakespeare" (embedded), "recall" or "passkey" (synthetic), or data files: a path, a glob
    or a comma-separated list (.txt/.md: one document per file; .jsonl/.parquet/.arrayrecord: one
    per row)."""
    validation_source: Optional[str] = None
    """Files for validation; None: held-out plays, or every 100th document of source."""
    tokenizer: str = "byte"
    """"byte", "bpe" (trained on the training split, kept as WORKDIR/tokenizer.json), or a path
    to a tokenizer.json or SentencePiece .model."""
    bpe_vocab_size: int = 4096
    """Vocabulary size of a BPE trained here (tokenizer=bpe); vocab_size must be >= it."""
    seq_len: int = 256
    """Tokens per training row (the training length)."""
    batch_size: int = 16
    """Rows per optimizer step, over all processes and devices."""
    packing: str = "auto"
    """"chunk" (tokenize all, cut the stream; in memory), "pack" (streaming), or "auto": chunk up
    to 256 MiB of files, else pack."""
    text_field: str = "text"
    """JSONL / Parquet / ArrayRecord field holding the text."""
    shuffle_seed: int = 0
    """Seed of the order of the training rows (and of the synthetic examples)."""
    worker_count: int = 0
    """Grain worker processes for reading data (0: in the main process)."""
    recall_pairs: int = 16
    """Associative recall: key-value pairs per example."""
    recall_queries: int = 8
    """Associative recall: queried keys per example."""
    passkey_filler_chars: int = 2000
    """Passkey: characters of filler text around the key."""
    passkey_digits: int = 5
    """Passkey: digits of the key."""
    synthetic_share: float = 0.0
    """Share of the training rows that are synthetic retrieval rows mixed into a text source, half
    passkey (the key hidden in the source's own text) and half associative recall (recall_pairs,
    recall_queries), each one row of seq_len tokens scored on its answer only; 0 <= share < 1.
    Validation stays the held-out text."""

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "bpe_vocab_size", "worker_count", "shuffle_seed",
                     "recall_pairs", "recall_queries", "passkey_filler_chars", "passkey_digits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise DataError(f"{name}={value!r} must be an integer.")
        if self.seq_len < 2:
            raise DataError(f"seq_len={self.seq_len} is too short; use seq_len >= 2.")
        for name in ("batch_size", "recall_pairs", "recall_queries", "passkey_digits"):
            if getattr(self, name) < 1:
                raise DataError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.packing not in PACKINGS:
            raise DataError(f"packing={self.packing!r} is not one of {PACKINGS}.")
        for name in ("worker_count", "passkey_filler_chars", "shuffle_seed"):
            if getattr(self, name) < 0:
                raise DataError(f"{name}={getattr(self, name)} must be >= 0.")
        if not self.source:
            raise DataError("source is empty; use 'shakespeare', 'recall', 'passkey' or file paths.")
        share = self.synthetic_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise DataError(f"synthetic_share={share!r} must be a number in [0, 1).")
        if share and self.source in SYNTHETIC_SOURCES:
            raise DataError(f"synthetic_share={share} mixes retrieval rows into text; source="
                            f"{self.source!r} is synthetic already: use a text source.")
        if share and self.packing == "pack":
            raise DataError(f"synthetic_share={share} needs packing='chunk' or 'auto' (rows are "
                            "mixed in memory), not 'pack'.")
