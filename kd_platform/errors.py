"""The exceptions the command line turns into one-line messages: exit code 2 for bad input, 1 otherwise."""


class UsageError(Exception):
    """Bad input from the user: an unknown method or knob, a value out of range, a bad file.

    Raised before anything is written (no MLflow run, no results directory), so that
    catching it at the command line leaves nothing half-done behind.
    """


class OneLineFailure(RuntimeError):
    """A failure that is not the user's input (a tracking store that stayed away): reported as
    one line like a :class:`UsageError`, but with exit code 1, since the input was fine."""
