"""Small Markdown and number formatting helpers for the report (no extra dependency)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"  # knob values spelled as in search-space files
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def mean_std(mean: float, std: float) -> str:
    if isinstance(std, float) and math.isnan(std):
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {std:.2g}"


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value))


def mean_ci(mean: float, low: float, high: float, signed: bool = False) -> str:
    """``90.8 [90.5, 91.2]``: a mean (or difference, ``signed``) and its interval; the bare
    value when the interval is missing."""
    if _missing(mean):
        return ""
    value = f"{mean:+.4g}" if signed else f"{mean:.4g}"
    if _missing(low) or _missing(high):
        return value
    return f"{value} [{low:.4g}, {high:.4g}]"


def p_value(p: float) -> str:
    """A p-value to three significant digits (so that 0.0504 does not read as 0.050), small
    ones in scientific notation."""
    if _missing(p):
        return ""
    return f"{p:.1e}" if p < 0.001 else f"{p:.3g}"


def table(df: pd.DataFrame, index: bool = False) -> str:
    """``df`` as a GitHub Markdown table (``|`` inside cells escaped)."""
    if index:
        df = df.reset_index()
    header = [str(c) for c in df.columns]
    rows = [[fmt(v).replace("|", "\\|") for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def terminal(df: pd.DataFrame, index: bool = False) -> str:
    return df.to_string(index=index, float_format=lambda v: f"{v:.4g}")
