"""Tokenizers: bytes (default, no files), a byte-level BPE trained on the training split, or any
local HF ``tokenizer.json`` or SentencePiece ``.model``. Nothing is downloaded.

Every tokenizer has ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``, ``encode(text) -> int32
array`` and ``decode(ids) -> str``.
"""

from __future__ import annotations

import os

import numpy as np

from runway_jax.data.errors import DataError
from runway_jax.files import write_text

BPE_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2 of a BPE trained here
TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes 0-255, then pad 256, bos 257, eos 258."""

    name = "byte"
    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str):
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HuggingFaceTokenizer:
    """A ``tokenizers`` ``tokenizer.json`` from a local path."""

    def __init__(self, path: str, tokenizer=None):
        """From the file ``path``, or (``tokenizer`` given) from a ``tokenizers.Tokenizer`` that
        will be saved at ``path`` with :meth:`save`."""
        from tokenizers import Tokenizer

        if tokenizer is None:
            if not os.path.isfile(path):
                problem = "is a directory" if os.path.isdir(path) else "does not exist"
                raise DataError(f"tokenizer file {path!r} {problem}; check the path.")
            try:
                tokenizer = Tokenizer.from_file(path)
            except Exception as error:
                reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
                raise DataError(f"tokenizer file {path!r} does not parse as a HF tokenizer.json ({reason}).") from None
        self.tokenizer = tokenizer
        self.name = path
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.pad_id = self._first_id("<pad>", "<|padding|>", "[PAD]")
        self.bos_id = self._first_id("<bos>", "<s>", "<|endoftext|>")
        self.eos_id = self._first_id("<eos>", "</s>", "<|endoftext|>")
        if self.eos_id is None:
            raise DataError(f"tokenizer file {path!r} has no end-of-text token (<eos>, </s> or <|endoftext|>).")
        if self.pad_id is None:
            self.pad_id = self.eos_id  # padding is masked out of the loss anyway
        if self.bos_id is None:
            self.bos_id = self.eos_id

    def _first_id(self, *tokens):
        for token in tokens:
            token_id = self.tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str):
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def save(self, path: str | None = None) -> None:
        """Write the tokenizer.json (to ``path``, default its own), atomically."""
        write_text(path or self.name, self.tokenizer.to_str(pretty=True))


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` from a local path."""

    def __init__(self, path: str):
        import sentencepiece

        if not os.path.isfile(path):
            problem = "is a directory" if os.path.isdir(path) else "does not exist"
            raise DataError(f"tokenizer file {path!r} {problem}; check the path.")
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception:
            raise DataError(f"tokenizer file {path!r} does not parse as a SentencePiece model.") from None
        self.name = path
        self.vocab_size = self.processor.get_piece_size()
        self.eos_id = self.processor.eos_id()
        if self.eos_id < 0:
            raise DataError(f"SentencePiece model {path!r} has no end-of-sentence id; train it with eos_id >= 0.")
        self.bos_id = self.processor.bos_id() if self.processor.bos_id() >= 0 else self.eos_id
        self.pad_id = self.processor.pad_id() if self.processor.pad_id() >= 0 else self.eos_id

    def encode(self, text: str):
        return np.asarray(self.processor.encode(text), np.int32)

    def decode(self, ids) -> str:
        return self.processor.decode([int(i) for i in np.asarray(ids).reshape(-1)])


def train_bpe(texts, vocab_size: int, path: str, *, save: bool = True) -> HuggingFaceTokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``texts``, named ``path`` and saved
    there unless ``save=False`` (training saves it only once every start-up check passed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(BPE_SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise DataError(f"bpe_vocab_size={vocab_size} is too small; a byte-level BPE needs >= {minimum}.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    trained = HuggingFaceTokenizer(path, tokenizer)
    if save:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        trained.save()  # atomic: eval never sees half a file
    return trained


def load_tokenizer(spec: str = "byte", *, workdir: str | None = None, train_texts=None,
                   bpe_vocab_size: int = 4096, retrain: bool = False):
    """``"byte"``; ``"bpe"`` (``workdir/tokenizer.json``, trained on ``train_texts()`` the first
    time; with ``retrain`` trained anew and NOT saved, whatever the workdir holds: the caller
    saves it when it starts a run); or a path to a ``tokenizer.json`` or SentencePiece ``.model``."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        if workdir is None:
            raise DataError("tokenizer='bpe' needs a workdir to keep tokenizer.json in; pass workdir.")
        path = os.path.join(workdir, TOKENIZER_FILE)
        if os.path.isfile(path) and not retrain:
            return HuggingFaceTokenizer(path)
        if train_texts is None:
            raise DataError(f"no {path!r} to load and no training texts to train a BPE on.")
        return train_bpe(train_texts(), bpe_vocab_size, path, save=not retrain)
    if spec.endswith(".json"):
        return HuggingFaceTokenizer(spec)
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    raise DataError(f"tokenizer={spec!r} is not 'byte', 'bpe', a tokenizer.json or a SentencePiece .model path.")


def check_vocabulary(tokenizer, model_vocab_size: int) -> None:
    """Fail early if token ids could index past the model's embedding table."""
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the model's vocab_size "
            f"is {model_vocab_size}; set the model's vocab_size >= {tokenizer.vocab_size}."
        )
