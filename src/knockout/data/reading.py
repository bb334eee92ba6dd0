"""Reading local data, below both text and task data: bytes to text, and the fixed evaluation/collection split."""

from __future__ import annotations

import logging
import random

from knockout.errors import KnockoutError

log = logging.getLogger(__name__)

SPLITS = ("collect", "eval")
_SPLIT_SEED = 1234


def decode_text(data: bytes, where: str) -> str:
    """``data`` as text: UTF-8 (a byte-order mark is dropped), else Windows-1252 (which covers Latin-1's printable
    characters) with a logged note. Binary data (NUL bytes, or bytes cp1252 does not define) is an error."""
    if b"\x00" in data:
        raise KnockoutError(f"{where} looks binary (it holds NUL bytes); give a UTF-8 text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        utf8_error = e
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        raise KnockoutError(
            f"{where} is neither UTF-8 nor Windows-1252/Latin-1 text ({utf8_error}); convert it to UTF-8, e.g. "
            f"`iconv -f ENCODING -t UTF-8`"
        ) from None
    controls = sum(1 for ch in text if ord(ch) < 32 and ch not in "\t\n\r\f")
    if controls > 0.01 * len(text):
        raise KnockoutError(f"{where} looks binary (control bytes, not UTF-8); give a UTF-8 text file")
    if where not in _NOTED:
        _NOTED.add(where)
        log.info("%s is not UTF-8; read it as Windows-1252 (Latin-1)", where)
    return text


_NOTED: set[str] = set()


def split_items(docs: list, split: str) -> list:
    """The ``eval`` part (the first fifth of a fixed shuffle, seed 1234) or the ``collect`` part (the rest)."""
    order = list(range(len(docs)))
    random.Random(_SPLIT_SEED).shuffle(order)
    n_eval = max(1, len(docs) // 5) if len(docs) > 1 else 0
    chosen = order[:n_eval] if split == "eval" else order[n_eval:]
    return [docs[i] for i in chosen]
