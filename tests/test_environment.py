"""environment.yml (the conda route in README) lists every dependency pyproject.toml does."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# pyproject's name → conda-forge's, where they differ (the CPU wheel is conda's tensorflow).
CONDA_NAMES = {"isal": "python-isal", "tensorflow-cpu": "tensorflow"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower()


def test_the_conda_environment_has_every_dependency():
    """Found in review: `isal` was added to pyproject.toml alone, and every command of a conda
    install failed on importing it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    listed = {_name(line.lstrip(" -")) for line in (ROOT / "environment.yml").read_text()
              .splitlines() if line.strip().startswith("- ") and not line.strip().endswith(":")}
    missing = sorted(CONDA_NAMES.get(name, name) for name in wanted
                     if CONDA_NAMES.get(name, name) not in listed)
    assert missing == []
