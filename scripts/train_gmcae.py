#!/usr/bin/env python
"""Thin wrapper: same as `kdsb train-gmcae ...`."""

import sys

from kdsb.cli import entry

if __name__ == "__main__":
    entry(["train-gmcae", *sys.argv[1:]])
