"""Reading results files back for ``hpcattn analyze``: rows (one per case), tables and CSV, which
figure a set of rows gets, and drawing it.

Imports point one way: ``draw`` -> ``training`` -> ``figures`` -> ``tables`` -> ``rows`` ->
``hpcattn.results`` (``training``: the figures and accuracy grids of training cases).
"""
from .draw import plot
from .figures import series_keys
from .rows import (all_columns, check_metrics, damage_report, error_of, load_rows, metric_names,
                   metric_value, param_names, printable, public, varying)
from .tables import columns, fmt, sort_rows, to_csv
from .training import table   # the case table, and training cases' accuracy grids after it

__all__ = ["load_rows", "damage_report", "printable", "error_of", "param_names", "varying",
           "all_columns", "public", "metric_names", "check_metrics", "metric_value", "columns",
           "sort_rows", "fmt", "table", "to_csv", "series_keys", "plot"]
