"""Which checkpoint and what it is, without loading its weights: a source resolved to a local path
(hub ids from the local cache), its fingerprint, and :func:`inspect` (format, schemes, what is
kept, activations, size on disk against the base's)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from dtm_core.errors import DTMError
from dtm_core.models.checkpoints.base import (FORMATS, CheckpointInfo, disk_size, quant_method,
                                              read_config)


def resolve_source(source: str) -> str:
    """A checkpoint's local path: a folder, a .gguf file, or a hub id's folder in the local
    Hugging Face cache."""
    from dtm_core.models.sources import _classify, local_snapshot

    if source.strip() == "default":
        return "default"
    p = Path(os.path.expanduser(source.strip()))
    if not p.exists():
        kind, _ = _classify(source.strip())     # a bad path or hub id: its own sentence
        snap = local_snapshot(source.strip()) if kind == "hub" else None
        if snap is None:
            raise DTMError(f"Checkpoint '{source}' is not in the local Hugging Face cache and "
                           "cannot be downloaded here; give a local folder.")
        p = snap
    if p.is_dir() and not (p / "config.json").is_file():
        raise DTMError(f"Folder '{source}' holds no config.json, so it is not a checkpoint.")
    return str(p.resolve())


def stamp(path: str) -> tuple:
    if path == "default":
        return ("default",)
    p = Path(path)
    files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def fingerprint(source: str) -> str:
    """What identifies a checkpoint's contents (its files' names, sizes and times)."""
    import hashlib

    path = resolve_source(source)
    return hashlib.sha256(json.dumps([path, stamp(path)]).encode()).hexdigest()[:16]


def inspect(source: str, base: str | None = None) -> CheckpointInfo:
    """What a checkpoint is (without loading its weights): format, schemes, what is kept,
    activations, size on disk (against ``base``'s when given)."""
    from dtm_core.models.sources import _classify

    kind, path = _classify(source)
    if kind == "hub":
        kind, path = "folder", Path(resolve_source(source))
    info = CheckpointInfo(source=source, kind="dense", format="unquantized")
    if kind in ("default", "gguf"):
        _describe_gguf(path, info)
    elif kind == "folder":
        config = read_config(path)
        method = quant_method(config)
        if method:
            fmt = FORMATS.get(method)
            info.kind = method
            if fmt is None:
                info.format = method
                info.loader = "through transformers (a format DTM Inspector does not describe)"
            else:
                fmt.requirements()
                fmt.describe(path, config, info)
        else:
            info.loader = "through transformers"
        info.size_bytes = disk_size(path)
    if base:
        try:
            bk, bpath = _classify(base)
            info.base_size_bytes = disk_size(bpath) if bpath is not None else None
        except DTMError:
            info.base_size_bytes = None
    return info


def _describe_gguf(path: Path, info: CheckpointInfo) -> None:
    from collections import Counter

    from gguf import GGUFReader

    r = GGUFReader(str(path))
    types = Counter(t.tensor_type.name for t in r.tensors if len(t.shape) > 1)
    info.kind = "gguf"
    info.format = ", ".join(f"{k}" for k, _ in types.most_common(1)) or "gguf"
    info.groups = [f"{k}: {n} matrices" for k, n in types.most_common()]
    info.quantized = sum(n for k, n in types.items() if k not in ("F32", "F16", "BF16"))
    info.size_bytes = path.stat().st_size
