"""``python -m analysis.ablation METHOD`` or ``--sweep PARENT_RUN_ID``: see ``kd_platform.analysis.cli``."""
import sys

from kd_platform.analysis.cli import main

if __name__ == "__main__":
    sys.exit(main())
