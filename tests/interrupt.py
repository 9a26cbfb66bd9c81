"""A killed run, as far as its journal can tell: a function that raises KeyboardInterrupt."""

from __future__ import annotations


class Interrupter:
    """Wraps a function to count its calls and raise KeyboardInterrupt (a Ctrl-C, or a kill as
    far as a journal can tell) on the call after `limit` (None: never)."""

    def __init__(self, monkeypatch, module, name):
        self.calls, self.limit = 0, None
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            if self.calls == self.limit:
                raise KeyboardInterrupt
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    def next_run(self, limit=None):
        self.calls, self.limit = 0, limit

