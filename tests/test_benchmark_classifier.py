"""benchmarks/classifier.py: head option overrides from the command line and their run folders."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "classifier.py"


@pytest.fixture
def bench(monkeypatch):
    pytest.importorskip("tensorflow")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script adds the repository to it
    spec = importlib.util.spec_from_file_location("classifier_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "classifier_benchmark", module)
    spec.loader.exec_module(module)
    return module


def test_overrides_are_python_literals_or_text(bench):
    assert bench.parse_override("freeze_blocks=2") == ("freeze_blocks", 2)
    assert bench.parse_override("lr=3e-4") == ("lr", 3e-4)
    assert bench.parse_override("levels=1,2") == ("levels", (1, 2))
    assert bench.parse_override("calibration=temperature") == ("calibration", "temperature")
    for bad in ("freeze_blocks", "=2", "not a key=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
            bench.parse_override(bad)


def test_overridden_runs_get_folders_of_their_own(bench):
    assert bench.run_name("spp", 24, {}) == "spp_24"
    # Sorted by key: the same overrides in any order reuse one folder.
    assert bench.run_name("mil", 96, {"lr": 3e-4, "dropout": 0.1}) == "mil_96_dropout=0.1_lr=0.0003"
    # Every head's options are valid ClassifierOptions fields.
    fields = set(bench.ClassifierOptions.__dataclass_fields__)
    for options in bench.HEADS.values():
        assert set(options) <= fields
