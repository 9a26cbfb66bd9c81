"""`python -m kdsb` is the `kdsb` command."""

import sys

from kdsb.cli import main

sys.exit(main())
