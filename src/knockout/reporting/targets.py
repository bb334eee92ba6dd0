"""The answer of an ``--ablate`` run, per named set: which constant hurts least when *this* set is ablated.

For each target (a named component set; rows with a non-empty ``target``), every pair of methods gets a verdict
exactly as at a fraction of a sweep (:mod:`knockout.reporting.answer`: one look at the run's sets with Holm over the
pairs, paired over the same documents, intervals from a document bootstrap shared across sets), by CE and by top-1,
and, for task prompts with a correct and an incorrect answer, by the logit difference too (the highest is best).
Read from the run folder's files only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from knockout.reporting import answer as A
from knockout.reporting.table import records_csv
from knockout.runfolder import RunFolder

N_BOOT = 2000


@dataclass
class TargetAnswer:
    """The verdicts of the methods on one named set."""

    target: str
    fraction: float
    n_ablated: int
    verdicts: A.FractionAnswer
    """Every pair's verdict by CE, top-1 and (task prompts) the logit difference, as at a fraction of a sweep."""
    logit_diff: dict[str, float] = field(default_factory=dict)
    """Method -> mean logit difference (task prompts with a correct and an incorrect answer), with ``baseline``."""
    notes: list[str] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        return self.verdicts.methods


def has_targets(rows: list[dict]) -> bool:
    """Whether the rows ablate named sets (an ``--ablate`` run or a scan)."""
    return any(r.get("target") for r in rows)


def target_answers(folder: RunFolder | str | Path, n_boot: int = N_BOOT) -> list[TargetAnswer]:
    """One :class:`TargetAnswer` per target of the run's rows, in the rows' order
    (:func:`knockout.reporting.answer.fraction_answer` on the set's rows); rows whose per-document sums do not add up
    to them are left out of the comparisons, and named."""
    folder = RunFolder.open(folder)
    rows = folder.row_dicts()
    base_ld = [r["logit_diff"] for r in rows if r["method"] == "baseline" and r.get("logit_diff") is not None]
    out = []
    for target in dict.fromkeys(r["target"] for r in rows if r["target"]):
        at = [r for r in rows if r["target"] == target]
        fa = A.fraction_answer(rows, folder.doc_sums, folder.config, at[0]["fraction"], n_boot, target=target)
        ta = TargetAnswer(target, at[0]["fraction"], int(at[0]["n_ablated"]), fa, notes=fa.notes)
        lds = {m: [r["logit_diff"] for r in at if r["method"] == m and r.get("logit_diff") is not None]
               for m in dict.fromkeys(r["method"] for r in at)}  # fmt: skip
        if base_ld and all(lds.values()):
            ta.logit_diff = {"baseline": sum(base_ld) / len(base_ld), **{m: sum(v) / len(v) for m, v in lds.items()}}
        bad = [f"{m} (seed {s}): {why}" for (m, _, s, t), why in folder.unusable.items() if t == target]
        if bad:
            ta.notes.append(f"Left out until they are evaluated again (re-run the same command): {'; '.join(bad)}.")
        out.append(ta)
    return out


def sentences(ta: TargetAnswer) -> list[str]:
    """Plain sentences (markdown emphasis) answering "which constant for this set"."""
    head = f"Set **{ta.target}** ({ta.n_ablated} neurons, {100 * ta.fraction:.3g}% of the site)"
    fa = ta.verdicts
    if not fa.ce:
        return [f"{head}: no paired comparison.", *ta.notes]
    out = [A.sentence(fa, "ce", head), A.sentence(fa, "top1", "By top-1")]
    if fa.ld:
        baseline = ta.logit_diff.get("baseline")
        by = "By the logit difference" + (f" (baseline {baseline:.3f})" if baseline is not None else "")
        out.append(A.sentence(fa, "ld", by))
    if ta.logit_diff:
        parts = ", ".join(f"{m} {v:.3f}" for m, v in ta.logit_diff.items())
        out.append(f"Logit difference: {parts}.")
    return out + ta.notes


NOTE = (
    "Differences are paired (same documents per seed); one look at the run's sets with Holm over the pairs at 5%: "
    "each interval is the one that decided its pair (docs/decisions.md)."
)


def add(doc, answers: list[TargetAnswer], summary: list[dict]) -> None:
    """The per-set answer and the per-set table (``summary``: :func:`knockout.reporting.summarize` of the rows), on a
    report page (:class:`knockout.reporting.doc.Doc`)."""
    doc.heading("The answer, per named set").items([" ".join(sentences(ta)) for ta in answers]).text(NOTE, note=True)
    cols = _shown_columns(summary)
    doc.heading("Per set and method (mean ± std over seeds)", 3)
    doc.table([{c: fmt(e) for c, fmt in cols} for e in _table_rows(summary)], [c for c, _ in cols])


def _table_rows(summary: list[dict]) -> list[dict]:
    base = [e for e in summary if e["method"] == "baseline"]
    order = {t: i for i, t in enumerate(dict.fromkeys(e["target"] for e in summary if e.get("target")))}
    return base + sorted((e for e in summary if e.get("target")), key=lambda e: order[e["target"]])


def _pm(e: dict, key: str, scale: float = 1.0, spec: str = ".4f") -> str:
    if f"{key}_mean" not in e:
        return ""
    return f"{format(scale * e[f'{key}_mean'], spec)} ± {format(scale * e[f'{key}_std'], spec.lstrip('+'))}"


def _shown_columns(summary: list[dict]) -> list[tuple[str, object]]:
    cols = [
        ("set", lambda e: e.get("target") or "(none)"),
        ("method", lambda e: e["method"]),
        ("neurons", lambda e: f"{e['n_ablated']:g}"),
        ("top-1 %", lambda e: _pm(e, "top1", 100, ".2f")),
        ("CE", lambda e: _pm(e, "ce")),
        ("ΔCE", lambda e: _pm(e, "delta_ce", 1, "+.4f")),
    ]
    if any("logit_diff_mean" in e for e in summary):
        cols += [("logit diff", lambda e: _pm(e, "logit_diff", 1, ".3f"))]
        cols += [("Δ logit diff", lambda e: _pm(e, "delta_logit_diff", 1, "+.3f"))]
    return cols


TABLE_COLUMNS = ["target", "method", "n_ablated", "fraction", "n_seeds", "top1_mean", "ce_mean", "delta_top1_mean"]
TABLE_COLUMNS += ["delta_ce_mean", "logit_diff_mean", "delta_logit_diff_mean"]


def table_csv(summary: list[dict]) -> str:
    """Every (target, method) entry of the summary (mean over seeds), as CSV."""
    return records_csv([e for e in summary if e.get("target")], TABLE_COLUMNS)
