#!/usr/bin/env python
"""Thin wrapper: same as `kdsb train-classifier ...`."""

import sys

from kdsb.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-classifier", *sys.argv[1:]]))
