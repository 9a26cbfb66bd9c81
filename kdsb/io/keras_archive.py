"""What a Keras model archive (`.keras`) holds, read without TensorFlow: its model's name and the
names of its layers (nested models' too), from the archive's `config.json`.

A run that must refuse a model of the wrong kind before it starts TensorFlow (a
multi-worker run's collective ops are configured only before the first operation) reads it here
(found in review: loading the model to check its kind crashed every multi-worker run).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator

CONFIG_NAME = "config.json"


def _names(config: object) -> Iterator[str]:
    """Every layer name in a (nested) Keras config: each dict's "name" under "config"."""
    if isinstance(config, dict):
        inner = config.get("config")
        if isinstance(inner, dict) and isinstance(inner.get("name"), str) \
                and "class_name" in config:
            yield inner["name"]
        for value in config.values():
            yield from _names(value)
    elif isinstance(config, list):
        for value in config:
            yield from _names(value)


def model_and_layer_names(path: str | os.PathLike) -> tuple[str, set[str]] | None:
    """(the model's name, the names of its layers at any depth) of a `.keras` archive; None
    when it is no archive with a readable config (loading it names the problem)."""
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read(CONFIG_NAME))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        return None
    names = set(_names(config))
    return str(config["config"].get("name", "")), names - {config["config"].get("name")}
