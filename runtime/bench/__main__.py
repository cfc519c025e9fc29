"""`python -m winq.runtime.bench`: one bench worker (winq.runtime.bench.run.main)."""

import sys

from .run import main

sys.exit(main())
