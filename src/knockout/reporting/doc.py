"""A report page written once and rendered twice: a self-contained HTML page and its Markdown twin.

Every report (a run's, a scan's, a comparison's) builds one :class:`Doc` of blocks (headings, paragraphs, lists,
tables, figures) and writes ``NAME.html`` and ``NAME.md`` from it, so the two formats cannot drift apart. The
renderers escape every text (:func:`knockout.reporting.html.esc`, :func:`knockout.reporting.escape.markdown`): names
of methods, models and paths never reach either file raw. ``**`` pairs in a report's own sentences are bold in both.
"""

from __future__ import annotations

import json
from pathlib import Path

from knockout.files import write_atomic
from knockout.reporting import html as H
from knockout.reporting.escape import markdown as md
from knockout.reporting.escape import markdown_keep_bold as md_bold


class Doc:
    """The blocks of one page, in order; :meth:`write` renders and writes both formats."""

    def __init__(self):
        self.html: list[str] = []
        self.md: list[str] = []

    def heading(self, text: str, level: int = 2) -> Doc:
        self.html.append(f"<h{level}>{H.esc(text)}</h{level}>")
        self.md += [f"{'#' * level} {md(text)}", ""]
        return self

    def text(self, text: str, note: bool = False, strong: bool = False) -> Doc:
        """A paragraph (``note``: small print, italic in Markdown; ``strong``: all bold)."""
        if not text:
            return self
        body = f"<b>{H.esc(text)}</b>" if strong else H.esc_keep_bold(text)
        self.html.append(f'<p class="note">{body}</p>' if note else f"<p>{body}</p>")
        line = f"**{md(text)}**" if strong else md_bold(text)
        self.md += [f"_{line}_" if note else line, ""]
        return self

    def warn(self, text: str) -> Doc:
        self.html.append(H.warning(text))
        self.md += [f"> **{md(text)}**", ""]
        return self

    def items(self, texts: list[str]) -> Doc:
        """A bulleted list of sentences."""
        if texts:
            self.html.append("<ul>" + "".join(f"<li>{H.esc_keep_bold(t)}</li>" for t in texts) + "</ul>")
            self.md += [f"- {md_bold(t)}" for t in texts] + [""]
        return self

    def facts(self, items: dict) -> Doc:
        """Key-value pairs (a two-column table in HTML, a list in Markdown)."""
        self.html.append(H.kv_table(items))
        shown = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in items.items()}
        self.md += [f"- **{md(k)}**: {md(v)}" for k, v in shown.items()] + [""]
        return self

    def table(self, records: list[dict], columns: list[str], fmt: dict | None = None, folded: str = "") -> Doc:
        """``records`` under ``columns`` (``fmt``: column -> formatter of its values; ``folded``: a summary line
        under which the table is folded away); nothing when empty."""
        if not records:
            return self
        fmt = fmt or {}
        table = H.records_table(records, columns, fmt)
        lines = ["| " + " | ".join(md(c) for c in columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(md(fmt.get(c, str)(r.get(c, ""))) for c in columns) + " |" for r in records]
        if folded:
            table = f"<details><summary>{H.esc(folded)}</summary>{table}</details>"
            lines = [f"<details><summary>{H.esc(folded)}</summary>", "", *lines, "", "</details>"]
        self.html.append(table)
        self.md += [*lines, ""]
        return self

    def figure(self, png: bytes | None, file: str, alt: str) -> Doc:
        """A figure: embedded in the HTML page, linked as ``file`` (written beside the page) in Markdown."""
        if png is not None:
            self.html.append(H.img(png, alt))
            self.md += [f"![{md(alt)}]({file})", ""]
        return self

    def block(self, html: str, markdown: list[str]) -> Doc:
        """A part rendered by its own code in both formats (Table 2 with its marks, the answer)."""
        self.html.append(html)
        self.md += ["\n".join(markdown).rstrip("\n"), ""]
        return self

    def code(self, text: str, elsewhere: str) -> Doc:
        """Preformatted text in the HTML page; the Markdown says where it is (``elsewhere``), since a code block
        would show names raw."""
        self.html.append(f"<pre>{H.esc(text)}</pre>")
        self.md += [f"_{md(elsewhere)}_", ""]
        return self

    def write(self, folder: Path, title: str, name: str = "report") -> Path:
        """Write ``name.html`` and ``name.md`` into ``folder``; returns the HTML page's path."""
        write_atomic(folder / f"{name}.html", H.page(title, self.html))
        write_atomic(folder / f"{name}.md", "\n".join([f"# {md(title)}", "", *self.md]).rstrip("\n") + "\n")
        return folder / f"{name}.html"
