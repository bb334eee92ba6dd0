"""Escaping names (methods, model names, paths, labels) for the text formats of reports.

HTML has :func:`knockout.reporting.html.esc`. Markdown renders raw HTML, so a name like ``<img src=x onerror=...>``
must not reach a ``.md`` file as it is; LaTeX gives ``$ { } ^ ~ # % & _ \\`` meanings of their own.
"""

from __future__ import annotations

import re

_MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_MD_BACKSLASHED = set("\\`*|~")
_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
}
_LATEX_RX = re.compile("|".join(re.escape(c) for c in _LATEX))


def markdown(text) -> str:
    """``text`` as literal Markdown text (also inside a table cell): ``& < >`` as HTML entities, so no tag or
    autolink is ever formed, the Markdown punctuation ``\\ ` * | ~`` backslash-escaped, and a ``(`` right after a
    ``]`` too, so no link or image is formed (brackets alone stay as they are: intervals read ``[-0.02, +0.01]``)."""
    out = "".join(_MD_ENTITIES.get(c) or (f"\\{c}" if c in _MD_BACKSLASHED else c) for c in str(text))
    return out.replace("](", "]\\(")


def markdown_keep_bold(text) -> str:
    """:func:`markdown` of ``text`` whose ``**`` pairs are meant as bold (the report's own sentences)."""
    return markdown(text).replace(r"\*\*", "**")


def latex(text) -> str:
    """``text`` as literal LaTeX text: every special character escaped, in one pass."""
    return _LATEX_RX.sub(lambda m: _LATEX[m.group(0)], str(text))
