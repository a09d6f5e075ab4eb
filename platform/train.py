"""``python -m platform.train METHOD``: see ``kd_platform.cli``."""
import sys

from kd_platform.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
