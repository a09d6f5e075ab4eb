"""The exceptions the command line turns into one-line messages: exit code 2 for bad input, 1 otherwise."""


class UsageError(Exception):
    """Bad input from the user: an unknown method or knob, a value out of range, a bad file.

    Raised before anything is written (no MLflow run, no results directory), so that
    catching it at the command line leaves nothing half-done behind.
    """


class OneLineFailure(RuntimeError):
    """A failure that is not the user's input (a tracking store that stayed away): reported as
    one line like a :class:`UsageError`, but with exit code 1, since the input was fine."""


def error_line(exc: BaseException) -> str:
    """``Type: message`` in one line. Ray and Tune wrap a remote error with its whole traceback
    as the message, whose first line says nothing; the wrapped error is then the last line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0]}"
