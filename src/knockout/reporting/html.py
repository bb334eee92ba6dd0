"""A self-contained HTML page: inline CSS, figures embedded as base64 PNG, no external requests."""

from __future__ import annotations

import base64
import html
import json

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}th{background:#f4f4f4}
td:first-child,td:nth-child(2),th:first-child,th:nth-child(2){text-align:left}
td.best{font-weight:bold;background:#eef7ee}
.warn{background:#fff3cd;border:1px solid #e0c36c;padding:.8em 1em;border-radius:4px;font-weight:600}
.note{color:#555;font-size:.9em}
img{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.8em}
details{margin:.6em 0}
"""


def esc(x) -> str:
    return html.escape(str(x))


def esc_keep_bold(text) -> str:
    """:func:`esc` of ``text`` whose ``**`` pairs are meant as bold (the report's own sentences), as ``<b>``."""
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(esc(text).split("**")))


def img(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def kv_table(items: dict) -> str:
    rows = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(v if not isinstance(v, (dict, list)) else json.dumps(v))}</td></tr>"
        for k, v in items.items()
    )
    return f'<table class="kv">{rows}</table>'


def records_table(records: list[dict], columns: list[str], fmt: dict | None = None) -> str:
    fmt = fmt or {}
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(fmt.get(c, str)(r.get(c, '')))}</td>" for c in columns) + "</tr>" for r in records
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def warning(text: str) -> str:
    return f'<p class="warn">{esc(text)}</p>'


def page(title: str, body: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
        f"<h1>{esc(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n"
    )
