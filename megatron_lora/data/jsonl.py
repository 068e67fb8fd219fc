"""JSONL input: one JSON object per line, each error one line naming the file and the line."""

from __future__ import annotations

import json
from typing import Iterator, Tuple

from ..errors import DataError
from ..untrusted import loads_json


def read_jsonl(path: str) -> Iterator[Tuple[int, dict]]:
    """(line number, record) of every non-blank line, each record a JSON object; a DataError
    (a ValueError) naming the file and the line for anything else."""
    try:
        stream = open(path, "rb")  # decoded line by line, so errors get the right line number
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    with stream:
        for line_number, raw in enumerate(stream, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{line_number}: not UTF-8 ({error.reason})") from None
            if not line.strip():
                continue
            try:
                record = loads_json(line, f"{path}:{line_number}", DataError)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object, "
                                 f"got {type(record).__name__}")
            yield line_number, record


def read_jsonl_texts(path: str, json_key: str) -> Iterator[Tuple[int, str]]:
    """(line number, ``json_key`` text) of every non-blank line, like ``read_jsonl``."""
    for line_number, record in read_jsonl(path):
        if json_key not in record:
            raise DataError(f"{path}:{line_number}: no key {json_key!r} "
                             f"(keys: {', '.join(sorted(record)) or 'none'})")
        text = record[json_key]
        if not isinstance(text, str):
            raise DataError(f"{path}:{line_number}: {json_key!r} is "
                             f"{type(text).__name__}, expected a string")
        yield line_number, text
