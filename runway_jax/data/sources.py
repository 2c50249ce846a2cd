"""Documents from local files: plain text, JSONL, Parquet and ArrayRecord, by path or glob.

Every reader returns documents as ``str``. Plain-text files are one document each; JSONL and
Parquet rows give their ``text_field``; ArrayRecord records are UTF-8 text or JSON objects with
``text_field``. Paths may be mounted bucket paths (anything ``open`` reads).
"""

from __future__ import annotations

import glob
import json
import os

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


def read_documents(patterns, *, text_field: str = "text") -> list[str]:
    """All documents of the files matched by ``patterns``, file by file in sorted order."""
    documents = []
    for path in expand_paths(patterns):
        found = list(_READERS[file_format(path)](path, text_field))
        if not any(doc for doc in found):
            raise DataError(f"data file {path!r} holds no text; remove it or fill it.")
        documents.extend(doc for doc in found if doc)
    return documents


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


def _read_text(path, text_field):
    del text_field
    yield _decode(_read_bytes(path), f"data file {path!r}")


def _read_jsonl(path, text_field):
    text = _decode(_read_bytes(path), f"data file {path!r}")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number} is not valid JSON ({error.msg}); fix or remove the line.") from None
        yield _text_field(record, text_field, f"{path}:{number}")


def _read_parquet(path, text_field):
    import pyarrow.parquet as parquet

    try:
        table = parquet.read_table(path, columns=[text_field])
    except KeyError:
        raise DataError(f"Parquet file {path!r} has no column {text_field!r}; set text_field.") from None
    except Exception as error:  # pyarrow raises several types for corrupt files
        raise DataError(f"cannot read Parquet file {path!r} ({type(error).__name__}); is it a Parquet file?") from None
    yield from (text for text in table.column(text_field).to_pylist() if text)


def _read_arrayrecord(path, text_field):
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path)
    except Exception as error:
        raise DataError(f"cannot read ArrayRecord file {path!r} ({error}); is it an ArrayRecord file?") from None
    try:
        for number in range(reader.num_records()):
            raw = reader.read([number])[0]
            text = _decode(raw, f"record {number} of {path!r}")
            if text.lstrip().startswith("{"):
                try:
                    text = _text_field(json.loads(text), text_field, f"record {number} of {path!r}")
                except json.JSONDecodeError:
                    pass  # plain text that happens to start with a brace
            yield text
    finally:
        reader.close()


_READERS = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet,
            "arrayrecord": _read_arrayrecord}
