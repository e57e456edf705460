"""`python -m jobs`: the `offload` command line (jobs/cli/)."""

import sys

from jobs.cli import main

sys.exit(main())
