#!/usr/bin/env python
"""Thin wrapper: same as `kdsb synth ...`."""

import sys

from kdsb.cli import main

if __name__ == "__main__":
    sys.exit(main(["synth", *sys.argv[1:]]))
