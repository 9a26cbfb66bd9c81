"""Register kdsb's Keras objects as soon as Keras is imported, without importing it ourselves.

`import kdsb` must stay light (no TensorFlow: `kdsb --help` is instant and preprocessing workers
stay small), yet `keras.saving.load_model(path)` must find kdsb's layers and losses once kdsb is
imported. If Keras is already loaded we import the modules holding those objects now; otherwise
a one-shot import hook imports them right after Keras finishes loading. Python has no
post-import hook of its own, hence this small finder.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

# Every module that defines a `@keras.saving.register_keras_serializable` object.
KERAS_OBJECT_MODULES = (
    "kdsb.models.layers", "kdsb.models.losses", "kdsb.models.calibration", "kdsb.models.mil",
)


def _import_keras_objects() -> None:
    for name in KERAS_OBJECT_MODULES:
        importlib.import_module(name)


class _AfterKerasLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _import_keras_objects()


class _AfterKerasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _AfterKerasLoader(spec.loader)
        return spec


def register_when_keras_loads() -> None:
    """Make kdsb's Keras objects loadable now (Keras loaded) or as soon as Keras loads."""
    if "keras" in sys.modules:
        _import_keras_objects()
    elif not any(isinstance(f, _AfterKerasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterKerasFinder())
