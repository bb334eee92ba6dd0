"""How results move with the peak's bin width: one row per ``peak`` / ``peak@EPS`` method of a run.

A run that asks for several bin widths (``--methods peak,peak@0.05,peak@0.2,peak@fd``) gets a table with, for each
width, cross-entropy and top-1 (mean ± std over seeds) at each of the report's fractions. ``peak`` itself is the row
of the stored eps. Rows are ordered: absolute widths ascending, then widths relative to each neuron's spread
(``<x>std``, ``<x>iqr``), then Freedman–Diaconis. Built from the run's summary alone (no statistics needed).
"""

from __future__ import annotations

from knockout.ablation.centres import EpsChoice, parse_eps
from knockout.ablation.methods import PARAM_SEP
from knockout.errors import KnockoutError
from knockout.runfolder import fraction_key

PEAK = "peak"
_KIND_ORDER = {"abs": 0, "std": 1, "iqr": 2, "fd": 3}


def peak_variants(methods: list[str], stored_eps: float | None) -> list[tuple[str, EpsChoice]]:
    """``(method, EpsChoice)`` of every peak method in ``methods``, in display order (see the module docstring).
    ``peak`` counts as the absolute width ``stored_eps`` (left out when that is unknown)."""
    out = []
    for m in methods:
        if m == PEAK and stored_eps is not None:
            out.append((m, EpsChoice("abs", float(stored_eps))))
        elif m.startswith(PEAK + PARAM_SEP):
            try:
                out.append((m, parse_eps(m[len(PEAK + PARAM_SEP) :])))
            except KnockoutError:
                continue
    return sorted(out, key=lambda mc: (_KIND_ORDER[mc[1].kind], mc[1].value if mc[1].kind != "fd" else 0, mc[0]))


def eps_rows(
    summary: list[dict], methods: list[str], fractions: tuple[float, ...], stored_eps: float | None
) -> list[dict]:
    """One record per peak variant (empty unless the run has a ``peak@`` method and at least two variants):
    ``method``, ``bin width`` (``(stored)`` marks the statistics' eps), and per fraction ``f`` ``CE at {100 f}%`` /
    ``top-1 % at {100 f}%`` as ``mean ± std`` strings, ``–`` where the run has no such row."""
    variants = peak_variants(methods, stored_eps)
    if len(variants) < 2 or not any(m != PEAK for m, _ in variants):
        return []
    by_key = {(e["method"], fraction_key(e["fraction"])): e for e in summary}
    rows = []
    for method, choice in variants:
        label = choice.label
        if choice.kind == "abs" and stored_eps is not None and abs(choice.value - stored_eps) <= 1e-12 * stored_eps:
            label += " (stored)"
        rec = {"method": method, "bin width": label}
        for f in fractions:
            e = by_key.get((method, fraction_key(f)))
            rec[_ce(f)] = f"{e['ce_mean']:.4f} ± {e['ce_std']:.4f}" if e else "–"
            rec[_top1(f)] = f"{100 * e['top1_mean']:.2f} ± {100 * e['top1_std']:.2f}" if e else "–"
        rows.append(rec)
    return rows


def _ce(f: float) -> str:
    return f"CE at {100 * f:g}%"


def _top1(f: float) -> str:
    return f"top-1 % at {100 * f:g}%"


def eps_columns(fractions: tuple[float, ...]) -> list[str]:
    """Column keys of :func:`eps_rows`, CE first."""
    return ["method", "bin width"] + [_ce(f) for f in fractions] + [_top1(f) for f in fractions]
