"""`python -m jobs.supervisor`: the supervisor process (see `jobs.supervisor.daemon`)."""

from jobs.supervisor.daemon import main

raise SystemExit(main())
