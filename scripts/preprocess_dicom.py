#!/usr/bin/env python
"""Thin wrapper: same as `kdsb preprocess ...`."""

import sys

from kdsb.cli import entry

if __name__ == "__main__":
    entry(["preprocess", *sys.argv[1:]])
