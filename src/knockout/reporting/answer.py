"""The answer a report opens with: which method is best at each table fraction, by how much, and how sure we are.

Read from the run folder's per-document sums (``paired/``, see :mod:`knockout.runfolder`) only. For each fraction:

- the best method by CE and by top-1 (:func:`knockout.reporting.paired.best_method`), its lead over the runner-up
  with a 95% interval, and whether it is significantly better than *every* other method;
- when ``optimal`` is in the run, each other method's excess CE over ``optimal`` (``CE(method) - CE(optimal)``, with
  its interval): how far that method is from the best constant found for the same neuron sets.

Rows without per-document sums are left out of the comparison and the answer says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from knockout.errors import KnockoutError
from knockout.reporting import html as H
from knockout.reporting.escape import markdown as md
from knockout.reporting.escape import markdown_keep_bold
from knockout.reporting.paired import BestMethod, DocSums, PairedDifference, best_method, paired_difference
from knockout.runfolder import doc_sums_disagree, fraction_key, read_doc_sums, read_rows, row_key

OPTIMAL = "optimal"
LEVEL = 0.95
N_BOOT = 2000


@dataclass
class FractionAnswer:
    """The comparison of the methods at one fraction."""

    fraction: float
    methods: list[str]
    """Methods compared (those with per-document sums for every seed compared)."""
    seeds: list[int]
    ce: BestMethod | None = None
    top1: BestMethod | None = None
    excess: dict[str, PairedDifference] = field(default_factory=dict)
    """Method -> ``CE(method) - CE(optimal)`` (only when ``optimal`` was compared)."""
    notes: list[str] = field(default_factory=list)

    @property
    def n_docs(self) -> int:
        return self.ce.lead.n_docs if self.ce else 0


@dataclass
class Answer:
    fractions: list[FractionAnswer]
    method: str = ""
    """How the intervals are computed, in words (from :func:`paired_difference`)."""

    @property
    def available(self) -> bool:
        return any(f.ce is not None for f in self.fractions)


def run_answer(run_dir: str | Path, fractions: tuple[float, ...], n_boot: int = N_BOOT) -> Answer:
    """The answer for ``run_dir`` at each of ``fractions`` (see the module docstring)."""
    rows = read_rows(run_dir)
    sums = read_doc_sums(run_dir)
    for r in rows:  # sums that do not add up to their row's CE and top-1 are not the row's: left out (and named)
        key = row_key(r["method"], r["fraction"], r["seed"], r["target"])
        if key in sums and doc_sums_disagree(r, sums[key]) is not None:
            del sums[key]
    out, how = [], ""
    for f in fractions:
        fa = fraction_answer(rows, sums, f, n_boot)
        out.append(fa)
        if fa.ce is not None:
            how = fa.ce.lead.method
    return Answer(out, how)


def fraction_answer(rows: list[dict], sums: dict, fraction: float, n_boot: int = N_BOOT) -> FractionAnswer:
    """Compare the methods of ``rows`` at ``fraction`` on the per-document ``sums`` (``read_doc_sums``)."""
    key_f = fraction_key(fraction)
    at = [r for r in rows if r["method"] != "baseline" and fraction_key(r["fraction"]) == key_f]
    methods = list(dict.fromkeys(r["method"] for r in at))
    seeds = sorted({int(r["seed"]) for r in at})
    fa = FractionAnswer(fraction, [], [])
    if not methods:
        fa.notes.append(f"No rows at fraction {fraction:g}.")
        return fa
    without = [m for m in methods if not any(row_key(m, fraction, s) in sums for s in seeds)]
    if without:
        fa.notes.append(
            f"Rows of {', '.join(without)} at {fraction:g} have no per-document sums; left out of the paired "
            "comparison."
        )
    methods = [m for m in methods if m not in without]
    common = [s for s in seeds if all(row_key(m, fraction, s) in sums for m in methods)]
    if len(common) < len(seeds) and methods:
        why = "; ".join(
            f"seed {s} lacks those of {', '.join(m for m in methods if row_key(m, fraction, s) not in sums)}"
            for s in seeds
            if s not in common
        )
        fa.notes.append(
            f"At {fraction:g} only seeds {', '.join(map(str, common)) or 'none'} have per-document sums for every "
            f"method; the comparison uses those ({why}: missing from paired/, or not adding up to their rows in "
            "results.jsonl; re-run the same sweep command to recompute them)."
        )
    fa.methods, fa.seeds = methods, common
    if len(methods) < 2 or not common:
        fa.notes.append(f"Fewer than two methods to compare at {fraction:g}.")
        return fa
    data = {m: [DocSums(**sums[row_key(m, fraction, s)]) for s in common] for m in methods}
    try:
        fa.ce = best_method(data, "ce", LEVEL, n_boot)
        fa.top1 = best_method(data, "top1", LEVEL, n_boot)
        if OPTIMAL in data:
            fa.excess = {
                m: paired_difference(data[m], data[OPTIMAL], "ce", LEVEL, n_boot) for m in methods if m != OPTIMAL
            }
    except KnockoutError as e:
        fa.ce = fa.top1 = None
        fa.notes.append(f"No paired comparison at {fraction:g}: {e}")
    return fa


# -- wording ----------------------------------------------------------------------------------------------------------
def _pct(f: float) -> str:
    return f"{100 * f:g}%"


def _ci(d: PairedDifference, scale: float = 1.0, unit: str = "") -> str:
    return f"{scale * d.estimate:+.3f}{unit} [{scale * d.low:+.3f}, {scale * d.high:+.3f}]"


def _sig(b: BestMethod) -> str:
    if b.significant:
        return "significant (every 95% interval against the others excludes 0)"
    losers = [m for m, d in b.leads.items() if not d.significant]
    return f"not significant (the interval against {', '.join(losers)} includes 0)"


def sentences(fa: FractionAnswer) -> list[str]:
    """Plain-text sentences (markdown emphasis) answering the question at one fraction."""
    head = f"At {_pct(fa.fraction)} ablated"
    if fa.ce is None:
        return [f"{head}: no paired comparison. " + " ".join(fa.notes)]
    ce, t1 = fa.ce, fa.top1
    out = [
        f"{head} ({len(fa.seeds)} seed{'s' if len(fa.seeds) != 1 else ''} x {fa.n_docs} documents): best by CE "
        f"**{ce.best}** (CE {ce.values[ce.best]:.4f}), {-ce.lead.estimate:.4f} nats below the runner-up "
        f"{ce.runner_up} (difference {_ci(ce.lead)} nats); {_sig(ce)}.",
        f"Best by top-1 **{t1.best}** ({100 * t1.values[t1.best]:.2f}%), {100 * t1.lead.estimate:+.2f} points over "
        f"{t1.runner_up} ({_ci(t1.lead, 100, ' pt')}); {_sig(t1)}.",
    ]
    if fa.excess:
        parts = [f"{m} {_ci(d)}{'' if d.significant else ' (n.s.)'}" for m, d in fa.excess.items()]
        out.append("Excess CE over optimal (nats, 95% interval): " + "; ".join(parts) + ".")
    return out + fa.notes


def markdown(answer: Answer, heading: str = "## The answer") -> list[str]:
    """The answer section in markdown."""
    lines = [heading, ""]
    if not answer.available:
        notes = [n for f in answer.fractions for n in f.notes]
        return lines + ["No paired comparison is possible: " + md(" ".join(notes) or "no per-document sums."), ""]
    for fa in answer.fractions:
        lines += ["- " + markdown_keep_bold(" ".join(sentences(fa)))]
    lines += ["", f"_Differences are paired (same neuron sets and evaluation tokens per seed); {answer.method}._", ""]
    return lines


def html(answer: Answer, heading: str = "<h2>The answer</h2>") -> str:
    """The answer section in HTML."""
    if not answer.available:
        notes = [n for f in answer.fractions for n in f.notes]
        return heading + f"<p>No paired comparison is possible: {H.esc(' '.join(notes) or 'no per-document sums.')}</p>"
    items = []
    for fa in answer.fractions:
        text = H.esc(" ".join(sentences(fa)))
        text = text.replace("**", "\x00")
        parts = text.split("\x00")
        items.append("".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts)))
    note = f"Differences are paired (same neuron sets and evaluation tokens per seed); {answer.method}."
    return heading + "<ul>" + "".join(f"<li>{i}</li>" for i in items) + f'</ul><p class="note">{H.esc(note)}</p>'


def best_rows(answer: Answer) -> list[dict]:
    """One record per fraction for the table beside Table 2: best method (CE, top-1), lead and significance."""
    out = []
    for fa in answer.fractions:
        if fa.ce is None:
            out.append({"fraction": f"{fa.fraction:g}", "best (CE)": "n/a", "best (top-1)": "n/a"})
            continue
        out.append(
            {
                "fraction": f"{fa.fraction:g}",
                "best (CE)": fa.ce.best,
                "CE lead over runner-up": f"{fa.ce.runner_up}: {_ci(fa.ce.lead)}",
                "CE significant": "yes" if fa.ce.significant else "no",
                "best (top-1)": fa.top1.best,
                "top-1 lead (pt)": f"{fa.top1.runner_up}: {_ci(fa.top1.lead, 100)}",
                "top-1 significant": "yes" if fa.top1.significant else "no",
            }
        )
    return out


BEST_COLUMNS = [
    "fraction",
    "best (CE)",
    "CE lead over runner-up",
    "CE significant",
    "best (top-1)",
    "top-1 lead (pt)",
    "top-1 significant",
]


def best_markdown(answer: Answer) -> list[str]:
    recs = best_rows(answer)
    lines = ["| " + " | ".join(BEST_COLUMNS) + " |", "|" + "---|" * len(BEST_COLUMNS)]
    lines += ["| " + " | ".join(md(r.get(c, "")) for c in BEST_COLUMNS) + " |" for r in recs]
    return lines + [""]


def best_html(answer: Answer) -> str:
    return H.records_table(best_rows(answer), BEST_COLUMNS)
