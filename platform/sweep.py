"""``python -m platform.sweep METHOD``: see ``kd_platform.cli``."""
import sys

from kd_platform.cli import sweep_main

if __name__ == "__main__":
    sys.exit(sweep_main())
