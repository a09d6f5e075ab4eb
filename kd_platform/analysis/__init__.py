"""Ablation analysis of a sweep's MLflow runs: tables, knob importance, plots and a report.

``load`` reads runs into pandas, ``tables`` and ``importance`` compute, ``plots`` draws,
``report.analyse`` writes the report folder and logs it to the parent run, ``cli`` is the
command line. Plotting (matplotlib) is imported only by ``report``, so that loading runs,
and refusing bad input, stays quick.
"""
from .load import Sweep, find_parent, load_sweep, open_client

__all__ = ["Sweep", "find_parent", "load_sweep", "open_client"]
