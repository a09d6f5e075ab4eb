"""What every command line of the platform shares: bad input is one line and exit code 2."""
from __future__ import annotations

import argparse
import errno
import logging
import sys
from typing import Callable, NoReturn, Sequence

from kd_platform.errors import OneLineFailure, UsageError


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of argparse's usage dump
        raise UsageError(message)


def run_command(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    """``main(argv)``, with a ``UsageError`` turned into ``error: ...`` on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return main(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OneLineFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        full = no_space(exc)
        if full is None:
            raise
        print(f"error: disk full ({full}); free space where the results or the MLflow store are written, then "
              f"--resume", file=sys.stderr)
        return 1


NO_SPACE = ("No space left on device", "database or disk is full")


def no_space(exc: BaseException) -> str | None:
    """The first line that says a disk is full, in ``exc`` or the exceptions it wraps (Tune and
    SQLAlchemy wrap the ``OSError``); None when the failure is something else."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return str(e).splitlines()[0] if str(e) else "No space left on device"
        for line in str(e).splitlines():
            if any(marker in line for marker in NO_SPACE):
                return line.strip()[:300]
        todo += [e.__cause__, e.__context__, *(a for a in e.args if isinstance(a, BaseException))]
    return None
