"""Pure functions over the results table (and, later, figures and reports)."""

from analysis.summary import summary_table

__all__ = ["summary_table"]
