#!/usr/bin/env python
"""Thin wrapper: same as `kdsb preprocess ...`."""

import sys

from kdsb.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
