"""Layer run: one run in this process, from a :class:`~kd_platform.run.spec.RunSpec` to trained
networks and metrics (spec, the epoch loop, evaluation, checkpoints, flatness measures).
Imports config, data, models and methods; never Ray, MLflow, teachers or sweeps.
"""
