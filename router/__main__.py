"""`python -m router serve ...`: the same as `moe-router serve ...`."""

import sys

from router.main import main

sys.exit(main())
