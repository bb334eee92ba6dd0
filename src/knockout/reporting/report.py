"""The report of a run folder, rebuilt from its stored files alone (config.json, results.jsonl, stats.safetensors).

``write_report(run_dir)`` writes into ``run_dir/report/`` (see docs/reports.md)::

    report.html              self-contained: the answer, table, figures (base64 PNG), identity, config, timings, rows
    answer.json, paired.csv  the answer as data: every pair's verdict and interval, excess over the bound
    answer.png/.svg          forest plot of the paired CE differences per fraction
    report.md                README-friendly summary referencing the PNGs
    table2.md/.csv/.tex      the paper's Table 2 for this run (see knockout.reporting.table for the marking rule)
    summary.csv              mean ± std over seeds of every (method, fraction)
    curves.png/.svg          Figures 2/3: Δtop-1 and ΔCE against the fraction ablated
    hist_layers.png/.svg     Figure 1 (left): layer-averaged activation histograms      (needs stats.safetensors)
    atypical.png/.svg        Figure 1 (centre/right): the most atypical neurons           (needs stats.safetensors)
    atypical_neurons.csv     the top neurons by atypicality (see knockout.reporting.neurons)
    point_masses.csv         per layer, the neurons whose peak is a point mass                (needs stats.safetensors)
    eps.md/.csv              CE and top-1 against the peak's bin width       (runs with peak@EPS methods, see .eps)
    targets.csv              mean ± std over seeds per named component set                  (--ablate runs)
    faithfulness.csv/.json   per method and kept set or size: faithfulness and interval; the curves (--keep runs)
    faithfulness.png/.svg    the faithfulness curves of every method side by side                (--keep-top)

``compare_runs(run_dirs, out_dir)`` writes several runs side by side: the answer per model, their agreement, every
pair's difference per run (compare.json), a forest plot, Table 2 and the curves.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from knockout.ablation.selection import validate_fractions
from knockout.errors import KnockoutError
from knockout.fingerprint import describe
from knockout.reporting import answer as A
from knockout.reporting import centres as CR
from knockout.reporting import circuits as C
from knockout.reporting import targets as T
from knockout.reporting.doc import Doc
from knockout.reporting.eps import eps_columns, eps_rows
from knockout.reporting.figures import (
    curves_figure,
    forest_figure,
    gallery_figure,
    layers_figure,
    method_colors,
    png_bytes,
    save_figure,
)
from knockout.reporting.neurons import StatsFile, default_layers, point_mass_counts, rank_atypical
from knockout.reporting.summary import METRICS, OPTIONAL_METRICS, summarize
from knockout.reporting.table import MARK_NOTES, build_table, paper_model, records_csv
from knockout.runfolder import REPORT_DIR, RESULTS_FILE, ROW_FIELDS, RunFolder, fraction_key, inside, write_atomic

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.5, 0.9)
N_ATYPICAL_CSV = 50
ATYPICAL_COLUMNS = ["rank", "layer", "neuron", "score", "offset", "second", "modes", "mean", "peak", "std"]
ATYPICAL_COLUMNS += ["point_mass", "peak_nopm", "mode", "peak_off_mode"]


def point_mass_note(counts: list[int], widths: list[int], off_mode: int | None = None) -> str:
    """Total and per-layer (non-zero layers) count of point-mass peaks; and, if given, how many other neurons have
    their peak more than half a std from the KDE mode."""
    total, n = sum(counts), sum(widths)
    layers = ", ".join(f"L{i}: {c}" for i, c in enumerate(counts) if c) or "none"
    text = (
        f"Point-mass peaks: {total} of {n} neurons ({100 * total / max(n, 1):.2f}%) have a modal bin that is a point "
        "mass (an isolated spike, or a spike on the bulk confined to one bin; see docs/design.md); "
        f"per layer: {layers}."
    )
    if off_mode is not None:
        text += (
            f" Peaks far from the KDE mode: {off_mode} other neurons ({100 * off_mode / max(n, 1):.2f}%) have their "
            "peak more than half a std from the bin-free mode (spikes the test misses, or narrow modes)."
        )
    return text


def _summary_csv(summary: list[dict]) -> str:
    cols = ["method", "fraction", "target", "n_seeds", "n_ablated"]
    cols += [f"{m}_{s}" for m in METRICS + OPTIONAL_METRICS for s in ("mean", "std")]
    return records_csv(summary, cols)


def _widths(widths) -> str:
    if not widths:
        return "?"
    return f"{len(widths)} x {widths[0]}" if len(set(widths)) == 1 else ", ".join(map(str, widths))


def identity(run: RunFolder) -> dict:
    """Model, data and environment of a run, flattened for display."""
    cfg, res = run.config, run.resolved
    mid = res.identity
    out = {
        "run folder": str(run.dir),
        "model": run.model,
        "model type": mid.get("model_type", "?"),
        "site": res.site_kind,
        "model fingerprint": describe(mid.get("fingerprint")),
        "layers x neurons": _widths(mid.get("widths")),
        "heads": mid.get("n_heads", "?"),
        "task": res.task or (cfg.task if cfg else "?"),
        "data": cfg.data if cfg else "?",
        "eval tokens": _eval_text(run),
        "stats tokens": cfg.stats_tokens if cfg else "?",
        "max length": cfg.max_length if cfg else "?",
        "selection": cfg.selection if cfg else "?",
        "methods": ", ".join(cfg.methods) if cfg else "?",
        "fractions": ", ".join(f"{f:g}" for f in cfg.fractions) if cfg else "?",
        "seeds": _seeds_text(run),
        "device": res.device or (cfg.device if cfg else "?"),
        "dtype": res.dtype or (cfg.dtype if cfg else "?"),
    }
    out.update({f"{k} version": v for k, v in (res.environment or {}).items()})
    return out


def _eval_text(run: RunFolder) -> str:
    """What the rows were evaluated on: the scored targets per row, and the documents with ``eval_docs`` (and the
    most documents on demand added at the decision fractions)."""
    n_eval = sorted({r.n_eval for r in run.rows})
    targets = f"{n_eval[0]:,} scored targets" if len(n_eval) == 1 else None
    if run.config is not None and run.config.eval_docs:
        most = max((len(s["n"]) for s in run.stored_sums.values()), default=0)
        grown = f", up to {most} at the decision fractions" if most > run.config.eval_docs else ""
        return f"{run.config.eval_docs} documents" + (f" ({targets})" if targets else "") + grown
    return targets or (str(run.config.eval_tokens) if run.config is not None else "?")


def _seeds_text(run: RunFolder) -> str:
    if run.sequential:
        extra = sorted(set(run.seeds) - set(run.fixed_seeds))
        return f"auto: {len(run.fixed_seeds)} for every fraction" + (
            f", up to {len(run.seeds)} at the decision fractions" if extra else ""
        )
    return ", ".join(map(str, run.fixed_seeds)) or "?"


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _n_heads(run: RunFolder) -> int | None:
    n = run.resolved.identity.get("n_heads")
    return int(n) if isinstance(n, int) and run.resolved.site_kind == "attention" else None


def write_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    fractions: tuple[float, ...] | None = None,
    layers: list[int] | None = None,
    top_k: int = 8,
    answer: A.Answer | None = None,
) -> Path:
    """Write the report of ``run_dir`` into ``out_dir`` (default ``run_dir/report``); returns report.html's path.

    ``fractions`` are the table's columns blocks and where the answer is given (default: the run's decision
    fractions); ``layers`` the layers of the histogram figure (default four spread over depth); ``top_k`` the number
    of atypical neurons drawn; ``answer``: the run's answer at ``fractions`` when the caller has computed it
    (:func:`knockout.reporting.load_run`). Reads files only; never loads a model.
    """
    from knockout.reporting.scan import write_scan_report

    folder = RunFolder.open(run_dir)  # read once, by whichever report it is
    if folder.is_scan:  # a scan's report compares the methods' rankings of its units
        return write_scan_report(folder, out_dir)
    run = RunFolder.with_results(folder)
    fractions = validate_fractions(fractions if fractions is not None else run.fractions)
    if not isinstance(top_k, int) or top_k < 1:
        raise KnockoutError(f"top_k (--top-k) must be a positive integer, got {top_k!r}")
    out = Path(out_dir) if out_dir is not None else inside(run.dir, run.dir / REPORT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    label = run.label
    methods = run.methods
    notes: list[str] = []
    partial = run.partial_note()
    if not run.rows:
        partial = "This run has no results yet."

    # -- table -------------------------------------------------------------------------------------------------
    all_summary = summarize(run.table_rows())
    summary = [e for e in all_summary if not e.get("target")]  # named sets are answered per set (T)
    targeted = T.target_answers(run) if T.has_targets(run.row_dicts()) else None
    pm = paper_model(run.model)
    n_seeds = {label: len(run.fixed_seeds)} if run.fixed_seeds else None
    in_table = [] if targeted else methods  # a run of named sets has no fraction rows: its table is per set
    table = build_table([(label, summary)], fractions, in_table, n_seeds, {label: pm} if pm else None)
    have = {fraction_key(e["fraction"]) for e in summary if e["method"] != "baseline"}
    absent = [f for f in fractions if fraction_key(f) not in have]
    if absent and not targeted:
        notes.append(f"Fractions {', '.join(f'{f:g}' for f in absent)} are not in this run's results.")
    write_atomic(out / "table2.md", table.to_markdown())
    write_atomic(out / "table2.csv", table.to_csv())
    write_atomic(out / "table2.tex", table.to_latex())
    write_atomic(out / "summary.csv", _summary_csv(all_summary))
    if answer is None or [f.fraction for f in answer.fractions] != list(fractions):
        answer = A.run_answer(run, fractions)
    A.write_files(answer, out, write_atomic)
    if targeted:
        write_atomic(out / "targets.csv", T.table_csv(all_summary))
    circuits = C.circuit_report(run) if C.has_kept(run) else None
    circuit_images = C.write_files(circuits, out, write_atomic) if circuits is not None else {}
    eps_table = eps_rows(summary, methods, fractions, run.config.eps if run.config else None)
    if eps_table:
        write_atomic(out / "eps.csv", records_csv(eps_table, eps_columns(fractions)))
        write_atomic(out / "eps.md", "\n".join(Doc().table(eps_table, eps_columns(fractions)).md))

    # -- figures -----------------------------------------------------------------------------------------------
    images: dict[str, bytes] = {}
    panels = [] if targeted else A.forest_panels(answer)
    if panels:
        fig = forest_figure(panels)
        save_figure(fig, out / "answer")
        images["answer"] = png_bytes(fig)
    fig = curves_figure([(label, summary)], methods)
    save_figure(fig, out / "curves")
    images["curves"] = png_bytes(fig)

    atypical = []
    stats_note = pm_note = centre_section = None
    if run.stats_path is None:
        stats_note = "No stats.safetensors in the run folder (no method needed statistics): no histograms."
    else:
        stats = StatsFile(run.stats_path)
        chosen = layers if layers is not None else default_layers(len(stats))
        site = run.resolved.site_kind
        fig = layers_figure([stats.layer(i) for i in chosen], site)
        save_figure(fig, out / "hist_layers")
        images["hist_layers"] = png_bytes(fig)
        scores, hists = rank_atypical(stats, top_k)
        atypical = scores[:N_ATYPICAL_CSV]
        fig = gallery_figure([(s, hists[(s.layer, s.neuron)]) for s in scores[:top_k]], _n_heads(run), site)
        save_figure(fig, out / "atypical")
        images["atypical"] = png_bytes(fig)
        recs = [{"rank": i + 1, **s.as_dict()} for i, s in enumerate(atypical)]
        write_atomic(out / "atypical_neurons.csv", records_csv(recs, ATYPICAL_COLUMNS))
        counts = point_mass_counts(scores, len(stats))
        pm_recs = [{"layer": i, "neurons": w, "point_masses": c} for i, (w, c) in enumerate(zip(stats.widths, counts))]
        write_atomic(out / "point_masses.csv", records_csv(pm_recs, ["layer", "neurons", "point_masses"]))
        pm_note = point_mass_note(counts, stats.widths, sum(s.peak_off_mode for s in scores))
        centre_section = CR.read_section(run.stats_path)
        notes += CR.section_notes(centre_section, methods)  # the noise notes, from the section read above
        stats_note = (
            f"Statistics: {len(stats)} layers, {stats.meta.get('data', '?')} data, eps {stats.eps:g}; "
            f"histogram layers {', '.join(map(str, chosen))}."
        )

    doc = Doc()
    if partial:
        doc.warn(partial)
    if circuits is not None:
        C.add(doc, circuits, circuit_images)
    if targeted:
        T.add(doc, targeted, all_summary)
    else:
        A.add(doc, answer)
    doc.figure(images.get("answer"), "answer.png", "paired differences in cross-entropy with their intervals")
    for n in notes:
        doc.text(n, note=True)
    doc.heading("Model and data").facts(identity(run))
    doc.heading("Table 2: top-1 and cross-entropy at chosen fractions")
    paper = f" Columns marked [paper] are the paper's numbers for {pm}." if pm else ""
    doc.text(f"Mean ± sample std over seeds. {MARK_NOTES['paper']}{paper}", note=True)
    doc.block(table.to_html(), [table.to_markdown()])
    if answer.available:
        doc.heading("Verdicts per fraction", 3).table(A.verdict_rows(answer), A.VERDICT_COLUMNS)
    bound = A.bound_records(run, run.row_dicts())
    if bound:
        doc.heading("optimal per neuron set", 3)
        doc.text("The constants are trained on rows of the collection split and chosen on its held-out rows (every "
                 "fourth; learned, or zero, mean or peak if better there); the evaluation split is never used.",
                 note=True).table(bound, A.BOUND_COLUMNS)  # fmt: skip
    if eps_table:
        doc.heading("Peak against bin width")
        doc.text(
            "Cross-entropy and top-1 (%) of each peak method, mean ± std over seeds, at the table's fractions, "
            "by bin width (absolute; relative to each neuron's spread; Freedman–Diaconis per neuron).",
            note=True,
        )
        doc.table(eps_table, eps_columns(fractions))
    doc.heading("Figures 2/3: change against fraction ablated")
    doc.text("Mean over seeds, band ±1 std; change from the unablated baseline of each seed.", note=True)
    doc.figure(images["curves"], "curves.png", "change in top-1 and cross-entropy against the fraction ablated")
    doc.heading("Figure 1: activation distributions").text(stats_note, note=True).text(pm_note or "")
    if "hist_layers" in images:
        doc.heading("Layer-averaged histograms", 3)
        doc.figure(images["hist_layers"], "hist_layers.png", "layer-averaged histograms")
        doc.heading("Most atypical neurons", 3)
        doc.text("score = |peak − mean| / std + prominence of the second mode of the smoothed histogram (see "
                 "docs/reports.md), with the peak without point masses. Dashed: mean; solid: peak; dotted: zero. A "
                 "neuron whose peak is a point mass says so; its spike is dotted red, its bulk's peak orange. "
                 "Dash-dotted green: the bin-free KDE mode.", note=True)  # fmt: skip
        doc.figure(images["atypical"], "atypical.png", "most atypical neurons")
        f3 = lambda x: f"{x:.4g}"  # noqa: E731
        recs = [{"rank": i + 1, **s.as_dict()} for i, s in enumerate(atypical[:20])]
        doc.table(recs, ATYPICAL_COLUMNS, dict.fromkeys(("score", "offset", "second", "mean", "peak", "std",
                                                         "peak_nopm", "mode"), f3))  # fmt: skip
    CR.add(doc, centre_section)
    timings = run.timings()
    doc.heading("Timings")
    doc.text(f"Total {_fmt_seconds(timings['total_seconds'])} over {timings['n_rows']} rows (evaluation time per row "
             "as stored in results; statistics collection and model loading not included).")  # fmt: skip
    f2 = lambda x: f"{x:.2f}"  # noqa: E731
    timing_rows = [{"method": m, **t} for m, t in timings["methods"].items()]
    doc.table(timing_rows, ["method", "rows", "seconds", "mean_seconds"], {"seconds": f2, "mean_seconds": f2})
    fr = {"top1": lambda x: f"{100 * x:.2f}", "delta_top1": lambda x: f"{100 * x:+.2f}"}
    fr.update({"ce": lambda x: f"{x:.4f}", "delta_ce": lambda x: f"{x:+.4f}", "seconds": f2})
    doc.table(run.row_dicts(), list(ROW_FIELDS), fr, folded=f"All {len(run.rows)} result rows (top-1 in %)")
    stored = {**run.config.to_dict(), "resolved": run.resolved.to_dict()} if run.config is not None else {}
    doc.heading("Configuration").code(
        json.dumps(stored, indent=2), "The settings and the record: config.json in the run folder."
    )
    page = doc.write(out, f"knockout report: {label}")
    log.debug("report written to %s", out)
    return page


def check_compare_out(out: Path, run_dirs: list[Path]) -> None:
    """Refuse a comparison's output folder inside one of the compared run folders, or inside any run folder (its
    ``report/`` folder, say): a comparison never writes into a run folder."""
    target = out.resolve()
    for run_dir in run_dirs:
        if target.is_relative_to(run_dir.resolve()):
            raise KnockoutError(
                f"--out {str(out)!r} lies inside the run folder {str(run_dir)!r}: a comparison never writes into a run "
                "folder (its report would be overwritten); give a folder outside it"
            )
    for folder in (target, *target.parents):
        if (folder / RESULTS_FILE).is_file():
            raise KnockoutError(
                f"--out {str(out)!r} lies inside the run folder {str(folder)!r}: a comparison never writes into a run "
                "folder; give a folder outside it"
            )


def compare_runs(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    labels: list[str] | None = None,
    answers: list[A.Answer] | None = None,
) -> Path:
    """Several runs side by side in ``out_dir``: the answer per run at ``fractions`` and whether they agree, every
    pair's difference per run (compare.json), a forest plot, Table 2 and the curves; returns compare.html's path.
    ``answers``: the runs' answers at ``fractions`` when the caller has them."""
    if len(run_dirs) < 1:
        raise KnockoutError("give at least one run folder to compare")
    fractions = validate_fractions(fractions)
    runs = [RunFolder.with_results(d) for d in run_dirs]
    if labels is not None and len(labels) != len(runs):
        raise KnockoutError(f"{len(labels)} labels for {len(runs)} runs")
    if labels is not None and len(set(labels)) < len(labels):
        raise KnockoutError(f"--labels must be distinct, got {labels}")
    check_compare_out(Path(out_dir), [r.dir for r in runs])
    real = [r.dir.resolve() for r in runs]
    twice = next((d for i, d in enumerate(real) if d in real[:i]), None)
    if twice is not None:
        raise KnockoutError(f"the run folder {str(twice)!r} is given twice (a run against itself); give each once")
    names = list(labels) if labels else [r.label for r in runs]
    if len(set(names)) < len(names):  # same model twice: tell them apart by folder
        names = [f"{n} ({r.dir.name})" for n, r in zip(names, runs)]
    if len(set(names)) < len(names):  # same folder name too: number them (columns are keyed by name)
        names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(m for r in runs for m in r.methods))
    pairs = [(n, summarize(r.table_rows())) for n, r in zip(names, runs)]
    n_seeds = {n: len(r.fixed_seeds) for n, r in zip(names, runs) if r.fixed_seeds}
    table = build_table(pairs, fractions, methods, n_seeds)
    write_atomic(out / "table2.md", table.to_markdown())
    write_atomic(out / "table2.csv", table.to_csv())
    write_atomic(out / "table2.tex", table.to_latex())
    fig = curves_figure(pairs, methods)
    save_figure(fig, out / "curves")
    png = png_bytes(fig)

    doc = Doc()
    for n, r in zip(names, runs):
        if (partial := r.partial_note()) is not None:
            doc.warn(f"{n}: {partial}")
    if answers is None or any([f.fraction for f in a.fractions] != list(fractions) for a in answers):
        answers = [A.run_answer(r, fractions) for r in runs]
    verdicts = A.side_by_side(names, answers)
    pair_rows = A.pair_records(names, answers)
    doc.heading("The answer per model")
    doc.text("Which method hurts least (CE) at each fraction on each model, decided or not, and whether the models "
             "agree; every pair's difference below (* decided).", note=True)  # fmt: skip
    doc.table(verdicts, ["fraction", *names, "sets x documents", "models agree?"])
    doc.table(pair_rows, ["fraction", "pair", *names])
    panels = A.compare_panels(names, answers, list(method_colors(names).values()))
    if panels:
        fig = forest_figure(panels)
        save_figure(fig, out / "answer")
        doc.figure(png_bytes(fig), "answer.png", "paired differences of every run side by side")
    write_atomic(
        out / "compare.json",
        json.dumps({"runs": names, "verdicts": verdicts, "pairs": pair_rows,
                    "answers": {n: A.to_json(a) for n, a in zip(names, answers)}}, indent=2) + "\n",
    )  # fmt: skip
    keys = ["model", "model type", "layers x neurons", "task", "data", "eval tokens", "seeds", "device", "dtype"]
    doc.heading("Runs").table([{"run": n, **identity(r)} for n, r in zip(names, runs)], ["run", *keys, "run folder"])
    doc.heading("Table 2").text(f"Mean ± std over seeds. {MARK_NOTES['paper']}", note=True)
    doc.block(table.to_html(), [table.to_markdown()])
    for n, a in zip(names, answers):
        A.add(doc, a, f"Details: the answer for {n}")
    doc.heading("Change against fraction ablated").figure(png, "curves.png", "curves of every run")
    times = [{"run": n, "rows": t["n_rows"], "seconds": f"{t['total_seconds']:.1f}"}
             for n, t in zip(names, (r.timings() for r in runs))]  # fmt: skip
    doc.heading("Timings").table(times, ["run", "rows", "seconds"])
    return doc.write(out, "knockout comparison: " + ", ".join(names), "compare")
