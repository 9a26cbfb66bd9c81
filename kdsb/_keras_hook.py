"""Register kdsb's Keras objects as soon as Keras is imported, without importing it ourselves.

`import kdsb` must stay light (no TensorFlow: `kdsb --help` is instant and preprocessing workers
stay small), yet `keras.saving.load_model(path)` must find kdsb's layers and losses once kdsb is
imported. If Keras is already loaded we import the modules holding those objects now; otherwise
a one-shot import hook imports them right after Keras finishes loading. Python has no
post-import hook of its own, hence this small finder (`wrap_first_import`, also used by
`kdsb._tf_startup`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

# Every module that defines a `@keras.saving.register_keras_serializable` object.
KERAS_OBJECT_MODULES = (
    "kdsb.models.layers", "kdsb.models.losses", "kdsb.models.calibration", "kdsb.models.mil",
    "kdsb.models.nll", "kdsb.models.spread", "kdsb.models.input_record", "kdsb.models.ensemble",
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


class _OneShotFinder(importlib.abc.MetaPathFinder):
    """Finds one top-level module as the finders after it do, and wraps its loader, until the
    module is executed. Looking the module up (`importlib.util.find_spec("keras")`, as
    TensorFlow's import does) is no import: the finder stays for the import itself (found in
    review: `import kdsb, tensorflow, keras` left kdsb's objects unregistered)."""

    def __init__(self, fullname: str, wrap):
        self.fullname = fullname
        self.wrap = wrap
        self._finding = False  # a finder after it looking the module up again (found in review)

    def find_spec(self, fullname, path, target=None):
        if fullname != self.fullname or fullname in sys.modules or self._finding:
            return None
        self._finding = True
        try:
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._finding = False
        if spec.loader is not None:
            spec.loader = _Unhooking(self, self.wrap(spec.loader))
        return spec


class _Unhooking(importlib.abc.Loader):
    """Removes its finder as the module is executed, then runs the wrapped loader."""

    def __init__(self, finder: _OneShotFinder, loader: importlib.abc.Loader):
        self._finder, self._loader = finder, loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        # Rebound, not changed in place: another thread may be walking the list.
        sys.meta_path = [f for f in sys.meta_path if f is not self._finder]
        try:
            self._loader.exec_module(module)
        except BaseException:
            # A failed import may be tried again (TensorFlow's own import of keras swallows
            # ImportError): it must be hooked then too (found in review).
            sys.meta_path = [self._finder, *sys.meta_path]
            raise


def wrap_first_import(fullname: str, wrap) -> None:
    """Have the first import of top-level module `fullname` run through `wrap(loader)` (a
    loader around the real one); nothing if it is loaded or already hooked."""
    if fullname in sys.modules:
        return
    if not any(isinstance(f, _OneShotFinder) and f.fullname == fullname for f in sys.meta_path):
        sys.meta_path.insert(0, _OneShotFinder(fullname, wrap))


def unwrap_first_import(fullname: str) -> None:
    """Undo `wrap_first_import(fullname, …)` while the module is not yet imported."""
    sys.meta_path = [f for f in sys.meta_path
                     if not (isinstance(f, _OneShotFinder) and f.fullname == fullname)]


def register_when_keras_loads() -> None:
    """Make kdsb's Keras objects loadable now (Keras loaded) or as soon as Keras loads."""
    if "keras" in sys.modules:
        _import_keras_objects()
    else:
        wrap_first_import("keras", _AfterKerasLoader)
