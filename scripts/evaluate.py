#!/usr/bin/env python
"""Thin wrapper: same as `kdsb evaluate ...`."""

import sys

from kdsb.cli import entry

if __name__ == "__main__":
    entry(["evaluate", *sys.argv[1:]])
