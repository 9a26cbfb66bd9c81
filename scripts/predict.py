#!/usr/bin/env python
"""Thin wrapper: same as `kdsb predict ...`."""

import sys

from kdsb.cli import entry

if __name__ == "__main__":
    entry(["predict", *sys.argv[1:]])
