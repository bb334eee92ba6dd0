"""The report of a ``--keep`` / ``--keep-top`` run: is the circuit faithful, and does the answer depend on the method?

Read from the run folder alone (:class:`knockout.runfolder.RunFolder`: the recorded sets in ``resolved.targets``,
the rows, and their per-document sums, only those that add up to their rows). For one seed (the first whose
baseline has sums), per method and per metric (the logit difference for task prompts with a correct and an incorrect
answer, and CE on the answer tokens):

- per named set ``S`` kept: the circuit's metric and its **faithfulness** (m(circuit) - m(nothing)) / (m(full) -
  m(nothing)) with its paired interval over prompts (:func:`knockout.inference.faithfulness.faithfulness`), and
  beside it the necessity: the metric with ``S`` itself ablated; per pair of methods the difference of their
  faithfulness with its paired interval, decided or not
  (:func:`~knockout.inference.faithfulness.faithfulness_difference`);
- for ``--keep-top``, per method the curve over the planned sizes, its areas (CPR, CMD) with intervals, the smallest
  size reaching 80%, and per pair of methods the paired differences of the areas
  (:func:`~knockout.inference.faithfulness.curve_difference`).

Files (in the report folder): ``faithfulness.csv`` (:data:`COLUMNS`, one line per method, set or size and metric),
``faithfulness.json`` (everything, the curves included) and ``faithfulness.png/.svg`` (the curves side by side).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from knockout.components import NOTHING, top_name
from knockout.errors import KnockoutError
from knockout.inference.faithfulness import curve_difference, faithfulness, faithfulness_curve, faithfulness_difference
from knockout.reporting.table import records_csv
from knockout.runfolder import RunFolder, row_key

METRIC_NAMES = {"ld": "logit difference", "ce": "CE on the answer tokens"}
COLUMNS = ["method", "set", "k", "metric", "faithfulness", "low", "high", "circuit", "full", "empty", "ablated"]
PAIR_COLUMNS = ["set", "k", "metric", "a", "b", "difference", "low", "high", "decided"]
AREA_COLUMNS = ["metric", "method", "cpr", "cpr_low", "cpr_high", "cmd", "cmd_low", "cmd_high", "k_reached"]
AREA_PAIR_COLUMNS = ["metric", "a", "b", "cpr_difference", "cpr_low", "cpr_high", "cmd_difference", "cmd_low"]
AREA_PAIR_COLUMNS += ["cmd_high", "decided"]
POSITIONS = (
    "every position of each prompt (the ablated neurons take their value at all positions; patch copies the "
    "counterfactual's value position by position)"
)


@dataclass
class CircuitReport:
    """The faithfulness of a run's kept sets (see the module docstring)."""

    seed: int
    methods: list[str]
    metrics: list[str]
    records: list[dict] = field(default_factory=list)
    """:data:`COLUMNS`: per method, named set (``set``) or curve size (``k``), and metric."""
    pairs: list[dict] = field(default_factory=list)
    """:data:`PAIR_COLUMNS`: per named set and metric, each pair of methods' faithfulness difference."""
    curves: dict = field(default_factory=dict)
    """Metric -> method -> :class:`~knockout.inference.faithfulness.FaithfulnessCurve`."""
    areas: list[dict] = field(default_factory=list)
    area_pairs: list[dict] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    total: int | None = None
    ranking: str | None = None
    statistics: str = ""
    notes: list[str] = field(default_factory=list)


def has_kept(folder: RunFolder) -> bool:
    """Whether the run keeps components (a set of ``resolved.targets`` records ``kept``)."""
    return any(isinstance(t, dict) and "kept" in t for t in (folder.resolved.targets or {}).values())


def statistics_source(folder: RunFolder) -> str:
    """Where mean, peak and the other centres' statistics came from, in words."""
    cfg = folder.config
    if cfg is None:
        return "unknown (no config.json)"
    if cfg.stats_data is not None:
        return f"the collection part of --stats-data {cfg.stats_data} (not the task's prompts)"
    from knockout.data.prompts import is_task_source

    if is_task_source(cfg.data):
        return f"the task's collection prompts ({cfg.data}; disjoint from the evaluated prompts)"
    return f"the collection part of {cfg.data}"


def _metric(sums: dict, metric: str) -> float:
    return float(np.sum(sums["ld_sum" if metric == "ld" else "ce_sum"]) / np.sum(sums["n"]))


def circuit_report(folder: RunFolder | str | Path, n_boot: int = 2000) -> CircuitReport | None:
    """The faithfulness of the run's kept sets, or ``None`` when it keeps none."""
    folder = RunFolder.open(folder)
    if not has_kept(folder):
        return None
    targets = folder.resolved.targets or {}
    rows, sums = folder.row_dicts(), folder.doc_sums
    seeds = sorted({int(r["seed"]) for r in rows if r["method"] == "baseline"})
    seed = next((s for s in seeds if row_key("baseline", 0.0, s) in sums), None)
    cfg = folder.config
    methods = [m for m in (cfg.methods if cfg else ()) if any(r["method"] == m for r in rows)]
    methods += [m for m in dict.fromkeys(r["method"] for r in rows) if m != "baseline" and m not in methods]
    rep = CircuitReport(seed if seed is not None else 0, methods, [], statistics=statistics_source(folder))
    note = folder.unusable_note()
    if note:
        rep.notes.append(note)
    if seed is None:
        rep.notes.append("No baseline row with per-prompt sums yet: no faithfulness.")
        return rep
    full = sums[row_key("baseline", 0.0, seed)]
    rep.metrics = [m for m in ("ld", "ce") if m == "ce" or "ld_sum" in full]
    if len(seeds) > 1:
        rep.notes.append(f"Faithfulness is computed on seed {seed}'s rows (of seeds {', '.join(map(str, seeds))}).")
    fraction = {name: float(t.get("fraction", 0.0)) for name, t in targets.items() if isinstance(t, dict)}

    def row(method: str, target: str) -> dict | None:
        return sums.get(row_key(method, fraction.get(target, 0.0), seed, target))

    missing: list[str] = []
    for name, t in targets.items():
        what = t.get("kept") if isinstance(t, dict) else None
        if not isinstance(what, dict) or "set" not in what:
            continue
        s = what["set"]
        by_method = {}
        for m in methods:
            circuit, empty, ablated = row(m, name), row(m, NOTHING), row(m, s)
            if circuit is None or empty is None:
                missing.append(f"{m} {name}")
                continue
            by_method[m] = (circuit, empty)
            for metric in rep.metrics:
                rec = {"method": m, "set": s, "k": None, "metric": metric}
                try:
                    f = faithfulness(full, circuit, empty, metric, n_boot=n_boot, seed=seed)
                except KnockoutError as e:
                    rep.notes.append(f"{s}, {m}, {METRIC_NAMES[metric]}: {e}")
                    continue
                necessity = _metric(ablated, metric) if ablated is not None else None
                rec.update(faithfulness=f.estimate + 0.0, low=f.low, high=f.high, circuit=f.circuit, full=f.full,
                           empty=f.empty, ablated=necessity)  # fmt: skip
                rep.records.append(rec)
        names = list(by_method)
        for metric in rep.metrics:
            for i, a in enumerate(names):
                for b in names[i + 1 :]:
                    try:
                        d = faithfulness_difference(full, *by_method[a], *by_method[b], metric, n_boot=n_boot,
                                                    seed=seed)  # fmt: skip
                    except KnockoutError as e:
                        rep.notes.append(f"{s}, {a} vs {b}, {METRIC_NAMES[metric]}: {e}")
                        continue
                    e_ = d.difference
                    rep.pairs.append({"set": s, "k": None, "metric": metric, "a": a, "b": b, "difference": e_.estimate,
                                      "low": e_.low, "high": e_.high, "decided": d.decided})  # fmt: skip
    if cfg is not None and cfg.keep_top is not None:
        _curves(rep, cfg.keep_top, targets, full, row, methods, missing, n_boot)
    if missing:
        rep.notes.append(
            f"{len(missing)} row(s) are missing or have unusable sums ({', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}); resume the run with the same command."
        )
    return rep


def _curves(rep: CircuitReport, sizes, targets: dict, full: dict, row, methods: list[str], missing: list[str],
            n_boot: int) -> None:  # fmt: skip
    """The faithfulness curve of every method over ``sizes`` and the paired differences of their areas."""
    totals = {t["kept"]["of"] for t in targets.values() if isinstance(t, dict) and "of" in (t.get("kept") or {})}
    if len(totals) != 1:
        rep.notes.append("The run records no single ranking size: no faithfulness curve.")
        return
    total = rep.total = int(totals.pop())
    rep.sizes = [int(k) for k in sizes]
    ranked = [t for t in targets.values() if isinstance(t, dict) and (t.get("kept") or {}).get("k")]
    if ranked:
        rep.ranking = max(ranked, key=lambda t: t["kept"]["k"])["components"]
    circuits = {}
    for m in methods:
        rs = [row(m, NOTHING if k == 0 else top_name(k)) for k in rep.sizes]
        empty = row(m, NOTHING)
        if empty is None or any(r is None for r in rs):
            missing.append(f"{m} curve")
            continue
        circuits[m] = (rs, empty)
    for metric in rep.metrics:
        rep.curves[metric] = {}
        for m, (rs, empty) in circuits.items():
            try:
                c = faithfulness_curve(full, rs, empty, rep.sizes, total, metric, n_boot=n_boot, seed=rep.seed)
            except KnockoutError as e:
                rep.notes.append(f"curve, {m}, {METRIC_NAMES[metric]}: {e}")
                continue
            rep.curves[metric][m] = c
            rep.areas.append({"metric": metric, "method": m, "cpr": c.cpr.estimate, "cpr_low": c.cpr.low,
                              "cpr_high": c.cpr.high, "cmd": c.cmd.estimate, "cmd_low": c.cmd.low,
                              "cmd_high": c.cmd.high, "k_reached": c.k_reached})  # fmt: skip
            for k, f, lo, hi, r in zip(rep.sizes, c.faithfulness, c.low, c.high, rs):
                rep.records.append({"method": m, "set": NOTHING if k == 0 else top_name(k), "k": k,
                                    "metric": metric, "faithfulness": f + 0.0, "low": lo, "high": hi,
                                    "circuit": _metric(r, metric), "full": _metric(full, metric),
                                    "empty": _metric(circuits[m][1], metric), "ablated": None})  # fmt: skip
        names = list(rep.curves[metric])
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                (ra, ea), (rb, eb) = circuits[a], circuits[b]
                try:
                    d = curve_difference(full, ra, ea, rb, eb, rep.sizes, total, metric, n_boot=n_boot, seed=rep.seed)
                except KnockoutError as e:
                    rep.notes.append(f"curves {a} vs {b}, {METRIC_NAMES[metric]}: {e}")
                    continue
                rep.area_pairs.append({"metric": metric, "a": a, "b": b, "cpr_difference": d.cpr.estimate,
                                       "cpr_low": d.cpr.low, "cpr_high": d.cpr.high, "cmd_difference": d.cmd.estimate,
                                       "cmd_low": d.cmd.low, "cmd_high": d.cmd.high, "decided": d.decided})  # fmt: skip


# -- as data ----------------------------------------------------------------------------------------------------------
def table(rep: CircuitReport | None):
    """The faithfulness table as a pandas DataFrame (:data:`COLUMNS`; empty without kept sets)."""
    import pandas as pd

    return pd.DataFrame([] if rep is None else rep.records, columns=COLUMNS)


def to_json(rep: CircuitReport) -> dict:
    """Everything of the report, the curves included (``faithfulness.json``)."""
    curves = {metric: {m: asdict(c) for m, c in by.items()} for metric, by in rep.curves.items()}
    return {
        "seed": rep.seed,
        "methods": rep.methods,
        "metrics": {m: METRIC_NAMES[m] for m in rep.metrics},
        "statistics": rep.statistics,
        "positions": POSITIONS,
        "sets": [r for r in rep.records if r["k"] is None],
        "pairs": rep.pairs,
        "curve": {
            "sizes": rep.sizes,
            "total": rep.total,
            "ranking": rep.ranking,
            "points": curves,
            "areas": rep.areas,
            "pairs": rep.area_pairs,
        }
        if rep.curves
        else None,  # fmt: skip
        "notes": rep.notes,
    }


def write_files(rep: CircuitReport, out: Path, write) -> dict[str, bytes]:
    """``faithfulness.csv``, ``faithfulness.json`` and (with curves) ``faithfulness.png/.svg`` into ``out``
    (``write``: the atomic writer); returns the figure's PNG bytes by name for the HTML page."""
    from knockout.reporting.figures import faithfulness_figure, png_bytes, save_figure

    write(out / "faithfulness.csv", records_csv(rep.records, COLUMNS))
    write(out / "faithfulness.json", json.dumps(to_json(rep), indent=2, default=_json_default) + "\n")
    images = {}
    if any(rep.curves.values()):
        fig = faithfulness_figure({k: v for k, v in rep.curves.items() if v}, METRIC_NAMES)
        save_figure(fig, out / "faithfulness")
        images["faithfulness"] = png_bytes(fig)
    return images


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.bool_):
        return bool(x)
    raise TypeError(type(x).__name__)


# -- words ------------------------------------------------------------------------------------------------------------
def _ci(v, lo, hi, spec=".3f") -> str:
    return f"{format(v, spec)} [{format(lo, spec)}, {format(hi, spec)}]"


def sentences(rep: CircuitReport) -> list[str]:
    """The answer in plain sentences (markdown emphasis)."""
    out = []
    sets = list(dict.fromkeys(r["set"] for r in rep.records if r["k"] is None))
    for s in sets:
        for metric in rep.metrics:
            recs = [r for r in rep.records if r["k"] is None and r["set"] == s and r["metric"] == metric]
            if not recs:
                continue
            parts = ", ".join(f"{r['method']} {_ci(r['faithfulness'], r['low'], r['high'])}" for r in recs)
            abl = ", ".join(f"{r['method']} {r['ablated']:.3f}" for r in recs if r["ablated"] is not None)
            text = (f"Circuit **{s}** kept, by the {METRIC_NAMES[metric]}: faithfulness {parts} (full model "
                    f"{recs[0]['full']:.3f}).")  # fmt: skip
            if abl:
                text += f" Necessity, {s} itself ablated: {abl}."
            pairs = [p for p in rep.pairs if p["set"] == s and p["metric"] == metric]
            decided = [p for p in pairs if p["decided"]]
            if pairs:
                text += " " + (
                    "Methods differ: "
                    + "; ".join(f"{p['a']} − {p['b']} = {_ci(p['difference'], p['low'], p['high'])}" for p in decided)
                    + "."  # fmt: skip
                    if decided
                    else "No pair of methods differs decidedly."
                )
                undecided = len(pairs) - len(decided)
                if decided and undecided:
                    text += f" {undecided} other pair(s) undecided."
            out.append(text)
    for metric, by in rep.curves.items():
        if not by:
            continue
        parts = "; ".join(
            f"{m} CPR {_ci(c.cpr.estimate, c.cpr.low, c.cpr.high)}, CMD {_ci(c.cmd.estimate, c.cmd.low, c.cmd.high)}, "
            f"80% at k = {c.k_reached if c.k_reached is not None else 'none'}"
            for m, c in by.items()
        )
        text = f"Curve (top k of {rep.total} units), by the {METRIC_NAMES[metric]}: {parts}."
        pairs = [p for p in rep.area_pairs if p["metric"] == metric]
        decided = [p for p in pairs if p["decided"]]
        if pairs:
            text += " " + (
                "Curves differ: "
                + "; ".join(
                    f"{p['a']} − {p['b']} CPR {_ci(p['cpr_difference'], p['cpr_low'], p['cpr_high'])}, CMD "
                    f"{_ci(p['cmd_difference'], p['cmd_low'], p['cmd_high'])}"
                    for p in decided
                )
                + "."  # fmt: skip
                if decided
                else "No pair of methods' curves differs decidedly."
            )
            if decided and len(pairs) > len(decided):
                text += f" {len(pairs) - len(decided)} other pair(s) undecided."
        out.append(text)
    return out


def note(rep: CircuitReport) -> str:
    """How the numbers were made, in one paragraph."""
    return (
        f"Faithfulness = (m(circuit) − m(nothing kept)) / (m(full model) − m(nothing kept)), per method, on seed "
        f"{rep.seed}'s rows; 95% percentile intervals from a bootstrap over prompts with the same prompts for every "
        "row "
        f"involved (paired); a difference is decided when its interval excludes 0. Statistics for mean, peak and the "
        f"other centres: {rep.statistics}. Positions ablated: {POSITIONS}. The curve's areas are trapezoids over the "
        "planned sizes as fractions of all units (CPR: under the curve, higher is more faithful; CMD: under |1 − f|, "
        "lower is closer to the full model)."
    )


def _fmt_records(records: list[dict]) -> list[dict]:
    f = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return [{k: f(v) for k, v in r.items()} for r in records]


def add(doc, rep: CircuitReport, images: dict[str, bytes]) -> None:
    """The circuits section of a report page (:class:`knockout.reporting.doc.Doc`)."""
    doc.heading("Circuits: faithfulness").items(sentences(rep)).text(note(rep), note=True)
    for n in rep.notes:
        doc.text(n, note=True)
    doc.figure(images.get("faithfulness"), "faithfulness.png", "faithfulness curves per method")
    for title, records, cols in (("Faithfulness", rep.records, COLUMNS), ("Curve areas", rep.areas, AREA_COLUMNS),
                                 ("Curve differences", rep.area_pairs, AREA_PAIR_COLUMNS)):  # fmt: skip
        if records:
            doc.heading(title, 3).table(_fmt_records(records), cols)
