"""The answer a report opens with: at each fraction, which method hurts the model least, a verdict for every pair of
methods, and how far each is from the bound.

Read from the run folder's rows and per-document sums (``paired/``) only. For each fraction:

- the *contenders* are the methods a user would choose (zero, mean, peak, median, mode, the resampling methods ...);
  ``optimal`` is a *bound* (the best any constant found for the same neuron sets: ``is_bound`` in the registry), not
  a contender;
- every pair of contenders gets a verdict from the sequential design of :mod:`knockout.inference.sequential`, for CE
  and for top-1: "A hurts less than B by x [lo, hi]", or undecided. A run with fixed seeds is one look at all its
  sets (Holm over the pairs at ``alpha``); a ``--seeds auto`` run is replayed look by look exactly as the runner made
  it, with its planned looks and spending;
- the best contender is the one decided better than every other (none while a pair involving the leader is open);
- each contender's excess CE over the bound, ``CE(method) - CE(optimal)``, with a plain 95% interval on the sets
  that have both; a bound whose evaluation CE is above a contender's on some set is flagged (its constants did not
  generalise from the collection split: the bound is then false there);
- for undecided pairs: what deciding the observed difference would need (:func:`knockout.inference.sequential.needed`)
  and whether more sets or more documents would narrow the interval faster.

The report's folder gets ``answer.json`` (everything above, as data) and ``paired.csv`` (one line per pair, metric
and fraction, and one per excess over the bound), and ``answer.png`` (a forest plot of the differences).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from knockout.config import SweepConfig
from knockout.errors import KnockoutError
from knockout.inference.paired import HIGHER_IS_BETTER, DocSums, PairedDifference, paired_difference
from knockout.inference.sequential import (
    ALPHA,
    DecideOptions,
    Need,
    PairVerdict,
    Plan,
    SequentialTest,
    common_docs,
    families,
    family_statement,
    needed,
)
from knockout.reporting.centres import peak_noise_notes
from knockout.runfolder import DOC_FIELDS, RunFolder, fraction_key, row_key

LEVEL = 0.95
N_BOOT = 2000
METRIC_WORDS = {
    "ce": ("hurts least", "nats", "less than"),
    "top1": ("keeps the most top-1", "points", "more than"),
    "ld": ("keeps the logit difference highest", "", "more than"),
}


def is_bound(method: str) -> bool:
    """Whether ``method`` is a bound (``optimal``) rather than a contender (unknown names are contenders)."""
    from knockout.ablation.methods import get_method

    try:
        return bool(get_method(method).is_bound)
    except KnockoutError:
        return False


@dataclass
class FractionAnswer:
    """The verdicts at one fraction."""

    fraction: float
    methods: list[str]
    """The contenders compared."""
    ce: list[PairVerdict] = field(default_factory=list)
    top1: list[PairVerdict] = field(default_factory=list)
    ld: list[PairVerdict] = field(default_factory=list)
    """By the logit difference (task prompts with a correct and an incorrect answer; named sets only)."""
    n_sets: int = 0
    """Neuron sets of the last look (CE)."""
    n_docs: int = 0
    """Documents of the last look (CE)."""
    max_docs: int | None = None
    """The most documents the design could add up to (``--decide-max-docs``); ``None``: documents fixed."""
    design: str = ""
    """How the sets were chosen and looked at, in words."""
    stop: str = ""
    """``decided`` (every CE pair), ``futile``, ``maximum``, ``fixed`` (one look at fixed seeds) or ``incomplete``."""
    bound: str | None = None
    excess: dict[str, PairedDifference] = field(default_factory=dict)
    """Contender -> ``CE(contender) - CE(bound)`` with its 95% interval."""
    needs: dict[tuple[str, str], Need] = field(default_factory=dict)
    """Undecided CE pair -> what deciding it would take."""
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def verdicts(self, metric: str) -> list[PairVerdict]:
        return {"ce": self.ce, "top1": self.top1, "ld": self.ld}[metric]

    def best(self, metric: str) -> str | None:
        """The contender decided better than every other, if there is one."""
        for m in self.methods:
            wins = [v for v in self.verdicts(metric) if m in (v.a, v.b)]
            if wins and len(wins) == len(self.methods) - 1 and all(v.better == m for v in wins):
                return m
        return None

    def leader(self, metric: str) -> str | None:
        """The contender with the best estimate (decided or not)."""
        values = self.values(metric)
        if not values:
            return None
        sign = -1 if HIGHER_IS_BETTER[metric] else 1
        return min(values, key=lambda m: sign * values[m])

    def values(self, metric: str) -> dict[str, float]:
        """Each contender's metric relative to the first contender (from the pairs' estimates)."""
        verdicts = self.verdicts(metric)
        if not self.methods or not verdicts:
            return {}
        ref = self.methods[0]
        out = {ref: 0.0}
        for v in verdicts:
            if v.a == ref:
                out[v.b] = -v.estimate
            elif v.b == ref:
                out[v.a] = v.estimate
        return out


@dataclass
class Answer:
    fractions: list[FractionAnswer]
    alpha: float = ALPHA
    families: str = ""
    """Over what the error rate holds (:func:`knockout.inference.sequential.family_statement`)."""

    @property
    def available(self) -> bool:
        return any(f.ce for f in self.fractions)


# -- computing ------------------------------------------------------------------------------------------------------
def run_answer(folder: RunFolder | str | Path, fractions: tuple[float, ...], n_boot: int = N_BOOT) -> Answer:
    """The answer for the run folder at each of ``fractions`` (see the module docstring), from its rows and their
    checked per-document sums (:attr:`knockout.runfolder.RunFolder.doc_sums`: sums that do not add up to their row
    are left out, and named)."""
    folder = RunFolder.open(folder)
    rows, cfg = folder.row_dicts(), folder.config
    decide = cfg.decide if cfg is not None else DecideOptions()
    held = {fraction_key(r["fraction"]) for r in rows if r["method"] != "baseline" and not r["target"]}
    fractions = tuple(f for f in fractions if fraction_key(f) in held)  # lines only for fractions the run holds
    design = folder.resolved.design or (cfg.design() if cfg is not None else None)
    answer = Answer([fraction_answer(rows, folder.doc_sums, cfg, f, n_boot, design) for f in fractions], decide.alpha)
    if fractions:
        answer.families = family_statement(fractions, ("ce", "top1"), decide.alpha, decide.joint)
    note = folder.unusable_note()
    if note:
        for fa in answer.fractions:
            fa.notes.append(note)
    return answer


def _seed_order(cfg: SweepConfig | None, rows: list[dict]) -> list[int]:
    """Seeds in the order their sets were added: the configured ones (``auto``: 0, 1, 2, ...), then any others."""
    found = sorted({int(r["seed"]) for r in rows})
    if cfg is None or cfg.sequential:
        return found
    return list(dict.fromkeys([*cfg.seeds, *found]))


def fraction_answer(
    rows: list[dict],
    sums: dict,
    cfg: SweepConfig | None,
    fraction: float,
    n_boot: int = N_BOOT,
    design: dict | None = None,
    target: str = "",
) -> FractionAnswer:
    """The verdicts at ``fraction`` (or, with ``target``, on that named set, whose ``fraction`` it is) from
    ``rows``, their checked per-document ``sums`` (:attr:`knockout.runfolder.RunFolder.doc_sums`), the run's
    settings ``cfg`` and, for ``--seeds auto``, the sequential ``design`` it stored
    (:meth:`knockout.config.SweepConfig.design`). A named set is the object of study, not a random draw: its
    verdicts hold for it on one look at the sets the run has."""
    key_f = fraction_key(fraction)
    where = f"on {target}" if target else f"at {fraction:g}"
    at = [r for r in rows if r["method"] != "baseline" and r["target"] == target
          and (target or fraction_key(r["fraction"]) == key_f)]  # fmt: skip
    methods = list(dict.fromkeys(r["method"] for r in at))
    fa = FractionAnswer(fraction, [])
    if not methods:
        fa.notes.append(f"No rows {where}.")
        return fa
    order = _seed_order(cfg, rows)

    def sets_of(m: str) -> list[dict]:
        """Consecutive sets (in seed order) with per-document sums."""
        out = []
        for s in order:
            d = sums.get(row_key(m, fraction, s, target))
            if d is None:
                break
            out.append(d)
        return out

    stored = {m: sets_of(m) for m in methods}
    data = {m: [DocSums(**{f: d[f] for f in DOC_FIELDS}) for d in v] for m, v in stored.items()}
    without = [m for m in methods if not data[m]]
    if without:
        fa.notes.append(
            f"Rows of {', '.join(without)} {where} have no usable per-document sums (missing, or not adding up to "
            "their rows); left out."
        )
    bounds = [m for m in methods if is_bound(m) and data[m]]
    contenders = [m for m in methods if not is_bound(m) and data[m]]
    fa.methods = contenders
    if len(contenders) < 2:
        fa.notes.append(f"Fewer than two methods to compare {where}.")
        return fa
    decide = cfg.decide if cfg is not None else DecideOptions()
    sequential = cfg is not None and cfg.sequential and any(fraction_key(f) == key_f for f in decide.fractions)
    sequential = sequential and not target
    n_families = families(decide.fractions) if cfg is not None and cfg.sequential else families((fraction,))
    if sequential:
        plan = Plan.from_dict(design) if design is not None else decide.plan(n_families)
    else:
        common = min(len(data[m]) for m in contenders)
        # a --seeds auto run gives the first look's sets to every fraction, more only at its decision fractions
        expected = decide.first if cfg is not None and cfg.sequential else len(order)
        if common < max(len(data[m]) for m in contenders) or common < expected:
            short = [m for m in contenders if len(data[m]) == common]
            lacking = order[common] if common < len(order) else None
            fa.notes.append(
                f"{where.capitalize()} the comparison uses the {common} sets every method has: seed {lacking} lacks "
                f"the per-document sums of {', '.join(short)} (missing from paired/, or not adding up to their rows "
                "in results.jsonl; re-run the same sweep command to recompute them)."
            )
        plan = Plan((common,), decide.family_alpha(n_families))
    tests = {}
    try:
        for metric in ("ce", "top1"):
            tests[metric] = test = SequentialTest(plan, contenders, metric, n_boot=n_boot)
            test.replay(data)
            if test.looks_done == 0:
                raise KnockoutError(f"not enough sets for the first look ({plan.looks[0]})")
        if target and all("ld_sum" in d for v in stored.values() for d in v[: plan.looks[0]]):
            negated = {m: [_negated_ld(d) for d in stored[m]] for m in contenders}
            test = SequentialTest(plan, contenders, "ce", n_boot=n_boot)
            test.replay(negated)
            fa.ld = [_as_ld(test.verdicts[p]) for p in sorted(test.verdicts, key=_pair_order(contenders))]
    except KnockoutError as e:
        fa.notes.append(f"No paired comparison {where}: {e}")
        return fa
    ce = tests["ce"]
    fa.ce = [ce.verdicts[p] for p in sorted(ce.verdicts, key=_pair_order(contenders))]
    fa.top1 = [tests["top1"].verdicts[p] for p in sorted(tests["top1"].verdicts, key=_pair_order(contenders))]
    fa.n_sets = plan.looks[ce.looks_done - 1]
    fa.n_docs = ce.docs_used[-1]
    fa.max_docs = plan.max_docs
    if target:
        fa.stop, fa.design = "fixed", f"one look at {fa.n_sets} sets, Holm over the pairs at alpha {plan.alpha:g}"
        return fa
    if not sequential and fa.n_sets < decide.first:
        # the spread between neuron sets is unknown: a statement about this set, none about neuron sets in general
        fa.ce, fa.top1 = [replace(v, decided=False) for v in fa.ce], [replace(v, decided=False) for v in fa.top1]
        fa.stop = "few sets"
        fa.design = f"{fa.n_sets} fixed set(s), fewer than the {decide.first} a decision needs: nothing is decided"
    elif not sequential:
        fa.stop, fa.design = "fixed", f"one look at {fa.n_sets} fixed sets, Holm over the pairs at alpha {plan.alpha:g}"
    else:
        fa.stop = (
            "decided" if ce.done else "futile" if ce.futile() else "maximum" if ce.looks_done == len(plan.looks)
            else "incomplete"
        )  # fmt: skip
        made = ", ".join(map(str, plan.looks[: ce.looks_done]))
        fa.design = (
            f"sequential: looks at {made} of the planned {', '.join(map(str, plan.looks))} sets, alpha {plan.alpha:g} "
            "split over them by the union bound (shaped like Hwang-Shih-DeCani, gamma -2), Holm over the pairs at "
            "each look"
        ) + (f", documents {'/'.join(map(str, ce.docs_used))} of the planned {'/'.join(map(str, plan.docs))}"
             if plan.docs else "")  # fmt: skip
    level = ce.final_level(len(ce.undecided))
    for v in fa.ce:
        if not v.decided and v.components is not None:
            fa.needs[(v.a, v.b)] = needed(v.components, v.estimate, level)
    if bounds:
        fa.bound = bounds[0]
        b = data[fa.bound]
        for m in contenders:
            n = min(len(b), len(data[m]))
            mine, bound = common_docs(data[m][:n], b[:n])
            try:
                fa.excess[m] = paired_difference(mine, bound, "ce", LEVEL, n_boot)
            except KnockoutError as e:
                fa.notes.append(f"No excess over {fa.bound} for {m}: {e}")
            for s in range(n):
                if (up := bound[s].metric("ce")) > (ce_m := mine[s].metric("ce")):
                    fa.flags.append(
                        f"{fa.bound} is above {m} on evaluation for set {order[s]} at {fraction:g} "
                        f"(CE {up:.4f} vs {ce_m:.4f}): its learned constants did not generalise from the collection "
                        "split, so the bound is not a bound there"
                    )
    fa.notes += peak_noise_notes(data, fraction)
    return fa


def _negated_ld(sums: dict) -> DocSums:
    """A row's per-document logit differences as :class:`DocSums` whose "CE" is ``-logit_diff``: the paired
    comparison of ratios of sums is the same estimator for any per-document sum, and its "lower is better" then
    ranks the highest logit difference first."""
    return DocSums(n=sums["n"], ce_sum=-sums["ld_sum"], correct=np.zeros_like(sums["n"]))


def _as_ld(v: PairVerdict) -> PairVerdict:
    """A verdict computed on the negated logit differences, stated for the logit difference itself."""
    return replace(v, metric="ld", estimate=-v.estimate, low=-v.high, high=-v.low, low95=-v.high95, high95=-v.low95)


def _pair_order(methods: list[str]):
    index = {m: i for i, m in enumerate(methods)}
    return lambda pair: (index[pair[0]], index[pair[1]])


# -- wording ----------------------------------------------------------------------------------------------------------
def _pct(f: float) -> str:
    return f"{100 * f:g}%"


def _scale(metric: str) -> float:
    return 100.0 if metric == "top1" else 1.0


def _amount(v: PairVerdict, winner: str) -> str:
    """How much better ``winner`` (one of the pair) is, with the interval: ``0.250 nats [+0.100, +0.400]`` (CE: lower
    by; top-1: higher by, in points)."""
    s = -1.0 if (winner == v.a) == (v.metric == "ce") else 1.0
    s *= _scale(v.metric)
    lo, hi = sorted([s * v.low, s * v.high])
    unit = METRIC_WORDS[v.metric][1]
    digits = 2 if v.metric == "top1" else 3
    return f"{s * v.estimate:.{digits}f}{' ' + unit if unit else ''} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def sentence(fa: FractionAnswer, metric: str = "ce", head: str | None = None) -> str:
    """One plain sentence answering the question at ``fa.fraction`` (or for what ``head`` names) for ``metric``."""
    head = head or f"At {_pct(fa.fraction)}"
    verdicts = fa.verdicts(metric)
    if not verdicts:
        return f"{head}: no paired comparison."
    what, _, than = METRIC_WORDS[metric]
    sets = f"{fa.n_sets} set{'s' if fa.n_sets != 1 else ''} x {fa.n_docs} documents"
    if fa.stop == "few sets":
        leader = fa.leader(metric)
        mine = [v for v in verdicts if leader in (v.a, v.b)]
        parts = [f"{_amount(v, leader)} {than} {v.b if v.a == leader else v.a}" for v in mine]
        text = (
            f"{head}, for {'this neuron set' if fa.n_sets == 1 else 'these neuron sets'} ({sets}), {leader} "
            f"{what}: {'; '.join(parts)}. Nothing is decided about neuron sets in general (with fewer than 3 sets "
            "their spread is unknown): run more seeds, or --seeds auto"
        )
    else:
        best = fa.best(metric)
        if best is not None:
            wins = sorted((v for v in verdicts if best in (v.a, v.b)), key=lambda v: abs(v.estimate))
            parts = [f"{_amount(v, best)} {than} {v.worse}" for v in wins]
            text = f"{head}, **{best}** {what}: {'; '.join(parts)}; decided with {sets}"
        else:
            leader = fa.leader(metric)
            open_pairs = [v for v in verdicts if not v.decided]
            shown = [v for v in open_pairs if leader in (v.a, v.b)] or open_pairs
            parts = [f"{_amount(v, leader)} ahead of {v.b if v.a == leader else v.a}" for v in shown]
            text = (
                f"{head}, no method is decided best ({sets}{_stopped(fa)}): {leader} is {' and '.join(parts)}, "
                "undecided"
            )
            if metric == "ce":
                text += _need_text(fa, shown)
            decided = [v for v in verdicts if v.decided]
            if decided:
                text += "; decided: " + ", ".join(f"{v.better} over {v.worse}" for v in decided)
    if metric == "ce" and fa.excess:
        ex = "; ".join(f"{m} {d.estimate:+.3f} [{d.low:+.3f}, {d.high:+.3f}]" for m, d in fa.excess.items())
        text += f". Above {fa.bound} (nats, 95%): {ex}"
    return text + "."


def _stopped(fa: FractionAnswer) -> str:
    return {
        "maximum": ", the maximum",
        "futile": "; stopped: the maximum could not decide it",
        "incomplete": "; the run stopped before its next look",
    }.get(fa.stop, "")


def _need_text(fa: FractionAnswer, shown: list[PairVerdict]) -> str:
    out = []
    for v in shown:
        if v.too_few_docs:
            out.append(
                f"{v.a} against {v.b}: too few documents to decide; needs about {v.docs_needed}"
                + _docs_hint(fa, v.docs_needed)
            )
            continue
        need = fa.needs.get((v.a, v.b))
        if need is None:
            continue
        pair = f"{v.a} against {v.b}"
        if need.sets is not None:
            text = f"deciding {pair} would take about {need.sets} sets at these documents"
        else:
            text = f"more sets alone cannot decide {pair} at these documents"
        if need.cheapest_sets is not None and need.cheapest_docs_factor and need.cheapest_docs_factor > 1:
            text += f" (about {need.cheapest_sets} sets with {need.cheapest_docs_factor:g}x the documents would)"
        if need.more_sets_help_most:
            text += "; from here more sets narrow it fastest"
        else:
            factor = need.cheapest_docs_factor
            wanted = round(factor * fa.n_docs) if factor and factor > 1 else None
            text += "; from here more evaluation documents narrow it fastest" + _docs_hint(fa, wanted)
        out.append(text)
    return "; " + "; ".join(out) if out else ""


def _docs_hint(fa: FractionAnswer, wanted: int | None) -> str:
    """Where the documents limit the interval: how the run could have added them (``--decide-max-docs``, ``wanted``
    documents when an estimate is known), or that its design already went to the most it allowed."""
    if fa.max_docs is None:
        return f" (--decide-max-docs {wanted or 'N'} adds them in the same run, with --seeds auto and --eval-docs)"
    if fa.n_docs >= fa.max_docs:
        return f" (more than this run's --decide-max-docs {fa.max_docs})"
    return ""


def sentences(fa: FractionAnswer) -> list[str]:
    """The answer at one fraction: the CE sentence, the top-1 sentence, flags and notes."""
    out = [sentence(fa, "ce")]
    if fa.top1:
        out.append(sentence(fa, "top1").replace(f"At {_pct(fa.fraction)}", "By top-1", 1))
    return out + fa.flags + fa.notes


def add(doc, answer: Answer, heading: str = "The answer") -> None:
    """The answer section of a report page (:class:`knockout.reporting.doc.Doc`)."""
    if heading:
        doc.heading(heading)
    if not answer.available:
        notes = [n for f in answer.fractions for n in f.notes]
        doc.text("No paired comparison is possible: " + (" ".join(notes) or "no per-document sums."))
        return
    doc.items([" ".join(sentences(fa)) for fa in answer.fractions])
    designs = dict.fromkeys(fa.design for fa in answer.fractions if fa.design)
    doc.text(f"Differences are paired (same neuron sets and documents); {'; '.join(designs)}. Each interval is the "
             f"one that decided its pair (or the last tested); docs/decisions.md explains the design. "
             f"{answer.families}", note=True)  # fmt: skip


# -- as data --------------------------------------------------------------------------------------------------------
PAIRED_COLUMNS = [
    "fraction", "metric", "kind", "a", "b", "estimate", "low", "high", "level", "decided", "better", "n_sets",
    "n_docs", "look", "low95", "high95", "design",
]  # fmt: skip


def paired_records(answer: Answer) -> list[dict]:
    """One record per pair, metric and fraction (``kind="pair"``), and per excess over the bound (``"excess"``)."""
    out = []
    for fa in answer.fractions:
        for v in [*fa.ce, *fa.top1]:
            out.append(
                {
                    "fraction": fa.fraction, "metric": v.metric, "kind": "pair", "a": v.a, "b": v.b,
                    "estimate": v.estimate, "low": v.low, "high": v.high, "level": v.level, "decided": v.decided,
                    "better": v.better or "", "n_sets": v.n_sets, "n_docs": v.n_docs, "look": v.look + 1,
                    "low95": v.low95, "high95": v.high95, "design": fa.design,
                }
            )  # fmt: skip
        for m, d in fa.excess.items():
            out.append(
                {
                    "fraction": fa.fraction, "metric": "ce", "kind": "excess", "a": m, "b": fa.bound,
                    "estimate": d.estimate, "low": d.low, "high": d.high, "level": d.level, "decided": d.significant,
                    "better": (fa.bound if d.estimate > 0 else m) if d.significant else "", "n_sets": d.n_seeds,
                    "n_docs": d.n_docs, "look": "", "low95": d.low, "high95": d.high, "design": d.method,
                }
            )  # fmt: skip
    return out


def paired_csv(answer: Answer) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=PAIRED_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(paired_records(answer))
    return buf.getvalue()


def to_json(answer: Answer) -> dict:
    """The answer as plain data (``answer.json``)."""

    def num(x):
        return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x

    fractions = []
    for fa in answer.fractions:
        fractions.append(
            {
                "fraction": fa.fraction,
                "methods": fa.methods,
                "best": {m: fa.best(m) for m in ("ce", "top1")},
                "leader": {m: fa.leader(m) for m in ("ce", "top1")},
                "sentence": {m: sentence(fa, m) for m in ("ce", "top1") if fa.verdicts(m)},
                "n_sets": fa.n_sets,
                "n_docs": fa.n_docs,
                "stop": fa.stop,
                "design": fa.design,
                "bound": fa.bound,
                "needs": [
                    {
                        "a": a,
                        "b": b,
                        "sets": n.sets,
                        "cheapest_sets": n.cheapest_sets,
                        "cheapest_docs_factor": n.cheapest_docs_factor,
                        "more_sets_help_most": n.more_sets_help_most,
                    }
                    for (a, b), n in fa.needs.items()
                ],  # fmt: skip
                "flags": fa.flags,
                "notes": fa.notes,
            }
        )
    pairs = [{k: num(v) for k, v in r.items()} for r in paired_records(answer)]
    return {"alpha": answer.alpha, "families": answer.families, "fractions": fractions, "pairs": pairs}


def write_files(answer: Answer, out: Path, write) -> list[Path]:
    """Write ``answer.json`` and ``paired.csv`` into ``out`` with ``write(path, text)``; returns their paths."""
    paths = [out / "answer.json", out / "paired.csv"]
    write(paths[0], json.dumps(to_json(answer), indent=2) + "\n")
    write(paths[1], paired_csv(answer))
    return paths


def verdict_rows(answer: Answer) -> list[dict]:
    """One record per fraction and metric for the table beside Table 2: best (or undecided), sets, stop."""
    out = []
    for fa in answer.fractions:
        for metric in ("ce", "top1"):
            if not fa.verdicts(metric):
                continue
            best = fa.best(metric)
            open_pairs = [f"{v.a}-{v.b}" for v in fa.verdicts(metric) if not v.decided]
            out.append(
                {
                    "fraction": f"{fa.fraction:g}",
                    "metric": "CE" if metric == "ce" else "top-1",
                    "best": best or f"undecided (leader {fa.leader(metric)})",
                    "undecided pairs": ", ".join(open_pairs) or "none",
                    "sets x documents": f"{fa.n_sets} x {fa.n_docs}",
                    "stop": fa.stop,
                }
            )
    return out


VERDICT_COLUMNS = ["fraction", "metric", "best", "undecided pairs", "sets x documents", "stop"]


def forest_panels(answer: Answer, label: str = "") -> list[tuple[str, list]]:
    """The answer's CE differences per fraction as :func:`knockout.reporting.figures.forest_figure` panels: every
    pair (``A - B``: negative means A hurts less), then every excess over the bound."""
    panels = []
    for fa in answer.fractions:
        if not fa.ce:
            continue
        entries = [(f"{v.a} - {v.b}", v.estimate, v.low, v.high, v.decided, "pair") for v in fa.ce]
        entries += [
            (f"{m} - {fa.bound}", d.estimate, d.low, d.high, d.significant, "excess") for m, d in fa.excess.items()
        ]
        title = f"{label + ': ' if label else ''}{_pct(fa.fraction)} ablated ({fa.n_sets} sets x {fa.n_docs} docs)"
        panels.append((title, entries))
    return panels


# -- the bound's training record --------------------------------------------------------------------------------------
BOUND_COLUMNS = ["fraction", "seed", "kept", "train CE", "held-out learned", "held-out mean", "held-out peak",
                 "held-out zero", "evaluation CE"]  # fmt: skip


def bound_records(folder: RunFolder | str | Path, rows: list[dict]) -> list[dict]:
    """Per neuron set ``optimal`` learned (``artifacts/optimal/``, each file checked): the fraction and seed (matched
    to its row by the number of neurons ablated), which candidate was kept, the training CE (mean over the steps'
    batches) and each candidate's CE on the held-out part of the collection split ("worse (stopped)" where scoring
    stopped because it could not win), beside the row's evaluation CE."""
    by_set = {(int(r["seed"]), int(r["n_ablated"])): r for r in rows if r["method"] == "optimal" and not r["target"]}
    out = []
    for meta in RunFolder.open(folder).artifact_metadata("optimal"):
        try:
            row = by_set.get((int(meta["seed"]), int(meta["n_ablated"])))
        except (KeyError, ValueError):  # not a record of a learned set
            continue
        if row is None:
            continue

        def ce(key: str, meta: dict = meta) -> str:
            value = float(meta.get(key, "nan"))
            return "worse (stopped)" if math.isinf(value) else f"{value:.4f}"

        out.append(
            {
                "fraction": row["fraction"], "seed": row["seed"], "kept": meta.get("chosen", "?"),
                "train CE": ce("train_ce"), "held-out learned": ce("held_out_ce_learned"),
                "held-out mean": ce("held_out_ce_mean"), "held-out peak": ce("held_out_ce_peak"),
                "held-out zero": ce("held_out_ce_zero"), "evaluation CE": f"{row['ce']:.4f}",
            }
        )  # fmt: skip
    return sorted(out, key=lambda r: (r["fraction"], r["seed"]))


# -- several runs side by side --------------------------------------------------------------------------------------
def _verdict_text(fa: FractionAnswer, metric: str = "ce") -> str:
    """``mean (decided; 0.250 nats [+0.10, +0.40] less than peak)`` or ``undecided (leader mean, ...)``."""
    verdicts = fa.verdicts(metric)
    if not verdicts:
        return "no comparison"
    best = fa.best(metric)
    who = best or fa.leader(metric)
    near = min((v for v in verdicts if who in (v.a, v.b)), key=lambda v: abs(v.estimate), default=None)
    _, _, than = METRIC_WORDS[metric]
    detail = "" if near is None else f"{_amount(near, who)} {than} {near.b if near.a == who else near.a}"
    return f"{who} (decided; {detail})" if best else f"undecided (leader {who}: {detail})"


def agreement(answers: list[FractionAnswer], metric: str = "ce") -> str:
    """Whether several runs' answers at one fraction agree: on the best method when every run decided one, else on
    the leader."""
    if not any(fa.verdicts(metric) for fa in answers):
        return "no comparison on any model"
    best = [fa.best(metric) for fa in answers]
    if all(b is not None for b in best):
        return f"agree: {best[0]}" if len(set(best)) == 1 else "disagree: " + " vs ".join(dict.fromkeys(best))
    leaders = [fa.leader(metric) for fa in answers]
    same = len(set(leaders)) == 1
    return ("same leader, " if same else "different leaders, ") + "not decided on every model"


def side_by_side(names: list[str], answers: list[Answer]) -> list[dict]:
    """One record per fraction: each run's verdict (CE) and whether the runs agree."""
    out = []
    fractions = list(dict.fromkeys(fa.fraction for a in answers for fa in a.fractions))
    for f in fractions:
        at = [next((fa for fa in a.fractions if fa.fraction == f), FractionAnswer(f, [])) for a in answers]
        rec = {"fraction": f"{f:g}"}
        rec.update({n: _verdict_text(fa) for n, fa in zip(names, at)})
        rec["sets x documents"] = "; ".join(f"{n}: {fa.n_sets} x {fa.n_docs}" for n, fa in zip(names, at))
        rec["models agree?"] = agreement(at)
        out.append(rec)
    return out


def pair_records(names: list[str], answers: list[Answer]) -> list[dict]:
    """One record per fraction and pair (CE): each run's difference with the interval that decided it (or the last
    tested), ``*`` when decided."""
    out = []
    for f in dict.fromkeys(fa.fraction for a in answers for fa in a.fractions):
        at = {n: next((fa for fa in a.fractions if fa.fraction == f), None) for n, a in zip(names, answers)}
        pairs = list(dict.fromkeys((v.a, v.b) for fa in at.values() if fa for v in fa.ce))
        for a, b in pairs:
            rec = {"fraction": f"{f:g}", "pair": f"{a} - {b}"}
            for n, fa in at.items():
                v = next((v for v in (fa.ce if fa else []) if (v.a, v.b) == (a, b)), None)
                rec[n] = (
                    "" if v is None else f"{v.estimate:+.3f} [{v.low:+.3f}, {v.high:+.3f}]{' *' if v.decided else ''}"
                )
            out.append(rec)
    return out


def compare_panels(names: list[str], answers: list[Answer], colors: list[str]) -> list[tuple[str, list]]:
    """Forest-plot panels, one per fraction: every pair's CE difference for every run, one colour per run."""
    panels = []
    for f in dict.fromkeys(fa.fraction for a in answers for fa in a.fractions):
        entries = []
        for n, a, color in zip(names, answers, colors):
            fa = next((fa for fa in a.fractions if fa.fraction == f), None)
            for v in fa.ce if fa else []:
                entries.append((f"{v.a} - {v.b} ({n})", v.estimate, v.low, v.high, v.decided, color))
        if entries:
            panels.append((f"{_pct(f)} ablated", entries))
    return panels
