"""Ablation analysis of a sweep's MLflow runs: tables, knob importance, plots and a report.

``load`` reads runs into pandas, ``tables`` and ``importance`` compute, ``plots`` draws,
``report`` writes the folder and logs it to the parent run, ``cli`` is the command line.
"""
from .load import Sweep, find_parent, load_sweep, open_client
from .report import Report, analyse

__all__ = ["Report", "Sweep", "analyse", "find_parent", "load_sweep", "open_client"]
