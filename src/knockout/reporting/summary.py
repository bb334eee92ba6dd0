"""Mean ± std over seeds per (method, fraction, target), and a plain-text table of it."""

from __future__ import annotations

import math
from collections import defaultdict

from knockout.runfolder import fraction_key

METRICS = ("top1", "ce", "delta_top1", "delta_ce")
#: Metrics only task prompts with a correct and an incorrect answer have (summarised when every row of a group has
#: them).
OPTIONAL_METRICS = ("logit_diff", "delta_logit_diff")


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single seed)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (method, fraction, target): ``{metric}_mean``, ``{metric}_std``, ``n_seeds``, mean
    ``n_ablated``, and ``target`` (the named set or scan unit; empty for random fractions).

    Methods keep the order of their first row; the baseline comes first; targets keep the order of their first row.
    """
    groups: dict[tuple[str, float, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], fraction_key(row["fraction"]), row.get("target", ""))].append(row)
    order = {m: i for i, m in enumerate(dict.fromkeys(["baseline"] + [r["method"] for r in rows]))}
    targets = {t: i for i, t in enumerate(dict.fromkeys(["", *(r.get("target", "") for r in rows)]))}
    out = []
    for (method, fraction, target), group in sorted(
        groups.items(), key=lambda kv: (order[kv[0][0]], targets[kv[0][2]], kv[0][1])
    ):
        entry = {"method": method, "fraction": fraction, "target": target, "n_seeds": len(group)}
        for metric in METRICS:
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = _mean_std([r[metric] for r in group])
        for metric in OPTIONAL_METRICS:
            if all(r.get(metric) is not None for r in group):
                entry[f"{metric}_mean"], entry[f"{metric}_std"] = _mean_std([r[metric] for r in group])
        entry["n_ablated"] = sum(r["n_ablated"] for r in group) / len(group)
        out.append(entry)
    return out


def format_table(summary: list[dict]) -> str:
    """A fixed-width text table: top-1 in %, cross-entropy in nats, and their changes from the baseline; a target
    column when rows name what they ablated, and the logit difference when the rows have it."""
    targets = any(e.get("target") for e in summary)
    ld = any("logit_diff_mean" in e for e in summary)
    width = max([16, *(len(e.get("target", "")) + 2 for e in summary)]) if targets else 0
    header = f"{'method':<16}" + (f"{'target':<{width}}" if targets else "")
    header += f"{'frac':>6}  {'top-1 %':>15}  {'Δtop-1 %':>15}  {'CE':>13}  {'ΔCE':>13}"
    header += f"  {'logit diff':>15}  {'Δlogit diff':>15}" if ld else ""
    header += "  seeds"
    lines = [header, "-" * len(header)]
    for e in summary:
        line = f"{e['method']:<16}" + (f"{e.get('target', ''):<{width}}" if targets else "")
        frac = f"{e['fraction']:>6.2f}" if e["fraction"] == 0 or e["fraction"] >= 0.01 else f"{e['fraction']:>6.0e}"
        line += (
            f"{frac}  "
            f"{100 * e['top1_mean']:>7.2f} ± {100 * e['top1_std']:<5.2f}  "
            f"{100 * e['delta_top1_mean']:>+7.2f} ± {100 * e['delta_top1_std']:<5.2f}  "
            f"{e['ce_mean']:>6.3f} ± {e['ce_std']:<4.3f}  "
            f"{e['delta_ce_mean']:>+6.3f} ± {e['delta_ce_std']:<4.3f}"
        )
        if ld:
            if "logit_diff_mean" in e:
                line += (
                    f"  {e['logit_diff_mean']:>7.3f} ± {e['logit_diff_std']:<5.3f}"
                    f"  {e['delta_logit_diff_mean']:>+7.3f} ± {e['delta_logit_diff_std']:<5.3f}"
                )
            else:
                line += f"  {'':>15}  {'':>15}"
        lines.append(line + f"  {e['n_seeds']:>3}")
    return "\n".join(lines)
