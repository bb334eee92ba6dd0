"""Tables and figures, built from a run folder's stored results and statistics only."""

from knockout.reporting.summary import format_table, summarize

__all__ = ["format_table", "summarize"]
