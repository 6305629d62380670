"""Plugins: modules that register methods, metrics or families before the app or the CLI starts.

``DTM_PLUGINS=pkg.my_methods,other`` (comma-separated module names on the Python path) imports each
module once; a module registers what it defines (``dtm_core.compression.methods.register``,
``dtm_core.measure.metrics.register_metric``, ``dtm_core.models.families.register_family``) at import time.
"""
from __future__ import annotations

import importlib
import os

from dtm_core.errors import DTMError

_LOADED: set[str] = set()


def load_plugins(names: str | None = None) -> list[str]:
    """Import the plugin modules named in ``names`` (default: ``$DTM_PLUGINS``)."""
    text = os.environ.get("DTM_PLUGINS", "") if names is None else names
    done = []
    for name in (n.strip() for n in text.split(",")):
        if not name or name in _LOADED:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure is the plugin's, told in one line
            raise DTMError(f"Plugin '{name}' (from DTM_PLUGINS) could not be imported: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                           ) from None
        _LOADED.add(name)
        done.append(name)
    return done
