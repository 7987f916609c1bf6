"""`python -m blipbatch ...` is the `blipbatch` command."""

import sys

from blipbatch.jobs.cli import main

sys.exit(main())
