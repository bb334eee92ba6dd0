"""Bounded reading of input that others wrote: settings files, component set files, task and data JSONL lines.

Each reader checks an input's size before the work that grows with it (a file's bytes before it is read, a JSON
text's nesting before it is parsed, a number's digits before it is converted) and ends every problem in one
:class:`~knockout.errors.KnockoutError` line, never another exception. Values shown in messages are cut
(:func:`brief`), so a huge or deeply nested value cannot make a huge message.
"""

from __future__ import annotations

import json
import re
import reprlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from knockout.errors import KnockoutError

#: The largest settings file or component set file read (a settings file is a few kB).
MAX_FILE_BYTES = 16 << 20
#: The deepest nesting of lists and objects read from a settings file, a set file or a JSONL line (settings nest
#: two levels; a task line one).
MAX_DEPTH = 64
#: The most values (lists' items, objects' entries, counted with repeats: a YAML alias counts each time it is used)
#: a settings file may hold.
MAX_VALUES = 100_000
#: The longest line of a JSONL file (task prompts, documents) parsed, in characters.
MAX_LINE_CHARS = 16 << 20
#: The most digits of a number in a component or a scan unit (no model has a billion layers or neurons).
MAX_DIGITS = 9

_ESCAPE = re.compile(r"\\.", re.DOTALL)
_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_ASCII_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_NEWLINE = re.compile(r"\r\n|\r|\n")

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 3, 60, 60, 6, 6


def brief(value: Any) -> str:
    """``repr(value)``, cut to a short line (long strings and big or deep lists are elided with ``...``)."""
    try:
        return one_line(_repr.repr(value))
    except Exception:  # a repr that fails (an int beyond Python's digit limit, say): the type alone
        return f"<{type(value).__name__}>"


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (line breaks included) made one space: messages are one line."""
    return " ".join(str(text).split())


def read_limited(path: str | Path, what: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the file ``path`` (``what``: how messages name it), refused when it is larger than ``limit``
    bytes (checked before reading; a file that grows meanwhile is still read only up to the limit)."""
    path = Path(path)
    try:
        if not path.is_file():
            raise KnockoutError(f"{what} {str(path)!r} does not exist or is not a file")
        if path.stat().st_size > limit:
            raise KnockoutError(f"{what} {str(path)!r} is larger than {limit >> 20} MiB; is it the right file?")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise KnockoutError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from e
    if len(data) > limit:
        raise KnockoutError(f"{what} {str(path)!r} is larger than {limit >> 20} MiB; is it the right file?")
    return data


def read_text(path: str | Path, what: str, limit: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text (a byte-order mark dropped) of the file ``path``, read within ``limit`` bytes
    (:func:`read_limited`); text in another encoding is a :class:`KnockoutError` naming the file as ``what``."""
    try:
        return read_limited(path, what, limit).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise KnockoutError(f"{what} {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def json_depth(text: str) -> int:
    """How deep the lists and objects of the JSON ``text`` nest (brackets outside strings), without parsing it: a
    few linear passes, so an input nested 200,000 levels deep costs no more than a flat one."""
    s = _STRING.sub("", _ESCAPE.sub("", text))
    quote = s.find('"')
    if quote >= 0:  # an unterminated string: everything after its quote is string
        s = s[:quote]
    s = _NOT_BRACKET.sub("", s)
    if not s:
        return 0
    import numpy as np

    b = np.frombuffer(s.encode("ascii"), dtype=np.uint8)
    steps = np.where((b == ord("[")) | (b == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def loads_json(text: str, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value of ``text`` (``where``: how messages name it). Refused in one line when it nests deeper than
    ``max_depth`` (checked before parsing), is not valid JSON, or holds a number Python will not convert."""
    depth = json_depth(text)
    if depth > max_depth:
        raise KnockoutError(f"{where} nests lists or objects {depth} levels deep; at most {max_depth} are read")
    try:
        return json.loads(text)
    except RecursionError:  # pragma: no cover - json_depth refuses such text first
        raise KnockoutError(f"{where} nests lists or objects too deeply; at most {max_depth} levels are read") from None
    except ValueError as e:  # JSONDecodeError, and integers beyond Python's digit limit
        raise KnockoutError(f"{where} is not valid JSON ({brief_text(str(e))})") from None


def brief_text(text: str, limit: int = 160) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    text = one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_size(value: Any, where: str, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES) -> None:
    """Refuse a parsed value (a settings file's) nesting deeper than ``max_depth`` or holding more than
    ``max_values`` values. Walked without recursion, and stopped as soon as a limit is passed, so a YAML alias bomb
    (a list of aliases of lists of aliases...) costs no more than the limit."""
    stack, seen = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.keys()) + list(item.values())
        elif isinstance(item, (list, tuple, set)):
            children = list(item)
        else:
            continue
        if depth > max_depth:
            raise KnockoutError(f"{where} nests lists or objects more than {max_depth} levels deep")
        seen += len(children)
        if seen > max_values:
            raise KnockoutError(f"{where} holds more than {max_values:,} values (counting each use of an alias)")
        stack.extend((c, depth + 1) for c in children)


def ascii_int(text: str, what: str, max_digits: int = MAX_DIGITS) -> int:
    """The non-negative integer written in ASCII digits ``text`` (``str.isdigit`` also accepts ``²`` and other
    scripts' digits), with at most ``max_digits`` digits (checked before converting)."""
    if not _ASCII_DIGITS.fullmatch(text):
        raise KnockoutError(f"{what}: expected a number written with the digits 0-9, got {brief(text)}")
    if len(text) > max_digits:
        raise KnockoutError(f"{what}: the number {text[:12]}... has {len(text)} digits; at most {max_digits} are read")
    return int(text)


def jsonl_lines(text: str) -> list[str]:
    """The lines of JSONL ``text``: split at ``\\n``, ``\\r\\n`` and ``\\r`` only (Python's universal newlines), not at
    the Unicode line separators ``str.splitlines`` also splits at (U+2028, U+0085...), which JSON strings may hold."""
    return _NEWLINE.split(text)


def jsonl_values(text: str, where: str) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line of the JSONL ``text`` (``where``: the file, for messages
    ``FILE:N``). Each line is refused, in one line naming it, when it is longer than :data:`MAX_LINE_CHARS`,
    nests deeper than :data:`MAX_DEPTH` (both checked before parsing) or is not valid JSON."""
    for n, line in enumerate(jsonl_lines(text), 1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_CHARS:
            raise KnockoutError(
                f"{where}:{n} is {len(line):,} characters long; a line is read up to {MAX_LINE_CHARS:,} characters"
            )
        try:
            value = loads_json(line, f"{where}:{n}")
        except KnockoutError as e:
            raise KnockoutError(f"{e}; fix or delete that line") from None
        yield n, value
