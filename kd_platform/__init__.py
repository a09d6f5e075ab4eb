"""kd-platform: hyperparameter and ablation sweeps for knowledge-distillation methods
(Ray Train + Ray Tune/Optuna/ASHA + MLflow)."""

__version__ = "0.1.0"
