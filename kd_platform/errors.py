"""The one exception type that the command line turns into a one-line message and exit code 2."""


class UsageError(Exception):
    """Bad input from the user: an unknown method or knob, a value out of range, a bad file.

    Raised before anything is written (no MLflow run, no results directory), so that
    catching it at the command line leaves nothing half-done behind.
    """
