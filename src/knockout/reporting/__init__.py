"""Tables and figures, built from a run folder's stored results and statistics only."""

from knockout.reporting.report import compare_runs, write_report
from knockout.reporting.results import RunResults, load_run
from knockout.reporting.summary import format_table, summarize

__all__ = ["RunResults", "compare_runs", "format_table", "load_run", "summarize", "write_report"]
