"""Knob importance of a TPE sweep: Optuna's fANOVA over the study the sweep stored in its
directory (``optuna.db``, study named after the sweep).

The study is the searcher's own record: its values are the sweep's objective, and a trial
that ASHA stopped was told the value of its last epoch. fANOVA fits a random forest, so a
handful of trials gives a rough ranking at best; below ``MIN_TRIALS`` it is not attempted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

MIN_TRIALS = 4
STUDY_FILE = "optuna.db"


@dataclass
class Importance:
    values: pd.Series | None   # knob -> share of the objective's variance, summing to 1
    note: str
    trials: int = 0


def fanova_importance(study_name: str, sweep_dir: Path | None, seed: int = 0) -> Importance:
    """fANOVA importances of the study's COMPLETE trials, or a note saying why there are none."""
    if sweep_dir is None:
        return Importance(None, "The parent run has no `sweep_dir` tag, so the Optuna study cannot be found.")
    db = Path(sweep_dir) / STUDY_FILE
    if not db.is_file():
        # Opening a missing sqlite file would create an empty one.
        return Importance(None, f"The Optuna study is not on this machine (no `{STUDY_FILE}` in the sweep "
                                f"directory `{sweep_dir}`).")
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{db.resolve()}")
    except KeyError:
        return Importance(None, f"`{db}` holds no study named `{study_name}`.")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < MIN_TRIALS:
        return Importance(None, f"Knob importance needs at least {MIN_TRIALS} COMPLETE trials in the Optuna "
                                f"study; it has {len(complete)}.", len(complete))
    try:
        raw = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))
    except (ValueError, RuntimeError) as exc:
        return Importance(None, f"fANOVA failed on the study ({exc}).", len(complete))
    values = pd.Series(raw, name="importance", dtype="float64").sort_values(ascending=False)
    values.index.name = "knob"
    return Importance(values, f"fANOVA (Optuna) over the {len(complete)} COMPLETE trials of study "
                              f"`{study_name}`; importances sum to 1. The study's value of a trial ASHA "
                              f"stopped is its last epoch's, and with few trials the ranking is rough.",
                      len(complete))
