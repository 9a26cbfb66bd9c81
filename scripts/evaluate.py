#!/usr/bin/env python
"""Thin wrapper: same as `kdsb evaluate ...`."""

import sys

from kdsb.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
