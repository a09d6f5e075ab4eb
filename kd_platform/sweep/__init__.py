"""Layer sweep: many runs, searched (Ray Tune + Optuna TPE + ASHA, ``tuner``) or planned
(ablations, presets), with their search-space files. Imports launch and everything below it;
only the CLI and analysis sit above.
"""
