"""What every command line of the platform shares: bad input is one line and exit code 2."""
from __future__ import annotations

import argparse
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
