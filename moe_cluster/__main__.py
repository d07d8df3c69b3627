"""`python -m moe_cluster ...`: the same as `moe-cluster ...`."""

import sys

from moe_cluster.cli import main

sys.exit(main())
