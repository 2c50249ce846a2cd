"""Documents from local files: plain text, JSONL, Parquet and ArrayRecord, by path or glob.

:class:`DocumentSource` is a lazy random-access sequence of documents (``str``) over all the files,
so corpora far larger than memory can be shuffled and sharded by document: opening it only
indexes the files (line offsets of JSONL, row-group sizes of Parquet, record counts of
ArrayRecord); a document is read when it is asked for. Plain-text files are one document each;
JSONL and Parquet rows give their ``text_field``; ArrayRecord records are UTF-8 text or JSON
objects with ``text_field``. Paths may be mounted bucket paths (anything ``open`` reads).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import threading

import numpy as np

from runway_jax.data.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrayrecord": "arrayrecord",
           ".array_record": "arrayrecord", **{suffix: "text" for suffix in TEXT_SUFFIXES}}


def expand_paths(patterns) -> list[str]:
    """Paths from a path, a glob, or a comma-separated list of them; sorted, each must exist."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    paths = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern.strip())
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"the glob {pattern!r} matches no file; check the path and pattern.")
            paths.extend(matches)
        elif os.path.isdir(pattern):
            raise DataError(f"data file {pattern!r} is a directory; pass the files in it, e.g. "
                            f"'{os.path.join(pattern, '*.txt')}' (a glob; quote it in a shell).")
        elif not os.path.isfile(pattern):
            raise DataError(f"data file {pattern!r} does not exist; check the path.")
        else:
            paths.append(pattern)
    if not paths:
        raise DataError("no data files were given; pass a path, a glob or a comma-separated list.")
    return paths


def file_format(path: str) -> str:
    for suffix, name in FORMATS.items():
        if path.endswith(suffix):
            return name
    raise DataError(f"data file {path!r} has an unknown suffix; use one of {sorted(FORMATS)}.")


class DocumentSource:
    """Lazy random-access documents of the files matched by ``patterns`` (sorted, file by file).

    Implements Grain's random-access source protocol (``__len__``, ``__getitem__``) and pickles
    without its open file handles, so Grain worker processes can use it.
    """

    def __init__(self, patterns, *, text_field: str = "text"):
        self.text_field = text_field
        self.files = []  # (format, path, what its indexer found: line offsets, row groups)
        counts = []
        for path in expand_paths(patterns):
            kind = file_format(path)
            count, index = _INDEXERS[kind](path, text_field)
            if count == 0:
                raise DataError(f"data file {path!r} holds no text; remove it or fill it.")
            self.files.append((kind, path, index))
            counts.append(count)
        self.starts = np.cumsum([0] + counts)
        self._local = threading.local()  # Grain reads from several threads: a handle each

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, index):
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} of {len(self)}")
        file_number = int(np.searchsorted(self.starts, index, side="right")) - 1
        kind, path, file_index = self.files[file_number]
        return _GETTERS[kind](self, path, file_index, index - int(self.starts[file_number]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getstate__(self):
        return {key: value for key, value in self.__dict__.items() if key != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def handle(self, path, opener):
        """This thread's open handle of ``path``."""
        handles = self._local.__dict__.setdefault("handles", {})
        if path not in handles:
            handles[path] = opener(path)
        return handles[path]


def read_documents(patterns, *, text_field: str = "text") -> list[str]:
    """All non-empty documents of the files matched by ``patterns``, read into memory."""
    return [document for document in DocumentSource(patterns, text_field=text_field) if document]


def total_bytes(patterns) -> int:
    """Total size on disk of the files matched by ``patterns``."""
    return sum(os.path.getsize(path) for path in expand_paths(patterns))


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise DataError(f"cannot read data file {path!r}: {error.strerror}; check its permissions.") from None


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where} is not UTF-8 (byte {error.start}); convert it, e.g. with iconv -t utf-8.") from None


def _text_field(record, field, where):
    if not isinstance(record, dict) or field not in record:
        raise DataError(f"{where} has no field {field!r}; set text_field to the field holding the text.")
    if not isinstance(record[field], str):
        raise DataError(f"{where} field {field!r} is not a string.")
    return record[field]


# Indexers: run once per file when the source opens. -------------------------------------------


def _index_text(path, text_field):
    del text_field
    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise DataError(f"cannot read data file {path!r}: {error.strerror}; check its permissions.") from None
    return (1 if size else 0), None


def _index_jsonl(path, text_field):
    """Byte offsets of the non-blank lines, found in 64 MiB chunks (never the whole file)."""
    del text_field
    starts, blank = [], []
    position = 0
    line_start = 0
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 26):
                newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + position
                for end in newlines:
                    starts.append(line_start)
                    blank.append(end - line_start)
                    line_start = end + 1
                position += len(chunk)
    except OSError as error:
        raise DataError(f"cannot read data file {path!r}: {error.strerror}; check its permissions.") from None
    if line_start < position:
        starts.append(line_start)
        blank.append(position - line_start)
    starts, lengths = np.asarray(starts, np.int64), np.asarray(blank, np.int64)
    # Lines of only whitespace (at most a few bytes) are skipped; others are checked when read.
    keep = lengths > 0
    if keep.any():
        with open(path, "rb") as handle:
            for i in np.flatnonzero(keep & (lengths <= 4)):
                handle.seek(starts[i])
                keep[i] = bool(handle.read(int(lengths[i])).strip())
    return int(keep.sum()), np.stack([starts[keep], lengths[keep]], 1)  # (offset, length) rows


def _index_parquet(path, text_field):
    import pyarrow.parquet as parquet

    try:
        metadata = parquet.ParquetFile(path)
        names = metadata.schema_arrow.names
    except Exception as error:  # pyarrow raises several types for corrupt files
        raise DataError(f"cannot read Parquet file {path!r} ({type(error).__name__}); is it a Parquet file?") from None
    if text_field not in names:
        raise DataError(f"Parquet file {path!r} has no column {text_field!r}; set text_field.")
    rows = [metadata.metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    boundaries = np.cumsum([0] + rows)
    return int(boundaries[-1]), boundaries


def _index_arrayrecord(path, text_field):
    del text_field
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path)
    except Exception as error:
        raise DataError(f"cannot read ArrayRecord file {path!r} ({error}); is it an ArrayRecord file?") from None
    count = reader.num_records()
    reader.close()
    return count, None


# Getters: read one document. ------------------------------------------------------------------


def _get_text(source, path, index, number):
    del source, index, number
    return _decode(_read_bytes(path), f"data file {path!r}")


def _get_jsonl(source, path, lines, number):
    handle = source.handle(path, lambda p: open(p, "rb"))
    offset, length = (int(x) for x in lines[number])
    handle.seek(offset)
    line = handle.read(length)
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problem = "not UTF-8" if isinstance(error, UnicodeDecodeError) else f"not valid JSON ({error.msg})"
        raise DataError(f"{_line_name(path, offset)} is {problem}; fix or remove the line.") from None
    if isinstance(record, dict) and isinstance(record.get(source.text_field), str):
        return record[source.text_field]
    return _text_field(record, source.text_field, _line_name(path, offset))  # raises, naming the line


def _line_name(path, offset):
    """``path:line`` of the line starting at byte ``offset`` (only on error paths: it reads)."""
    with open(path, "rb") as handle:
        line = handle.read(int(offset)).count(b"\n") + 1
    return f"{path}:{line}"


def _get_parquet(source, path, boundaries, number):
    group = int(np.searchsorted(boundaries, number, side="right")) - 1
    column = _parquet_row_group(path, group, source.text_field)
    text = column[number - int(boundaries[group])]
    return text if text is not None else ""


@functools.lru_cache(maxsize=4)
def _parquet_row_group(path, group, text_field):
    # Documents are shuffled by row group when read in order; a small cache serves the rows.
    import pyarrow.parquet as parquet

    return parquet.ParquetFile(path).read_row_group(group, columns=[text_field]).column(0).to_pylist()


def _get_arrayrecord(source, path, index, number):
    del index
    from array_record.python.array_record_module import ArrayRecordReader

    reader = source.handle(path, ArrayRecordReader)
    where = f"record {number} of {path!r}"
    text = _decode(reader.read([number])[0], where)
    if text.lstrip().startswith("{"):
        try:
            return _text_field(json.loads(text), source.text_field, where)
        except json.JSONDecodeError:
            pass  # plain text that happens to start with a brace
    return text


_INDEXERS = {"text": _index_text, "jsonl": _index_jsonl, "parquet": _index_parquet,
             "arrayrecord": _index_arrayrecord}
_GETTERS = {"text": _get_text, "jsonl": _get_jsonl, "parquet": _get_parquet,
            "arrayrecord": _get_arrayrecord}
