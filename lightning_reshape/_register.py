"""Register the ``deepspeed_reshape*`` strategy names when Lightning is (or gets) imported.

Why not import Lightning in ``lightning_reshape/__init__``: ``import lightning.pytorch`` costs
several seconds (about 10 s cold here), which the ``lightning-reshape groups`` CLI must not pay.
So ``import lightning_reshape`` registers at once when Lightning is already loaded, and
otherwise adds a one-shot import hook that registers right after ``lightning`` has
finished importing, then removes itself. Either import order gives a Trainer that knows
``strategy="deepspeed_reshape"``; no state of ours outlives the hook.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

# The top-level package, not ``lightning.pytorch``: its ``__init__`` imports
# ``lightning.pytorch`` whole, so when it finishes everything we import is complete.
# Registering from inside ``lightning.pytorch``'s own import, while ``lightning`` itself is
# still half-initialised, broke later imports of ``lightning.pytorch``.
TRIGGER = "lightning"


def _register() -> None:
    try:
        importlib.import_module("lightning_reshape.lightning")
    except Exception as exc:  # never break the user's own `import lightning`
        warnings.warn(
            f"lightning-reshape could not register its strategies ({exc!r}); "
            "import lightning_reshape.lightning to see the full error",
            stacklevel=2,
        )


class _Loader(importlib.abc.Loader):
    """Wraps Lightning's real loader; registers after the module body has run."""

    def __init__(self, inner: Any, finder: _Finder) -> None:
        self._inner = inner
        self._finder = finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        self._finder.remove()
        _register()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders and wraps the loader of ``TRIGGER``."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TRIGGER:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, self)
                return spec
        return None

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Register now if Lightning is loaded, else once it is."""
    loaded = sys.modules.get(TRIGGER)
    if loaded is not None and hasattr(loaded, "Trainer"):
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
