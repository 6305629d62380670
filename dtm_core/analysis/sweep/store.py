"""The on-disk cell store: one JSON file per finished cell, written atomically, under a key of
(model fingerprint, spec, prompt tokens, N, metric version, ...), so a stopped or killed sweep
resumes without recomputing finished cells and a finished one loads instantly.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from dtm_core import METRIC_VERSION
from dtm_core.compression.recipe import parse_spec
from dtm_core.models.load import LoadedModel


def sweep_key(dense: LoadedModel, spec: str, prompt_ids, new_tokens: int, extra: str = "") -> str:
    h = hashlib.sha256()
    h.update(json.dumps([dense.fingerprint, parse_spec(spec).key, new_tokens, METRIC_VERSION,
                         extra]).encode())
    h.update(json.dumps(prompt_ids).encode())
    return h.hexdigest()[:24]


class CellStore:
    """One JSON file per finished cell, written atomically (temporary file, then rename)."""

    def __init__(self, folder: Path):
        self.folder = folder
        (folder / "cells").mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.folder / "cells" / f"{name}.json"

    def get(self, name: str) -> dict | None:
        try:
            return json.loads(self.path(name).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, name: str, row: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.folder / "cells", prefix=".tmp-")
        with os.fdopen(fd, "w") as fh:
            json.dump(row, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path(name))

    def write_meta(self, meta: dict) -> None:
        self.write_json("meta.json", meta)

    def write_json(self, name: str, obj) -> None:
        """A JSON file beside the cells (the meta data, estimates), written atomically."""
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2)
        os.replace(tmp, self.folder / name)

    def read_json(self, name: str):
        try:
            return json.loads((self.folder / name).read_text())
        except (OSError, json.JSONDecodeError):
            return None
