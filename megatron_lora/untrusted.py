"""Reading what a user's files hold, bounded so that no file can hang a run or exhaust memory.

One home for the limits every reader of user files shares:

- JSON and YAML nest at most MAX_DEPTH levels (a deeper file is one line, not a RecursionError);
  YAML aliases (``*name``) are refused, so an alias bomb ("billion laughs") never expands;
- a regular expression from a file or flag (``re:`` targets, PEFT's ``target_modules``) is
  matched with a time limit: a catastrophic pattern is named in one line within a second;
- a value from a file is quoted in an error message by :func:`short`, never at full length;
- a file's sha256 is computed in chunks (:func:`sha256_of_file`), never read whole.
"""

from __future__ import annotations

import hashlib
import json
import reprlib
from functools import lru_cache
from pathlib import Path

import regex
import yaml

from .errors import MegatronLoraError

MAX_DEPTH = 64  # far above any config we read (HF config.json, adapter configs: 2-4 levels)
MATCH_SECONDS = 0.5  # a module-name match takes microseconds; a catastrophic one never ends
_HASH_CHUNK = 1 << 22


class UntrustedInputError(MegatronLoraError):
    """A file or pattern that would hang or exhaust a run (too deep, an alias, a regex that
    does not finish), named in the message."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_REPR.maxlevel = 3
_SHORT = 160


def short(value) -> str:
    """repr(value), at most about 160 characters; the time taken is bounded by what it prints
    (reprlib visits at most 4 items per container, 3 levels deep), not by the value's size."""
    text = _REPR.repr(value)
    return text if len(text) <= _SHORT else text[:_SHORT] + "..."


# --- JSON -------------------------------------------------------------------------------------


def _depth_over(value, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` containers (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in item)
    return False


def loads_json(text, where, error=UntrustedInputError):
    """json.loads, with nesting bounded (``error`` naming ``where``); json.JSONDecodeError
    passes through for the caller's own message."""
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
        too_deep = True
    except json.JSONDecodeError:
        raise
    except ValueError as problem:  # e.g. an integer too long to convert
        raise error(f"{where} is not valid JSON: {str(problem)[:120]}") from None
    else:
        too_deep = _depth_over(value, MAX_DEPTH)
    if too_deep:
        raise error(f"{where} nests deeper than {MAX_DEPTH} levels; no config this reads is "
                    f"nested that deeply")
    return value


def read_json(path, error=UntrustedInputError):
    """A JSON file's value (bounded as loads_json); a file that is not JSON text is ``error``."""
    path = Path(path)
    try:
        return loads_json(path.read_text(encoding="utf-8"), path, error)
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{path} is not valid JSON: {short(str(problem))}") from None


# --- YAML -------------------------------------------------------------------------------------


class BoundedSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases and with nesting bounded: both refused as a YAML error
    at their line (yaml.composer.ComposerError), before anything is expanded."""

    _depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{short(event.anchor)[1:-1]}) are not accepted; write the "
                            f"value out", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# --- patterns ---------------------------------------------------------------------------------


@lru_cache(maxsize=1024)
def _compiled(pattern: str):
    return regex.compile(pattern, flags=regex.VERSION0)


def pattern_problem(pattern: str):
    """Why ``pattern`` is not a valid regular expression for the engine that matches it, or
    None: patterns are checked by the engine that later runs them."""
    try:
        _compiled(pattern)
    except regex.error as error:
        return str(error)
    return None


def regex_fullmatch(pattern: str, name: str, shown=None) -> bool:
    """Whether the regex ``pattern`` matches all of ``name``, within MATCH_SECONDS; one that
    does not finish, or is not valid, is UntrustedInputError naming ``shown`` (the pattern as
    the user wrote it)."""
    try:
        return _compiled(pattern).fullmatch(name, timeout=MATCH_SECONDS) is not None
    except regex.error as error:
        raise UntrustedInputError(f"the pattern {short(shown or pattern)} is not a valid regular "
                                  f"expression ({error})") from None
    except TimeoutError:
        raise UntrustedInputError(
            f"the pattern {short(shown or pattern)} did not finish matching {short(name)} within "
            f"{MATCH_SECONDS} s (catastrophic backtracking); write it without nested "
            f"repetition such as (.*)*") from None


# --- checksums --------------------------------------------------------------------------------


_MAX_SAFETENSORS_HEADER = 100 << 20  # safetensors' own limit


def check_safetensors_size(path, error=UntrustedInputError) -> None:
    """A safetensors file is exactly its header and the tensor bytes the header describes: a
    file of another size (a 64 GiB sparse file behind a small header) is refused before
    anything reads it whole. Reads at most the header."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        header = None
        if 0 < length <= min(_MAX_SAFETENSORS_HEADER, size - 8):
            try:
                header = loads_json(handle.read(length).decode("utf-8"), path, error)
            except (UnicodeDecodeError, json.JSONDecodeError):
                header = None
    try:
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (AttributeError, KeyError, TypeError, IndexError):
        ends = None
    if ends is None or not all(isinstance(end, int) and not isinstance(end, bool) for end in ends):
        raise error(f"{path} is truncated, corrupt or from another save: it cannot be read as "
                    f"safetensors (its header is damaged)")
    described = 8 + length + max(ends, default=0)
    if size != described:
        raise error(f"{path} is truncated, corrupt or from another save: it cannot be read as "
                    f"safetensors (it is {size} bytes, but its header describes {described})")


def sha256_of_file(path) -> str:
    """The hex sha256 of a file, read in chunks: memory stays small for any size."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
