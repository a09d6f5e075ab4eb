"""Layer compare, beside the command lines at the top: ``python -m platform.compare``, a paper's
results table (methods down the side, teacher-student pairs across) trained over seeds and
reported with intervals, tests against a baseline and the published figures. It may import
every layer below it and ``kd_platform.cli``; nothing imports it but its command alias."""
