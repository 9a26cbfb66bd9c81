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
    assert lines[3].startswith("classifier width 2 float32, volume 16×16×24 ")
    assert "peak host anonymous memory" in lines[3] and "fits 24 GB" in lines[3]
    assert lines[-1] == "largest volume that fitted: 16×16×24 (0.0 M voxels)"
    assert keras.mixed_precision.global_policy().name == "float32"
