"""benchmarks/gpu_check.py: its CPU smoke version runs the GPU check's code on tiny sizes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_smoke_version_trains_both_models_and_reports_speed_and_memory(capsys, monkeypatch):
    pytest.importorskip("tensorflow")
    import keras

    monkeypatch.setattr(sys, "path", list(sys.path))  # the script adds benchmarks/ to it
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--smoke"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "--smoke: running the tiny CPU smoke version of the GPU check"
    assert lines[1].startswith("matmul 128² float32: ")
    assert lines[2].startswith("GMCAE width 2 float32, batch 2, 16³ patches")
    assert "patches/s" in lines[2] and "of the matmul" in lines[2]
    # The classifier's memory search twice: the whole volume at once, then in z-slabs.
    for line, tiling in ((3, "whole volume"), (5, "z-slabs of 4")):
        assert lines[line].startswith(f"classifier width 2 float32, {tiling}, volume 16×16×24 ")
        assert "peak host anonymous memory" in lines[line] and "fits 24 GB" in lines[line]
        assert lines[line + 1] == f"largest volume that fitted, {tiling}: 16×16×24 (0.0 M voxels)"
    assert len(lines) == 7
    assert keras.mixed_precision.global_policy().name == "float32"
