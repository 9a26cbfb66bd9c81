#!/usr/bin/env python
"""Thin wrapper: same as `kdsb train-classifier ...`."""

import sys

from kdsb.cli import entry

if __name__ == "__main__":
    entry(["train-classifier", *sys.argv[1:]])
