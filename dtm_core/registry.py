"""Loaded models and pairs, kept across requests so a pair is built once and reused.

Process-wide (models are big and shared by every browser session); a lock serializes loading. Only
the most recent dense model and a few pairs built on it stay in memory.
"""
from __future__ import annotations

import gc
import threading
from collections import OrderedDict

from .compress import Recipe
from .models import LoadedModel, load_model
from .pair import Pair, open_pair


class Registry:
    def __init__(self, max_pairs: int = 3, **load_kwargs):
        self.load_kwargs = load_kwargs
        self.max_pairs = max_pairs
        self._lock = threading.RLock()
        self._dense: tuple[str, LoadedModel] | None = None
        self._pairs: OrderedDict[tuple, Pair] = OrderedDict()
        self.loads = 0  # how many models were actually loaded (tests check reuse)

    def dense(self, source: str) -> LoadedModel:
        with self._lock:
            if self._dense and self._dense[0] == source:
                return self._dense[1]
            self._pairs.clear()
            self._dense = None
            gc.collect()
            model = load_model(source, **self.load_kwargs)
            self.loads += 1
            self._dense = (source, model)
            return model

    def pair(self, source: str, *, compress: str | None = None, components: str = "*.*",
             recipe: Recipe | None = None, compressed_model: str | None = None,
             calibration: tuple[str, ...] | None = None, chat: bool = False) -> Pair:
        key = (source, compress, components, str(recipe) if recipe else None, compressed_model,
               hash(calibration) if calibration else None, chat if calibration else None)
        with self._lock:
            if key in self._pairs:
                self._pairs.move_to_end(key)
                return self._pairs[key]
            dense = self.dense(source)
            pair = open_pair(dense, compress=compress, components=components, recipe=recipe,
                             compressed_model=compressed_model, calibration=calibration, chat=chat,
                             load_kwargs=self.load_kwargs)
            if compressed_model:
                self.loads += 1
            self._pairs[key] = pair
            while len(self._pairs) > self.max_pairs:
                self._pairs.popitem(last=False)
            return pair

    def cached(self, source: str) -> bool:
        return bool(self._dense and self._dense[0] == source)
