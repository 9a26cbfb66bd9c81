#!/usr/bin/env python
"""Thin wrapper: same as `kdsb train-gmcae ...`."""

import sys

from kdsb.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-gmcae", *sys.argv[1:]]))
