"""Layer analysis: a sweep's MLflow runs as tables, knob importance, plots and a report. The
top layer beside the CLI: it may import every layer below, and nothing imports it.

``load`` reads runs into pandas, ``tables`` and ``importance`` compute, ``plots`` draws,
``report.analyse`` writes the report folder and logs it to the parent run, ``cli`` is the
command line. Plotting (matplotlib) is imported only by ``report``, so that loading runs,
and refusing bad input, stays quick.
"""
from kd_platform.analysis.load import Sweep, find_parent, load_sweep, open_client

__all__ = ["Sweep", "find_parent", "load_sweep", "open_client"]
