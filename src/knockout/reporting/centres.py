"""The report's section on the statistics behind the centres, read from stats.safetensors without loading histograms:

- how well each centre is determined: from the centres of the collection's two halves (its even- and odd-numbered
  batches, :func:`knockout.stats.collect_stats`), per centre the share of neurons whose value is not determined to
  within 0.1 of their std, and the median over neurons of ``SE / |centre - mean|`` (:func:`knockout.stats.centres.
  determination`); a method whose median exceeds 0.5 is noise-limited at this collection size, and the tokens that
  would fix it are estimated by ``1 / sqrt(N)`` scaling (:func:`noise_notes`, the answer's notes);
- the histogram window (a number, or ``auto``: the widest the memory caps allow) and the histograms' memory;
- which neurons, if any, had values outside the window (per layer: how many, and the worst), and what that does to
  their centres.

Also :func:`peak_noise_notes`, the answer's note on how much of ``peak``'s result moves with its modal bin when both
``peak`` and ``peak-smooth`` are in a run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from knockout.errors import KnockoutError
from knockout.inference.paired import DocSums, paired_difference
from knockout.inference.sequential import common_docs
from knockout.stats import centres
from knockout.stats.running import size_text
from knockout.stats.statistics import read_metadata

#: How the report explains its determination table.
EXPLANATION = (
    "How well each centre is determined by the collection: each neuron's centre was also computed on the two halves "
    "of the collection (its even- and odd-numbered batches), and its standard error taken as |A - B| sqrt(n_A n_B) / "
    "(n_A + n_B) (|A - B| / 2 for equal halves), an approximation that assumes a 1/sqrt(N) rate (modes converge more "
    "slowly, so it understates theirs) and is one draw per neuron (right on average over neurons). 'Not determined' "
    f"counts neurons whose standard error exceeds {centres.DETERMINED_STD:g} of their std; 'SE / distance from mean' "
    "is the median over neurons of the standard error against |centre - mean|, the distance the comparison with "
    "the mean is about; "
    f"above {centres.NOISE_RATIO:g} the method's centres are noise-limited at this collection size."
)
CLIP_EFFECT = (
    "Their peak, mode, peak-smooth and peak@EPS are taken over the values inside the window only; their median "
    "counts the clipped values; their mean and std count every value."
)
#: Centres of the halves that name a registered method (the report's rows), in this order.
METHODS = ("peak", "peak-smooth", "mode", "median", "mean")


@dataclass
class ClippedLayer:
    layer: int
    neurons: int
    """Neurons with at least one value outside the window."""
    worst: int
    """The neuron with the largest share outside."""
    worst_share: float


@dataclass
class StatsSection:
    limit: float
    auto: bool
    eps: float
    hist_bytes: int
    n_neurons: int
    tokens: int
    half_tokens: tuple[int, int] | None
    determination: dict[str, dict] = field(default_factory=dict)
    clipped: list[ClippedLayer] = field(default_factory=list)


def read_section(path: str | Path) -> StatsSection:
    """The section's numbers from a statistics file (per layer: the halves' centres, mean, m2, count, under, over)."""
    meta = read_metadata(path)
    widths = json.loads(meta["widths"])
    half_tokens = tuple(json.loads(meta["half_tokens"])) if "half_tokens" in meta else None
    halves: dict[str, list[torch.Tensor]] = {}
    means, stds, clipped, n_bytes, tokens = [], [], [], 0, 0
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for i in range(len(widths)):
            count = int(f.get_tensor(f"layer{i}.count")[0])
            tokens = count
            mean, m2 = f.get_tensor(f"layer{i}.mean"), f.get_tensor(f"layer{i}.m2")
            means.append(mean)
            stds.append((m2 / max(count, 1)).sqrt())
            out = f.get_tensor(f"layer{i}.under") + f.get_tensor(f"layer{i}.over")
            shape = f.get_slice(f"layer{i}.hist").get_shape()
            n_bytes += 8 * math.prod(shape)
            if int(out.max()) > 0:
                worst = int(out.argmax())
                clipped.append(ClippedLayer(i, int((out > 0).sum()), worst, int(out[worst]) / max(count, 1)))
            if half_tokens is not None:
                for name in METHODS:
                    a, b = f"layer{i}.half_a.{name}", f"layer{i}.half_b.{name}"
                    if a in keys and b in keys:
                        halves.setdefault(name, []).append(torch.stack([f.get_tensor(a), f.get_tensor(b)]))
    section = StatsSection(
        limit=float(meta["limit"]),
        auto=meta.get("limit_mode") == "auto",
        eps=float(meta["eps"]),
        hist_bytes=n_bytes,
        n_neurons=sum(widths),
        tokens=tokens,
        half_tokens=half_tokens,
        clipped=clipped,
    )
    if half_tokens is not None and min(half_tokens) > 0:
        n_a, n_b = half_tokens
        for name, h in halves.items():
            if len(h) == len(widths):
                section.determination[name] = centres.determination(h, n_a, n_b, means, stds, name=name)
    return section


def _ratio_text(d: dict) -> str:
    return "" if d["ratio"] is None else f"{d['ratio']:.2f}"


def determination_records(section: StatsSection) -> list[dict]:
    """One record per centre: its share not determined, the median ratio and the tokens that would fix it."""
    out = []
    for name, d in section.determination.items():
        need = centres.tokens_needed(d["tokens"], d["ratio"])
        out.append(
            {
                "centre": name,
                "not determined to 0.1 std": f"{100 * d['share']:.1f}% ({d['undetermined']} of {d['neurons']})",
                "median SE / distance from mean": _ratio_text(d),
                "noise-limited": f"yes: about {need:,} tokens would do" if need else "no",
            }
        )
    return out


def window_text(section: StatsSection) -> str:
    """The window, the histograms' memory, and the clipping, in a sentence or two."""
    how = "auto: the widest the memory caps allow at this eps" if section.auto else "--hist-limit"
    halves = " (while collecting, one per half: about twice that)" if section.half_tokens else ""
    text = (
        f"Histogram window ±{section.limit:g} ({how}), bins of {section.eps:g}; the histograms take "
        f"{size_text(section.hist_bytes)} for {section.n_neurons:,} neurons{halves}, over the range the values "
        "reach. "
    )
    if not section.clipped:
        return text + "No neuron had a value outside the window."
    n = sum(c.neurons for c in section.clipped)
    return text + f"{n} neurons in {len(section.clipped)} layers had values outside the window. " + CLIP_EFFECT


def clipped_records(section: StatsSection) -> list[dict]:
    return [
        {
            "layer": c.layer,
            "neurons clipped": c.neurons,
            "worst neuron": c.worst,
            "its share outside": f"{100 * c.worst_share:.2f}%",
        }
        for c in section.clipped
    ]


def _halves_text(section: StatsSection) -> str:
    if section.half_tokens is None:
        return "These statistics have no halves' centres (not collected by `knockout stats` or a sweep)."
    n_a, n_b = section.half_tokens
    if min(n_a, n_b) == 0:
        return (
            f"Halves of {n_a:,} and {n_b:,} tokens: with one half empty (a collection of one batch) how well the "
            "centres are determined cannot be told; collect more than one batch (more --stats-tokens or a smaller "
            "--batch-size)."
        )
    return f"Halves of {n_a:,} and {n_b:,} tokens. {EXPLANATION}"


def add(doc, section: StatsSection | None) -> None:
    """The section of a report page (:class:`knockout.reporting.doc.Doc`); nothing without statistics."""
    if section is None:
        return
    doc.heading("How well the centres are determined").text(_halves_text(section), note=True)
    recs = determination_records(section)
    doc.table(recs, list(recs[0]) if recs else [])
    doc.text(window_text(section))
    recs = clipped_records(section)
    doc.table(recs, list(recs[0]) if recs else [])


# -- the answer's notes ----------------------------------------------------------------------------------------------
def noise_notes(stats_path: str | Path | None, methods: list[str]) -> list[str]:
    """For each of ``methods`` whose centres the statistics' halves cover: a note when they are noise-limited at
    this collection size (median ``SE / |centre - mean|`` above 0.5), with the tokens that would fix it."""
    if stats_path is None or not Path(stats_path).is_file():
        return []
    try:
        section = read_section(stats_path)
    except (KnockoutError, KeyError, OSError):
        return []
    return section_notes(section, methods)


def section_notes(section: StatsSection, methods: list[str]) -> list[str]:
    """:func:`noise_notes` of statistics already read (:func:`read_section`)."""
    out = []
    for name in methods:
        d = section.determination.get(name)
        need = centres.tokens_needed(d["tokens"], d["ratio"]) if d else None
        if need is None:
            continue
        out.append(
            f"{name}'s centres are noise-limited at {d['tokens']:,} collection tokens: over neurons, the median "
            f"standard error of a centre is {d['ratio']:.2f} times its distance from the mean (from the "
            f"collection's two halves); about {need:,} tokens would bring it to {centres.NOISE_RATIO:g} "
            "(an estimate by 1/sqrt(N) scaling)."
        )
    return out


def peak_noise_notes(data: dict[str, list[DocSums]], fraction: float) -> list[str]:
    """When both ``peak`` and ``peak-smooth`` have sets: the paired difference ``peak - peak-smooth`` in CE, the
    part of peak's result that comes from which bin it picked among the bins within counting noise of each other."""
    a, b = data.get("peak"), data.get("peak-smooth")
    if not a or not b:
        return []
    n = min(len(a), len(b))
    try:
        d = paired_difference(*common_docs(a[:n], b[:n]), "ce")
    except KnockoutError:
        return []
    return [
        f"At {100 * fraction:g}%, peak - peak-smooth = {d.estimate:+.4f} nats [{d.low:+.4f}, {d.high:+.4f}] (95%, "
        f"{n} sets): peak-smooth is the peak made stable against rounding (docs/centres.md), so this is about how "
        "much of peak's result is estimator noise."
    ]
