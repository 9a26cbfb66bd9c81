#!/usr/bin/env python
"""Thin wrapper: same as `kdsb predict ...`."""

import sys

from kdsb.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
