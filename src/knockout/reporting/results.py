"""A run as data: ``ko.load_run(path)`` (and what ``ko.run_sweep`` returns).

Everything comes from the run folder's files (no model is loaded): the rows (results.jsonl), the Table-2 summary
(mean and std over sets per method and fraction), and the answer (every pair's verdict with its interval, and the
excess over the bound) as pandas DataFrames, beside the config and the :class:`~knockout.reporting.answer.Answer`
object itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from knockout.config import Resolved, SweepConfig
from knockout.reporting import answer as A
from knockout.reporting.summary import summarize
from knockout.runfolder import RunFolder


@dataclass
class RunResults:
    """The results of one run folder. Path-like: ``Path(results)`` is the run folder."""

    dir: Path
    config: SweepConfig | None
    """The run's recorded settings (``None`` when the folder has no config.json)."""
    resolved: Resolved
    """What the run resolved: model identity, task, versions, data identity (config.json's ``resolved``)."""
    rows: object
    """``pandas.DataFrame``: one line per row of results.jsonl (method, fraction, seed, target, top1, ce ...)."""
    summary: object
    """``pandas.DataFrame``: per method and fraction, ``n_seeds`` and each metric's mean and std over sets (Table 2,
    on the first look's sets for ``--seeds auto`` runs)."""
    paired: object
    """``pandas.DataFrame``: the answer's records (:data:`knockout.reporting.answer.PAIRED_COLUMNS`): every pair of
    contenders per fraction and metric with its verdict and interval, and each contender's excess over the bound."""
    answer: A.Answer
    """The answer (verdicts, best method, needs) at the run's decision fractions."""
    faithfulness: object = None
    """``pandas.DataFrame`` of a ``--keep``/``--keep-top`` run (:mod:`knockout.reporting.circuits`): per method, kept
    set (``set``) or curve size (``k``) and metric (``ld``, ``ce``), the faithfulness with its paired interval
    (``low``, ``high``) and the metrics behind it (``circuit``, ``full``, ``empty``; ``ablated``: the set itself
    ablated); empty for other runs."""

    def __fspath__(self) -> str:
        return str(self.dir)

    def best(self, fraction: float, metric: str = "ce") -> str | None:
        """The method decided best at ``fraction`` (None while undecided)."""
        for fa in self.answer.fractions:
            if abs(fa.fraction - fraction) < 1e-9:
                return fa.best(metric)
        return None


def load_run(run_dir: str | os.PathLike | RunFolder, fractions: tuple[float, ...] | None = None) -> RunResults:
    """The run in ``run_dir`` as data (see the module docstring). ``fractions``: where the answer is given (default:
    the run's decision fractions, 0.5 and 0.9 unless configured otherwise)."""
    import pandas as pd

    from knockout.reporting import circuits as C

    run = RunFolder.with_results(run_dir)
    answer = A.run_answer(run, tuple(fractions) if fractions is not None else run.fractions)
    circuits = C.circuit_report(run) if C.has_kept(run) else None
    return RunResults(
        dir=run.dir,
        config=run.config,
        resolved=run.resolved,
        rows=pd.DataFrame(run.row_dicts()),
        summary=pd.DataFrame(summarize(run.table_rows())),
        paired=pd.DataFrame(A.paired_records(answer), columns=A.PAIRED_COLUMNS),
        answer=answer,
        faithfulness=C.table(circuits),
    )
