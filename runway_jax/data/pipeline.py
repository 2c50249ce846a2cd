"""Grain pipelines: every source (embedded corpus, local files, synthetic tasks) through one
function, :func:`make_dataset`, into batches of packed rows.

A batch is a dict of numpy arrays, each ``[local_batch, seq_len]``:

  inputs, targets   int32 tokens; ``targets[t] = inputs[t + 1]`` of the same row
  segment_ids       int32 document of each token in its row (1, 2, ...; 0 is padding), METHOD (5)
  positions         int32 position of each token in its document piece (restarts at 0)
  loss_mask         float32 1 where the target is a real token of the same document

Packing (``DataConfig.packing``):

  "chunk"  tokenize everything once, concatenate documents (each ending in EOS) and cut the stream
           into rows; random access, so rows are shuffled globally every epoch. For corpora that
           fit in memory (the embedded corpus, local files up to a few hundred MB).
  "pack"   streaming: shuffle documents, tokenize lazily and concatenate-then-split them with
           Grain's ``ConcatThenSplitIterDataset``. For large corpora (C4-style files).

Either way the iterator's state is Grain's own (``iterator.get_state()`` /
``iterator.set_state(state)``), so training resumes at exactly the next batch, and each JAX
process reads only its part: with "chunk" its block of every global batch (so the global batches
do not depend on the number of processes), with "pack" every ``process_count``-th document.
"""

from __future__ import annotations

import functools
from typing import Optional

import grain
import numpy as np

from runway_jax.data import corpus, sources, synthetic
from runway_jax.data.config import PACKINGS, SYNTHETIC_SOURCES, DataConfig
from runway_jax.data.errors import DataError
from runway_jax.data.tokenizers import load_tokenizer

SPLITS = ("train", "validation")
VALIDATION_EVERY = 100  # files without a validation_source: every 100th document is held out
CHUNK_LIMIT_BYTES = 256 * 2**20  # packing="auto" streams file sets larger than this


def document_source(config: DataConfig, split: str):
    """Random-access documents of ``split``: lazy for files (nothing is read until asked for)."""
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {SPLITS}.")
    if config.source in SYNTHETIC_SOURCES:
        raise DataError(f"source={config.source!r} is synthetic and has no text documents.")
    if config.source == "shakespeare":
        return corpus.shakespeare_documents(split)
    if split == "validation" and config.validation_source:
        return sources.DocumentSource(config.validation_source, text_field=config.text_field)
    every = sources.DocumentSource(config.source, text_field=config.text_field)
    return every if config.validation_source else _HeldOut(every, split, config.source)


def documents(config: DataConfig, split: str) -> list[str]:
    """The non-empty text documents of ``split``, read into memory."""
    return [document for document in document_source(config, split) if document]


class _HeldOut:
    """Every ``VALIDATION_EVERY``-th document (indices 99, 199, ...) is validation, the rest train;
    a lazy view, so the split of a huge file set costs nothing."""

    def __init__(self, source, split, name):
        self.source, self.split = source, split
        held_out = len(source) // VALIDATION_EVERY
        self.length = held_out if split == "validation" else len(source) - held_out
        if self.length == 0:
            raise DataError(f"source {name!r} has too few documents for a {split} split (every "
                            f"{VALIDATION_EVERY}th is held out); set validation_source.")

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        if self.split == "validation":
            return self.source[VALIDATION_EVERY * index + VALIDATION_EVERY - 1]
        return self.source[index + index // (VALIDATION_EVERY - 1)]


def make_tokenizer(config: DataConfig, workdir: Optional[str] = None, *, retrain: bool = False):
    """The tokenizer of ``config``; a ``"bpe"`` one is trained on the training split once and kept
    as ``workdir/tokenizer.json`` so evaluation reuses exactly it (``retrain``: trained anew, not
    saved; a fresh run saves it only after its start-up checks)."""
    return load_tokenizer(config.tokenizer, workdir=workdir, bpe_vocab_size=config.bpe_vocab_size,
                          train_texts=lambda: documents(config, "train"), retrain=retrain)


def make_dataset(config: DataConfig, split: str, tokenizer, *, process_index: int = 0,
                 process_count: int = 1, num_epochs: Optional[int] = None) -> grain.IterDataset:
    """Batches of ``split`` for one process (see the module docstring for their layout).

    Training (``num_epochs=None``) repeats forever, reshuffling every epoch; validation is not
    shuffled and ``num_epochs`` defaults to 1 for it. Incomplete final batches are dropped, so
    every batch has the same shape.
    """
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {SPLITS}.")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    if config.batch_size % process_count:
        raise DataError(f"batch_size={config.batch_size} must be divisible by the {process_count} processes.")
    train = split == "train"
    if num_epochs is None and not train:
        num_epochs = 1
    row_length = config.seq_len + 1  # inputs and the targets shifted by one

    if config.source in SYNTHETIC_SOURCES:
        rows = _synthetic_rows(config, split, tokenizer, row_length)
        return _finish(rows, config, train, process_index, process_count, num_epochs)
    if _packing(config) == "chunk":
        texts = tuple(documents(config, split))
        rows = _chunked_rows(texts, tokenizer, row_length)
        if train and config.synthetic_share:
            rows = _with_retrieval_rows(rows, texts, config, tokenizer, row_length)
        return _finish(rows, config, train, process_index, process_count, num_epochs)

    dataset = grain.MapDataset.source(document_source(config, split))[process_index::process_count]
    if len(dataset) == 0:
        raise DataError(f"process {process_index} of {process_count} got no {split} documents; "
                        "use fewer processes or more files.")
    if train:
        dataset = dataset.shuffle(seed=config.shuffle_seed)
    dataset = dataset.repeat(num_epochs)
    dataset = dataset.map(lambda text: {"tokens": _with_eos(tokenizer.encode(text), tokenizer)})
    dataset = grain.experimental.ConcatThenSplitIterDataset(
        dataset.to_iter_dataset(), length_struct={"tokens": row_length})
    dataset = dataset.map(functools.partial(_example, pad_id=tokenizer.pad_id))
    return _batch(dataset, config, process_count)


# ----------------------------------------------------------------------------------------------


def _packing(config):
    """"auto": chunk what fits comfortably in memory (the embedded corpus, files up to
    ``CHUNK_LIMIT_BYTES``), stream-pack anything larger."""
    if config.packing != "auto":
        return config.packing
    if config.source == "shakespeare":
        return "chunk"
    return "chunk" if sources.total_bytes(config.source) <= CHUNK_LIMIT_BYTES else "pack"


def _with_eos(tokens, tokenizer):
    return np.concatenate([np.asarray(tokens, np.int32), np.array([tokenizer.eos_id], np.int32)])


def _example(row, pad_id):
    """Packed row of ``seq_len + 1`` tokens -> model inputs and shifted targets."""
    tokens, segments = row["tokens"], row["tokens_segment_ids"]
    tokens = np.where(segments > 0, tokens, pad_id).astype(np.int32)
    same_document = (segments[1:] == segments[:-1]) & (segments[:-1] > 0)
    loss_mask = same_document if "loss_mask" not in row else same_document & row["loss_mask"][:-1]
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "segment_ids": segments[:-1].astype(np.int32),
        "positions": row["tokens_positions"][:-1].astype(np.int32),
        "loss_mask": loss_mask.astype(np.float32),
    }


class _ChunkedRows:
    """Random-access rows of a concatenated token stream, each ``row_length`` tokens starting
    every ``row_length - 1`` tokens (the last target of a row is the next row's first input)."""

    def __init__(self, texts, tokenizer, row_length):
        pieces = [_with_eos(tokenizer.encode(text), tokenizer) for text in texts]
        if not pieces or sum(len(p) for p in pieces) < 2:
            raise DataError("the source has no tokens to train on; check that its files hold text.")
        self.stream = np.concatenate(pieces)
        self.document_starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
        self.row_length = row_length
        self.pad_id = tokenizer.pad_id
        self.length = max(1, -(-(len(self.stream) - 1) // (row_length - 1)))

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        start = index * (self.row_length - 1)
        tokens = self.stream[start:start + self.row_length]
        indices = np.arange(start, start + len(tokens))
        documents = np.searchsorted(self.document_starts, indices, side="right") - 1
        piece_starts = np.maximum(self.document_starts[documents], start)
        segments = documents - documents[0] + 1
        padding = self.row_length - len(tokens)
        row = {
            "tokens": np.pad(tokens, (0, padding), constant_values=self.pad_id),
            "tokens_segment_ids": np.pad(segments, (0, padding)).astype(np.int32),
            "tokens_positions": np.pad(indices - piece_starts, (0, padding)).astype(np.int32),
        }
        return _example(row, self.pad_id)


@functools.lru_cache(maxsize=8)
def _chunked_rows(texts, tokenizer, row_length):
    # Cached: the train and validation pipelines of one run, and a restart, tokenize once.
    return grain.MapDataset.source(_ChunkedRows(texts, tokenizer, row_length))


def _synthetic_rows(config, split, tokenizer, row_length):
    # Disjoint seeds per split; each row is one example padded to the row length.
    seed = config.shuffle_seed * 2 + (split == "validation")
    size = 1_000_000 if split == "train" else 1_000

    def recall_row(index):
        example = synthetic.associative_recall(
            seed, index, num_pairs=config.recall_pairs, num_queries=config.recall_queries)
        return _padded(example["tokens"], example["loss_mask"], row_length, tokenizer.pad_id)

    def passkey_row(index):
        depth = float(np.random.default_rng([seed, index, 1]).uniform())
        prompt, answer = synthetic.passkey(seed, index, filler_chars=config.passkey_filler_chars,
                                           depth=depth, digits=config.passkey_digits)
        prompt_tokens, answer_tokens = tokenizer.encode(prompt), _with_eos(tokenizer.encode(answer), tokenizer)
        tokens = np.concatenate([prompt_tokens, answer_tokens])
        scored = np.arange(len(tokens)) >= len(prompt_tokens) - 1  # predict the answer and EOS
        return _padded(tokens, scored, row_length, tokenizer.pad_id)

    row = recall_row if config.source == "recall" else passkey_row
    row(0)  # an example that does not fit in a row fails here, at start-up
    return grain.MapDataset.range(size).map(row)


def _with_retrieval_rows(rows, texts, config, tokenizer, row_length):
    """``rows`` mixed with synthetic retrieval rows (``config.synthetic_share`` of the result, half
    passkey in the source's own text, half associative recall), in a fixed interleaving that
    :func:`_finish` then shuffles. The synthetic datasets are as long as ``rows``, so the text
    rows bound the mixture's length (about ``len(rows) / (1 - share)``)."""
    seed = config.shuffle_seed * 2 + 1_000_003  # apart from the synthetic sources' own seeds
    filler_text = " ".join(texts)
    chars_per_token = max(1.0, len(texts[0][:20_000]) / max(1, len(tokenizer.encode(texts[0][:20_000]))))

    def passkey_row(index):
        depth = float(np.random.default_rng([seed, index, 1]).uniform())
        # Fill the row: start from the characters that should fit, shrink until the example does.
        filler_chars = int(row_length * chars_per_token)
        for _ in range(20):
            prompt, answer = synthetic.passkey(seed, index, filler_chars=filler_chars, depth=depth,
                                               digits=config.passkey_digits, filler_text=filler_text)
            prompt_tokens = tokenizer.encode(prompt)
            tokens = np.concatenate([prompt_tokens, _with_eos(tokenizer.encode(answer), tokenizer)])
            if len(tokens) <= row_length:
                break
            filler_chars = int(filler_chars * 0.9 * row_length / len(tokens))
        scored = np.arange(len(tokens)) >= len(prompt_tokens) - 1  # predict the key and EOS
        return _padded(tokens, scored, row_length, tokenizer.pad_id)

    def recall_row(index):
        example = synthetic.associative_recall(
            seed, index, num_pairs=config.recall_pairs, num_queries=config.recall_queries)
        return _padded(example["tokens"], example["loss_mask"], row_length, tokenizer.pad_id)

    passkey_row(0), recall_row(0)  # a task longer than a row fails here, at start-up
    synthetic_rows = [grain.MapDataset.range(len(rows)).map(fn) for fn in (passkey_row, recall_row)]
    share = config.synthetic_share
    return grain.MapDataset.mix([rows, *synthetic_rows], weights=[1 - share, share / 2, share / 2])


def _padded(tokens, scored, row_length, pad_id):
    if len(tokens) > row_length:
        raise DataError(f"a synthetic example has {len(tokens)} tokens but seq_len + 1 = {row_length}; "
                        f"raise seq_len to >= {len(tokens) - 1} or make the task smaller.")
    padding = row_length - len(tokens)
    row = {
        "tokens": np.pad(tokens, (0, padding), constant_values=pad_id).astype(np.int32),
        "tokens_segment_ids": np.pad(np.ones(len(tokens), np.int32), (0, padding)),
        "tokens_positions": np.pad(np.arange(len(tokens), dtype=np.int32), (0, padding)),
        "loss_mask": np.pad(np.asarray(scored, bool), (0, padding)),
    }
    return _example(row, pad_id)


def _finish(rows, config, train, process_index, process_count, num_epochs):
    """Shuffle (per epoch) and repeat all rows, then give this process its block of every global
    batch: global batch b is rows ``[b * G, (b + 1) * G)`` of the shuffled order and process p
    reads only rows ``b * G + p * L ... + L - 1`` (L = G / process_count). The global batches are
    therefore the same whatever the number of processes, so a multi-host run reproduces a
    single-host one."""
    global_batch = config.batch_size
    local_batch = global_batch // process_count
    if len(rows) < global_batch:
        raise DataError(f"the data has {len(rows)} rows, fewer than one batch of {global_batch}; "
                        "lower batch_size or seq_len.")
    if train:
        rows = rows.shuffle(seed=config.shuffle_seed)
    rows = rows.repeat(num_epochs)
    offset = process_index * local_batch

    def own_row(index):
        return rows[index // local_batch * global_batch + offset + index % local_batch]

    own_rows = grain.MapDataset.range(len(rows) // global_batch * local_batch).map(own_row)
    return _batch(own_rows.to_iter_dataset(), config, process_count)


def _batch(dataset, config, process_count):
    dataset = dataset.batch(config.batch_size // process_count, drop_remainder=True)
    if config.worker_count:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            # Grain's worker processes read absl flags; programs not started by absl.app have
            # not parsed them, so take the defaults.
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return dataset
