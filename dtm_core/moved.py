"""Where each module of the former flat ``dtm_core/`` now lives.

Users' scripts and plugins keep importing the old names (``dtm_core.methods.register``,
``dtm_core.metrics``, ``dtm_core.compress``, ``dtm_core.sweep``, ...): an import of an old name
gives the very module object of the new one (not a copy: registries, ``isinstance`` checks and
monkeypatching see one module). :data:`MOVED` is the map; :func:`install` (called by
``dtm_core/__init__.py``) puts a finder first on ``sys.meta_path`` that answers only these names.

``dtm_core.models`` is a package now (``models/``): its ``__init__`` re-exports the former
module's names, so it needs no entry here.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    # models/: where a side's model comes from and how it runs
    "dtm_core.sources": "dtm_core.models.sources",
    "dtm_core.families": "dtm_core.models.families",
    "dtm_core.components": "dtm_core.models.components",
    "dtm_core.hooks": "dtm_core.models.hooks",
    "dtm_core.generation": "dtm_core.models.generation",
    "dtm_core.checkpoints": "dtm_core.models.checkpoints",
    # compression/: what makes the compressed side
    "dtm_core.methods": "dtm_core.compression.methods",
    "dtm_core.compress": "dtm_core.compression.recipe",
    "dtm_core.calibration": "dtm_core.compression.calibration",
    "dtm_core.expert_overrides": "dtm_core.compression.expert_overrides",
    "dtm_core.pair": "dtm_core.compression.pair",
    "dtm_core.intactkv": "dtm_core.compression.intactkv",
    # measure/: a pair's numbers
    "dtm_core.metrics": "dtm_core.measure.metrics",
    "dtm_core.divergence": "dtm_core.measure.divergence",
    "dtm_core.streaming": "dtm_core.measure.streaming",
    "dtm_core.evaluate": "dtm_core.measure.evaluate",
    "dtm_core.kld": "dtm_core.measure.kld",
    "dtm_core.exports": "dtm_core.measure.exports",
    "dtm_core.prompts": "dtm_core.measure.prompts",
    "dtm_core.variants": "dtm_core.measure.variants",
    # analysis/: where a divergence comes from
    "dtm_core.sweep": "dtm_core.analysis.sweep",
    "dtm_core.levels": "dtm_core.analysis.levels",
    "dtm_core.explain": "dtm_core.analysis.explain",
    "dtm_core.sinks": "dtm_core.analysis.sinks",
    # planning/: what to compress
    "dtm_core.plan": "dtm_core.planning.plan",
    "dtm_core.allocation": "dtm_core.planning.allocation",
    "dtm_core.budget_plan": "dtm_core.planning.budget_plan",
    "dtm_core.plan_exports": "dtm_core.planning.plan_exports",
}


def new_name(old: str) -> str | None:
    """The module an old name now means (submodules of a moved package too), or None."""
    head = old
    while head:
        if head in MOVED:
            return MOVED[head] + old[len(head):]
        head = head.rpartition(".")[0]
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        # the import system takes whatever sys.modules holds under the name once this returns
        sys.modules[module.__name__] = importlib.import_module(self.target)


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("dtm_core."):
            return None
        new = new_name(fullname)
        if new is None:
            return None
        if importlib.util.find_spec(new) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
