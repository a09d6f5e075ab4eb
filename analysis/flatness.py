"""``python -m analysis.flatness --run RUN_ID``: see ``kd_platform.analysis.flatness_cli``."""
import sys

from kd_platform.analysis.flatness_cli import main

if __name__ == "__main__":
    sys.exit(main())
