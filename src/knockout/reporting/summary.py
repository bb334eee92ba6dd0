"""Mean ± std over seeds per (method, fraction), and a plain-text table of it."""

from __future__ import annotations

import math
from collections import defaultdict

from knockout.runfolder import fraction_key

METRICS = ("top1", "ce", "delta_top1", "delta_ce")


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single seed)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (method, fraction): ``{metric}_mean``, ``{metric}_std``, ``n_seeds``, mean ``n_ablated``.

    Methods keep the order of their first row; the baseline comes first.
    """
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], fraction_key(row["fraction"]))].append(row)
    order = {m: i for i, m in enumerate(dict.fromkeys(["baseline"] + [r["method"] for r in rows]))}
    out = []
    for (method, fraction), group in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        entry = {"method": method, "fraction": fraction, "n_seeds": len(group)}
        for metric in METRICS:
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = _mean_std([r[metric] for r in group])
        entry["n_ablated"] = sum(r["n_ablated"] for r in group) / len(group)
        out.append(entry)
    return out


def format_table(summary: list[dict]) -> str:
    """A fixed-width text table: top-1 in %, cross-entropy in nats, and their changes from the baseline."""
    header = f"{'method':<16}{'frac':>6}  {'top-1 %':>15}  {'Δtop-1 %':>15}  {'CE':>13}  {'ΔCE':>13}  seeds"
    lines = [header, "-" * len(header)]
    for e in summary:
        lines.append(
            f"{e['method']:<16}{e['fraction']:>6.2f}  "
            f"{100 * e['top1_mean']:>7.2f} ± {100 * e['top1_std']:<5.2f}  "
            f"{100 * e['delta_top1_mean']:>+7.2f} ± {100 * e['delta_top1_std']:<5.2f}  "
            f"{e['ce_mean']:>6.3f} ± {e['ce_std']:<4.3f}  "
            f"{e['delta_ce_mean']:>+6.3f} ± {e['delta_ce_std']:<4.3f}  {e['n_seeds']:>3}"
        )
    return "\n".join(lines)
