"""Ablation analysis of MLflow runs (tables, knob importance, plots)."""
