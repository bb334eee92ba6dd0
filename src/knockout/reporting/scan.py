"""The report of a scan: the effect of each unit under each method, and whether the methods agree on which units
matter most. Built from the scan's run folder alone (config.json, results.jsonl, paired/, attribution.json).

``write_scan_report(run_dir)`` writes into ``run_dir/report/``::

    report.html, report.md   the answer ("does the choice of constant change which components matter most?"), the
                             agreement table, the top units per method, heatmaps, scatters, attribution estimate
    scan.csv                 one row per unit and method: the effect (mean over seeds) of every metric, its standard
                             error, the unit's rank, and the attribution estimate when there is one
    agreement.csv            per pair of methods: Spearman's rank correlation of the effects, Pearson's, and the
                             overlap of their top-k units
    attribution.csv          per method: Pearson and Spearman correlation of the estimate with the exact effects
    heatmap_<method>.png/svg layer x unit (head, group of neurons; one column for layers) map of the effect
    scatter.png/svg          one method's effects against another's, per pair of methods
    attribution.png/svg      the estimate against the exact effect, per method (with --attribution)

Definitions. A unit's *effect* under a method is the change of the scan's metric when that unit alone is ablated,
mean over seeds: ``delta CE`` (nats) for text and answer prompts, ``delta logit difference`` for prompts with a
correct and an incorrect answer (a negative value: the unit helps the task). Units *matter* by the size of their
effect, ``|effect|``; a method's top-k are its k units of largest ``|effect|`` (ties by unit order). Agreement of two
methods: Spearman's rank correlation of their (signed) effects over the units both have, and how many of their top-k
units they share. The answer is

- **Yes** when the methods disagree on the most important unit (the report then says whether the evaluation set
  resolves the disagreement: two methods each rank their own top unit above the other's by more than two standard
  errors),
- **Partly** when every method's most important unit is the same but the top-k sets differ,
- **No** when every method has the same most important unit and the same top-k units.

A unit's standard error comes from its per-document sums (first seed, paired with the baseline: the effect is a
ratio of sums, its variance by the delta method over documents); it says how much of an effect, and of a difference
between two units' effects, the evaluation set can resolve.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from knockout.components import parse_component
from knockout.config import SweepConfig
from knockout.errors import KnockoutError
from knockout.reporting.doc import Doc
from knockout.reporting.figures import method_colors, png_bytes, save_figure
from knockout.reporting.summary import summarize
from knockout.reporting.table import records_csv
from knockout.runfolder import (
    REPORT_DIR,
    RunFolder,
    inside,
    model_label,
    row_key,
    write_atomic,
)

log = logging.getLogger(__name__)

METRIC_LABEL = {"ce": "ΔCE (nats)", "logit_diff": "Δ logit difference"}


# -- statistics -------------------------------------------------------------------------------------------------------
def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values`` (ties get their average rank), as Spearman's correlation uses them."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    order = np.argsort(values, kind="mergesort")
    s = values[order]
    start = np.ones(n, dtype=bool)
    start[1:] = s[1:] != s[:-1]  # a run of equal values starts here (NaN never equals: each NaN its own rank)
    first = np.flatnonzero(start)
    size = np.diff(np.append(first, n))
    r = np.empty(n, dtype=np.float64)
    r[order] = (first + 1 + (size - 1) / 2)[np.cumsum(start) - 1]  # the average of positions first+1 .. first+size
    return r


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's correlation; NaN when either side is constant or has fewer than two values."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's on average ranks)."""
    return pearson(ranks(x), ranks(y))


def top_k(units: list[str], effects: dict[str, float], k: int) -> list[str]:
    """The ``k`` units of largest ``|effect|`` (ties in unit order)."""
    present = [u for u in units if u in effects]
    return sorted(present, key=lambda u: -abs(effects[u]))[:k]  # a stable sort: ties keep unit order


# -- the scan's data --------------------------------------------------------------------------------------------------
@dataclass
class ScanData:
    """A scan's stored results, per method and unit."""

    dir: Path
    config: SweepConfig
    """The scan's recorded settings."""
    units: list[str]
    """Every unit of the scan, in layer order."""
    methods: list[str]
    metric: str
    """``ce`` or ``logit_diff``: what a unit's effect is a change of."""
    effects: dict[str, dict[str, float]]
    """Method -> unit -> effect (mean over seeds)."""
    deltas: dict[str, dict[str, dict[str, float]]]
    """Method -> unit -> every delta metric of the row (``delta_ce``, ``delta_top1``, ``delta_logit_diff``)."""
    se: dict[str, dict[str, float]]
    """Method -> unit -> standard error of the effect (first seed's documents)."""
    baseline: dict[str, float]
    """The unablated metrics (mean over seeds)."""
    n_docs: int
    seeds: list[int]
    attribution: dict | None = None
    notes: list[str] = field(default_factory=list)
    n_ablated: dict[str, int] = field(default_factory=dict)
    """Unit -> neurons it ablates (``resolved.targets``)."""
    docs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """Method (and ``"baseline"``) -> unit -> per-document sums of the metric (first seed); ``"n"`` -> scored
    targets per document."""

    def lead(self, method: str, first: str, second: str) -> tuple[float, float] | None:
        """How much more ``first`` matters than ``second`` under ``method`` (``|effect| - |effect|``) with its
        standard error (paired over documents), or ``None`` without per-document sums."""
        d = self.docs
        if method not in d or first not in d[method] or second not in d[method] or "baseline" not in d:
            return None
        n, base = d["n"][""], d["baseline"][""]
        s1 = 1.0 if self.effects[method][first] >= 0 else -1.0
        s2 = 1.0 if self.effects[method][second] >= 0 else -1.0
        v = s1 * (d[method][first] - base) - s2 * (d[method][second] - base)
        return _ratio_se(v, n)

    @property
    def k(self) -> int:
        return max(1, min(self.config.scan.top_k, len(self.units)))

    @property
    def unit_kind(self) -> str:
        return str(self.config.scan.unit)

    def grid(self) -> tuple[list[int], list[int]]:
        """Each unit's layer and index within its layer (for heatmaps)."""
        rows, cols, seen = [], [], {}
        for u in self.units:
            layer = parse_component(u).layer
            cols.append(seen.get(layer, 0))
            seen[layer] = cols[-1] + 1
            rows.append(layer)
        return rows, cols


def load_scan(run_dir: str | Path | RunFolder) -> ScanData:
    """The scan in ``run_dir`` (read from its files only)."""
    folder = RunFolder.open(run_dir)
    run_dir, config = folder.dir, folder.config
    if not folder.is_scan:
        raise KnockoutError(f"{str(run_dir)!r} does not hold a scan (its config.json has no scan unit)")
    rows = folder.row_dicts()
    targets = folder.resolved.targets or {}
    units = list(targets) or list(dict.fromkeys(r["target"] for r in rows if r["target"]))
    base_rows = [r for r in rows if r["method"] == "baseline"]
    metric = "logit_diff" if base_rows and all(r.get("logit_diff") is not None for r in base_rows) else "ce"
    methods = list(dict.fromkeys([*config.methods, *(r["method"] for r in rows if r["target"])]))
    methods = [m for m in methods if any(r["method"] == m and r["target"] for r in rows)]
    effects: dict[str, dict[str, float]] = {m: {} for m in methods}
    deltas: dict[str, dict[str, dict[str, float]]] = {m: {} for m in methods}
    for e in summarize(rows):
        if e["method"] in effects and e["target"]:
            effects[e["method"]][e["target"]] = e[f"delta_{metric}_mean"]
            deltas[e["method"]][e["target"]] = {
                k.removesuffix("_mean"): v for k, v in e.items() if k.startswith("delta_") and k.endswith("_mean")
            }
    baseline = {}
    if base_rows:
        for name in ("top1", "ce", "logit_diff"):
            values = [r.get(name) for r in base_rows]
            if all(v is not None for v in values):
                baseline[name] = float(np.mean(values))
    seeds = sorted({int(r["seed"]) for r in rows})
    docs = _doc_sums(folder, rows, methods, metric, seeds[0] if seeds else 0)
    n_docs = len(docs["n"][""]) if docs else 0
    se = _standard_errors(docs, methods)
    data = ScanData(run_dir, config, units, methods, metric, effects, deltas, se, baseline, n_docs, seeds)
    data.attribution, data.docs = folder.attribution(), docs
    data.n_ablated = {u: int((t or {}).get("n_ablated", 0)) for u, t in targets.items()}
    note = folder.unusable_note()
    if note:
        data.notes.append(note)
    missing = sum(1 for m in methods for u in units if u not in effects[m])
    if missing:
        data.notes.append(
            f"PARTIAL SCAN: {missing} of {len(methods) * len(units)} (unit, method) rows are missing; resume the scan "
            "with the same command to complete it. Comparisons use the units present for both methods."
        )
    return data


def _ratio_se(v: np.ndarray, n: np.ndarray) -> tuple[float, float]:
    """``sum(v) / sum(n)`` over documents and its standard error (delta method; documents as the sample)."""
    total, d = float(n.sum()), len(n)
    value = float(v.sum()) / total
    if d < 2:
        return value, float("nan")
    resid = v - value * n
    return value, math.sqrt(d / (d - 1) * float((resid * resid).sum())) / total


def _doc_sums(folder: RunFolder, rows, methods, metric, seed) -> dict:
    """The first seed's per-document sums of the metric, per method and unit (see :attr:`ScanData.docs`), of the
    rows whose sums add up to them."""
    sums = folder.doc_sums
    field_ = "ld_sum" if metric == "logit_diff" else "ce_sum"
    base = sums.get(row_key("baseline", 0.0, seed))
    if base is None or field_ not in base:
        return {}
    n = base["n"].astype(np.float64)
    out: dict[str, dict[str, np.ndarray]] = {"n": {"": n}, "baseline": {"": base[field_]}}
    for r in rows:
        if r["method"] not in methods or not r["target"] or int(r["seed"]) != seed:
            continue
        s = sums.get(row_key(r["method"], r["fraction"], seed, r["target"]))
        if s is not None and field_ in s and len(s["n"]) == len(n) and np.array_equal(s["n"], base["n"]):
            out.setdefault(r["method"], {})[r["target"]] = s[field_]
    return out


def _standard_errors(docs: dict, methods: list[str]) -> dict[str, dict[str, float]]:
    """Per method and unit, the standard error of the effect (paired with the baseline over documents)."""
    out: dict[str, dict[str, float]] = {m: {} for m in methods}
    if not docs or float(docs["n"][""].sum()) <= 0:
        return out
    n, base = docs["n"][""], docs["baseline"][""]
    for m in methods:
        for u, x in docs.get(m, {}).items():
            out[m][u] = _ratio_se(x - base, n)[1]
    return out


# -- agreement --------------------------------------------------------------------------------------------------------
def agreement(data: ScanData) -> list[dict]:
    """Per pair of methods: Spearman and Pearson correlation of their effects, and the overlap of their top-k."""
    out = []
    for i, a in enumerate(data.methods):
        for b in data.methods[i + 1 :]:
            common = [u for u in data.units if u in data.effects[a] and u in data.effects[b]]
            x = np.array([data.effects[a][u] for u in common])
            y = np.array([data.effects[b][u] for u in common])
            ta = top_k(common, data.effects[a], data.k)
            tb = top_k(common, data.effects[b], data.k)
            out.append(
                {
                    "method_a": a,
                    "method_b": b,
                    "units": len(common),
                    "spearman": spearman(x, y),
                    "pearson": pearson(x, y),
                    "k": len(ta),
                    "top_k_overlap": len(set(ta) & set(tb)),
                    "top_a": ta[0] if ta else "",
                    "top_b": tb[0] if tb else "",
                    "only_a": " ".join(u for u in ta if u not in tb),
                    "only_b": " ".join(u for u in tb if u not in ta),
                }
            )
    return out


def verdict(data: ScanData, pairs: list[dict]) -> tuple[str, str]:
    """``("yes" | "partly" | "no" | "n/a", sentence)``: does the choice of constant change which units matter most?"""
    if len(data.methods) < 2 or not pairs:
        return "n/a", "Only one method was scanned, so there is nothing to compare."
    k = pairs[0]["k"]
    firsts = {m: top_k(data.units, data.effects[m], 1) for m in data.methods}
    firsts = {m: t[0] for m, t in firsts.items() if t}
    what = f"{data.unit_kind} units" if data.unit_kind not in ("head", "layer") else f"{data.unit_kind}s"
    worst = min(pairs, key=lambda p: (p["top_k_overlap"], p["spearman"] if math.isfinite(p["spearman"]) else -2))
    rho = [p["spearman"] for p in pairs if math.isfinite(p["spearman"])]
    rho_text = f"Spearman's rank correlation of the effects is {min(rho):.2f} to {max(rho):.2f}" if rho else ""
    top_text = ", ".join(f"{m} {u}" for m, u in firsts.items())
    if len(set(firsts.values())) > 1:
        level = "yes"
        head = f"Yes: the choice of constant changes which {what} matter most."
        detail = f"The most important unit differs between methods ({top_text})." + _resolved(data, firsts)
    elif all(p["top_k_overlap"] == p["k"] for p in pairs):
        level = "no"
        head = f"No: every method finds the same top-{k} {what}."
        detail = f"The most important unit is {next(iter(firsts.values()))} for every method."
    else:
        level = "partly"
        head = f"Partly: the methods agree on the most important unit ({next(iter(firsts.values()))}) but not on the "
        head += f"top-{k} {what}."
        detail = ""
    detail += (
        f" The top-{k} sets of {worst['method_a']} and {worst['method_b']} share {worst['top_k_overlap']} of {k}"
        + (f" ({worst['method_a']} only: {worst['only_a']}; {worst['method_b']} only: {worst['only_b']})" if
           worst["only_a"] else "")
        + (f"; {rho_text}." if rho_text else ".")
        + _contrasts(data, worst)
    )  # fmt: skip
    return level, f"{head} {detail.strip()}"


def _contrasts(data: ScanData, pair: dict, shown: int = 3) -> str:
    """The effect, under both methods of ``pair``, of the units in one method's top-k only (the disagreement)."""
    a, b = pair["method_a"], pair["method_b"]
    units = (pair["only_a"].split() + pair["only_b"].split())[:shown]
    if not units:
        return ""

    def one(m, u):
        se = data.se[m].get(u)
        return f"{m} {data.effects[m][u]:+.3g}" + (f" ± {se:.2g}" if se is not None and math.isfinite(se) else "")

    parts = [f"{u}: {one(a, u)}, {one(b, u)}" for u in units if u in data.effects[a] and u in data.effects[b]]
    return f" Effects of these units under both (± one standard error): {'; '.join(parts)}." if parts else ""


def _resolved(data: ScanData, firsts: dict[str, str]) -> str:
    """Whether the evaluation set resolves the disagreement on the most important unit. Under each method, its top
    unit's lead over the other methods' top units has a paired standard error; the disagreement is resolved when two
    methods each rank their own top unit above the other's by more than two standard errors."""
    leads: dict[tuple[str, str, str], tuple[float, float]] = {}
    for m, u in firsts.items():
        for other in sorted(set(firsts.values()) - {u}):
            lead = data.lead(m, u, other)
            if lead is not None and math.isfinite(lead[1]):
                leads[(m, u, other)] = lead
    if not leads:
        return ""
    sig = {k for k, (v, se) in leads.items() if v > 2 * se}
    both = [(a, b) for a in sig for b in sig if a[1] == b[2] and a[2] == b[1]]
    shown = "; ".join(
        f"under {m}, {u} leads {o} by {v:.3g} ± {se:.2g}" for (m, u, o), (v, se) in list(leads.items())[:4]
    )
    if both:
        return f" The evaluation set resolves this ({shown}; ± one standard error, paired over documents)."
    return (
        f" But the evaluation set does not resolve it: no two methods each rank their own top unit above the other's "
        f"by more than two standard errors ({shown}; ± one standard error, paired over documents)."
    )


def noise_sentence(data: ScanData) -> str:
    """How large an effect the evaluation set resolves (median standard error over units)."""
    ses = [v for m in data.methods for v in data.se[m].values() if math.isfinite(v)]
    if not ses:
        return "No per-document sums: the standard errors of the effects are unknown."
    med = float(np.median(ses))
    sig = {
        m: sum(1 for u, e in data.effects[m].items() if u in data.se[m] and abs(e) > 2 * data.se[m][u])
        for m in data.methods
    }
    counts = ", ".join(f"{m} {c}" for m, c in sig.items())
    return (
        f"Noise: on these {data.n_docs} documents the median standard error of a unit's effect is {med:.3g} "
        f"({METRIC_LABEL[data.metric]}); units with |effect| above two standard errors: {counts} of "
        f"{len(data.units)}. Ranks among units whose effects differ by less than about two standard errors are not "
        "resolved by this evaluation set."
    )


def attribution_rows(data: ScanData) -> list[dict]:
    """Per method: correlation of the attribution estimate with the exact effect (same metric, first seed)."""
    if not data.attribution:
        return []
    out = []
    for m, est in data.attribution["estimates"].items():
        common = [u for u in data.units if u in est and u in data.effects.get(m, {})]
        if not common:
            continue
        x = np.array([est[u] for u in common])
        y = np.array([data.effects[m][u] for u in common])
        top_est, top_exact = top_k(common, est, data.k), top_k(common, data.effects[m], data.k)
        out.append(
            {
                "method": m,
                "units": len(common),
                "pearson": pearson(x, y),
                "spearman": spearman(x, y),
                "k": len(top_est),
                "top_k_overlap": len(set(top_est) & set(top_exact)),
            }
        )
    return out


# -- figures ----------------------------------------------------------------------------------------------------------
def _cmap(metric: str) -> str:
    return "RdBu_r" if metric == "ce" else "RdBu"  # red = the task gets worse


def heatmap_figure(data: ScanData, method: str, vmax: float) -> Figure:
    """Layer x unit map of ``method``'s effects (missing units blank); red where ablating hurts."""
    rows, cols = data.grid()
    n_layers, n_cols = max(rows) + 1, max(cols) + 1
    grid = np.full((n_layers, n_cols), np.nan)
    for u, r, c in zip(data.units, rows, cols):
        if u in data.effects[method]:
            grid[r, c] = data.effects[method][u]
    fig = Figure(figsize=(min(2.5 + 0.45 * n_cols, 12), 1.2 + 0.22 * n_layers), layout="constrained")
    ax = fig.subplots()
    vmax = vmax if vmax > 0 else 1.0
    im = ax.imshow(grid, aspect="auto", cmap=_cmap(data.metric), vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_xlabel({"head": "head"}.get(data.unit_kind, "unit within the layer"))
    ax.set_ylabel("layer")
    ax.set_title(f"{method}: {METRIC_LABEL[data.metric]} when one {data.unit_kind} is ablated", fontsize=9)
    if n_cols <= 32:
        ax.set_xticks(range(n_cols))
    fig.colorbar(im, ax=ax, label=METRIC_LABEL[data.metric])
    return fig


def _scatter(ax, x, y, labels, color, xlabel, ylabel, n_labels: int = 3) -> None:
    ax.scatter(x, y, s=10, color=color, alpha=0.75)
    lo = float(min(np.min(x), np.min(y), 0.0))
    hi = float(max(np.max(x), np.max(y), 0.0))
    ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls=":")
    order = np.argsort(-np.maximum(np.abs(x), np.abs(y)))[:n_labels]
    for i in order:
        ax.annotate(labels[i], (x[i], y[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def scatter_figure(data: ScanData) -> Figure | None:
    """One panel per pair of methods: the effects of one against the other's, with the diagonal."""
    pairs = [(a, b) for i, a in enumerate(data.methods) for b in data.methods[i + 1 :]]
    if not pairs:
        return None
    fig = Figure(figsize=(3.8 * len(pairs), 3.6), layout="constrained")
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    label = METRIC_LABEL[data.metric]
    for ax, (a, b) in zip(axes, pairs):
        common = [u for u in data.units if u in data.effects[a] and u in data.effects[b]]
        x = np.array([data.effects[a][u] for u in common])
        y = np.array([data.effects[b][u] for u in common])
        if len(common):
            _scatter(ax, x, y, common, "#555555", f"{a}: {label}", f"{b}: {label}")
        ax.set_title(f"{a} vs {b} (ρ = {spearman(x, y):.2f})", fontsize=9)
    return fig


def attribution_figure(data: ScanData) -> Figure | None:
    """Per method: the attribution estimate against the exact effect."""
    if not data.attribution:
        return None
    methods = [m for m in data.attribution["estimates"] if data.effects.get(m)]
    if not methods:
        return None
    colors = method_colors(data.methods)
    fig = Figure(figsize=(3.8 * len(methods), 3.6), layout="constrained")
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    label = METRIC_LABEL[data.metric]
    for ax, m in zip(axes, methods):
        est = data.attribution["estimates"][m]
        common = [u for u in data.units if u in est and u in data.effects[m]]
        x = np.array([data.effects[m][u] for u in common])
        y = np.array([est[u] for u in common])
        _scatter(ax, x, y, common, colors.get(m, "#333333"), f"exact {label}", f"ESTIMATE {label}")
        ax.set_title(f"{m}: attribution estimate vs exact (r = {pearson(x, y):.2f})", fontsize=9)
    return fig


# -- tables -----------------------------------------------------------------------------------------------------------
SCAN_COLUMNS = ["unit", "layer", "index", "n_ablated", "method", "effect", "se", "rank"]


def scan_records(data: ScanData, n_ablated: dict[str, int]) -> list[dict]:
    rows, cols = data.grid()
    place = {u: (r, c) for u, r, c in zip(data.units, rows, cols)}
    est = (data.attribution or {}).get("estimates", {})
    out = []
    for m in data.methods:
        order = {u: i + 1 for i, u in enumerate(top_k(data.units, data.effects[m], len(data.units)))}
        for u in data.units:
            if u not in data.effects[m]:
                continue
            rec = {
                "unit": u,
                "layer": place[u][0],
                "index": place[u][1],
                "n_ablated": n_ablated.get(u, ""),
                "method": m,
                "effect": data.effects[m][u],
                "se": data.se[m].get(u, ""),
                "rank": order[u],
            }
            rec.update(data.deltas[m][u])
            if u in est.get(m, {}):
                rec["attribution_estimate"] = est[m][u]
            out.append(rec)
    return out


def _fmt(x, spec: str = ".4g") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def _file_stem(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", method)


def top_table(data: ScanData) -> list[dict]:
    """Rank, then per method its unit at that rank and the effect (± standard error)."""
    tops = {m: top_k(data.units, data.effects[m], data.k) for m in data.methods}
    out = []
    for i in range(data.k):
        rec = {"rank": i + 1}
        for m in data.methods:
            if i < len(tops[m]):
                u = tops[m][i]
                se = data.se[m].get(u)
                rec[m] = f"{u} ({_fmt(data.effects[m][u], '+.3g')}" + (f" ± {_fmt(se, '.2g')})" if se else ")")
        out.append(rec)
    return out


# -- the report -------------------------------------------------------------------------------------------------------
def write_scan_report(
    run_dir: str | Path | RunFolder, out_dir: str | Path | None = None, data: ScanData | None = None
) -> Path:
    """Write the scan report of ``run_dir`` into ``out_dir`` (default ``run_dir/report``); returns report.html's
    path. Reads files only (``data``: :func:`load_scan` of ``run_dir`` when already loaded)."""
    data = data if data is not None else load_scan(run_dir)
    out = Path(out_dir) if out_dir is not None else inside(data.dir, data.dir / REPORT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    pairs = agreement(data)
    level, answer = verdict(data, pairs)
    attr = attribution_rows(data)
    records = scan_records(data, data.n_ablated)
    extra_cols = sorted({k for r in records for k in r if k.startswith("delta_")})
    cols = SCAN_COLUMNS + extra_cols + (["attribution_estimate"] if data.attribution else [])
    write_atomic(out / "scan.csv", records_csv(records, cols))
    agree_cols = ["method_a", "method_b", "units", "spearman", "pearson", "k", "top_k_overlap", "top_a", "top_b"]
    write_atomic(out / "agreement.csv", records_csv(pairs, agree_cols + ["only_a", "only_b"]))
    attr_cols = ["method", "units", "pearson", "spearman", "k", "top_k_overlap"]
    if attr:
        write_atomic(out / "attribution.csv", records_csv(attr, attr_cols))

    images: dict[str, bytes] = {}
    vmax = max([abs(v) for m in data.methods for v in data.effects[m].values()] or [0.0])
    for m in data.methods:
        if data.effects[m]:
            fig = heatmap_figure(data, m, vmax)
            save_figure(fig, out / f"heatmap_{_file_stem(m)}")
            images[f"heatmap {m}"] = png_bytes(fig)
    for name, fig in (("scatter", scatter_figure(data)), ("attribution", attribution_figure(data))):
        if fig is not None:
            save_figure(fig, out / name)
            images[name] = png_bytes(fig)

    f2 = lambda x: _fmt(x, ".3f")  # noqa: E731
    doc = Doc()
    for n in data.notes:
        doc.warn(n)
    doc.heading("Does the choice of constant change which components matter most?").text(answer, strong=True)
    doc.text(noise_sentence(data), note=True)
    doc.heading("Scan").facts(_facts(data))
    if pairs:
        doc.heading(f"Agreement between methods (top-{data.k})")
        doc.table(pairs, [*agree_cols[:7], "only_a", "only_b"], {"spearman": f2, "pearson": f2})
    doc.heading(f"Top {data.k} units per method")
    doc.text(f"By |{METRIC_LABEL[data.metric]}| when the unit alone is ablated; in brackets the effect ± its standard "
             "error.", note=True).table(top_table(data), ["rank", *data.methods])  # fmt: skip
    if attr:
        doc.heading("Attribution patching: an estimate").text(_attr_sentence(data, attr))
        doc.table(attr, attr_cols, {"pearson": f2, "spearman": f2})
        doc.figure(images.get("attribution"), "attribution.png", "attribution estimate against the exact effect")
    doc.heading("Heatmaps")
    doc.text(f"{METRIC_LABEL[data.metric]}, one colour scale for all methods; red: ablating the unit hurts the task.",
             note=True)  # fmt: skip
    for m in data.methods:
        doc.figure(images.get(f"heatmap {m}"), f"heatmap_{_file_stem(m)}.png", f"heatmap {m}")
    if "scatter" in images:
        doc.heading("One method against another")
        doc.figure(images["scatter"], "scatter.png", "effects of one method vs another")
    files = "scan.csv (every unit and method), agreement.csv" + (", attribution.csv" if attr else "")
    doc.text(f"Files: {files}. Definitions: knockout.reporting.scan and docs/components.md.", note=True)
    label = model_label(str(data.config.model or data.dir.name))
    page = doc.write(out, f"knockout scan: {label}, one {data.unit_kind} at a time")
    log.debug("scan report written to %s (answer: %s)", out, level)
    return page


def _facts(data: ScanData) -> dict:
    cfg = data.config
    base = ", ".join(f"{k} {_fmt(100 * v, '.2f') + '%' if k == 'top1' else _fmt(v)}" for k, v in data.baseline.items())
    return {
        "model": cfg.model,
        "data": cfg.data,
        "statistics data": cfg.stats_data or cfg.data,
        "evaluation": f"{cfg.eval_tokens} {_unit_of_eval(cfg)}, {data.n_docs} documents",
        "unit": data.unit_kind,
        "units": len(data.units),
        "methods": ", ".join(data.methods),
        "seeds": ", ".join(map(str, data.seeds)),
        "metric (effect)": METRIC_LABEL[data.metric],
        "baseline": base,
    }


def _unit_of_eval(cfg: SweepConfig) -> str:
    from knockout.data.prompts import is_task_source

    return "prompts (at most)" if is_task_source(cfg.data) else "scored tokens"


def _attr_sentence(data: ScanData, attr: list[dict]) -> str:
    if not attr:
        return ""
    parts = [
        f"{a['method']} Pearson {_fmt(a['pearson'], '.2f')}, Spearman {_fmt(a['spearman'], '.2f')}, top-{a['k']} "
        f"overlap {a['top_k_overlap']}"
        for a in attr
    ]
    return (
        "Attribution patching (an ESTIMATE: first order in constant − activation, one forward and backward pass; not "
        f"an ablation) against the exact effects: {'; '.join(parts)}."
    )


def format_scan(run_dir: str | Path, data: ScanData | None = None) -> str:
    """A few lines for the terminal: the answer and each method's top units (``data``: :func:`load_scan` of
    ``run_dir`` when already loaded)."""
    data = data if data is not None else load_scan(run_dir)
    pairs = agreement(data)
    _, answer = verdict(data, pairs)
    lines = [answer, ""]
    for m in data.methods:
        tops = top_k(data.units, data.effects[m], min(data.k, 5))
        lines.append(f"{m:<10} " + "  ".join(f"{u} {_fmt(data.effects[m][u], '+.3g')}" for u in tops))
    return "\n".join(lines)
