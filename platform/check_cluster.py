"""``python -m platform.check_cluster cluster.yaml``: see ``kd_platform.cluster_config``."""
import sys

from kd_platform.cluster_config import main

if __name__ == "__main__":
    sys.exit(main())
