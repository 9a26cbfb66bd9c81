"""`python -m kdsb` is the `kdsb` command."""

from kdsb.cli import entry

entry()
