"""`python -m jobs.supervisor`: the supervisor process (see `jobs.supervisor.daemon`)."""

import sys

from jobs.supervisor.daemon import main

if __name__ == "__main__":
    sys.exit(main())
