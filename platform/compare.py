"""``python -m platform.compare METHOD [METHOD ...]``: see ``kd_platform.compare``."""
import sys

from kd_platform.compare.cli import main

if __name__ == "__main__":
    sys.exit(main())
