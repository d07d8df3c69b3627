"""`python -m expert_worker serve ...`: the same as `moe-expert-worker serve ...`."""

import sys

from expert_worker.main import main

sys.exit(main())
