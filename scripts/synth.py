#!/usr/bin/env python
"""Thin wrapper: same as `kdsb synth ...`."""

import sys

from kdsb.cli import entry

if __name__ == "__main__":
    entry(["synth", *sys.argv[1:]])
