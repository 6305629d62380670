"""Where models come from: ``default`` / hub id / local folder / ``.gguf`` file; device and dtype.

GGUF files are de-quantized by transformers, which is slow (about 13 s for the 135M default model on
two cores). The de-quantized weights are cached as safetensors under ``$XDG_CACHE_HOME/dtm-inspector``
keyed on the source file, and written atomically (a temporary folder renamed into place), so a crash
mid-write never leaves a cache that a later load would trust.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dtm_core.models import checkpoints
from dtm_core.errors import DTMError
from dtm_core.models.sources import (DEFAULT_DESCRIPTION, DEFAULT_GGUF, _CACHE_FORMAT, _classify,  # noqa: F401
                                     _file_key, cache_root, default_gguf_path, local_snapshot)




@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    source: str
    description: str
    fingerprint: str
    from_cache: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DTMError(f"Unknown device '{device}': use auto, cpu, cuda or cuda:N.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DTMError("CUDA was asked for but no CUDA device is available on this machine.")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA and fp32 on CPU unless the user says otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise DTMError(f"Unknown dtype '{dtype}': use auto, float32, bfloat16 or float16.")
    return _DTYPES[dtype]


@functools.lru_cache(maxsize=32)
def model_type_of(source: str) -> str | None:
    """The ``model_type`` a source's config names, read without loading weights (None when it
    cannot be told cheaply, e.g. a hub id not in the local cache)."""
    try:
        kind, path = _classify(source)
    except DTMError:
        return None
    try:
        if kind in ("default", "gguf"):
            from gguf import GGUFReader
            field = GGUFReader(str(path)).fields.get("general.architecture")
            arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
            return {"gemma3": "gemma3_text"}.get(arch, arch)
        if kind == "folder":
            return json.loads((path / "config.json").read_text()).get("model_type")
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(source, local_files_only=True).model_type
    except Exception:  # noqa: BLE001 - only a help text depends on it
        return None


def validate_source(source: str) -> str:
    """Check a model source string before any loading; returns its kind."""
    return _classify(source)[0]


def _from_pretrained(where, *, device, dtype, trust_remote_code, local_only, gpus=None, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code,
                                        local_files_only=local_only, **kw)
    load_kw = dict(dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=local_only)
    if device.type == "cuda":
        # accelerate spreads a model that does not fit one GPU over the others (and the CPU);
        # ``gpus``: only over these (a torchrun rank's share of its node, --gpus-per-rank)
        load_kw["device_map"] = "auto" if device.index is None or gpus else {"": device.index}
        if gpus:
            from dtm_core.distributed import max_memory
            load_kw["max_memory"] = max_memory(
                gpus, {g: torch.cuda.mem_get_info(g)[0] for g in gpus})
    model = AutoModelForCausalLM.from_pretrained(where, **load_kw, **kw)
    if device.type != "cuda":
        model.to(device)
    return tok, model


def _gguf_cache(path: Path, cache_dir=None) -> Path:
    """Where the de-quantized safetensors cache of a GGUF lives."""
    return cache_root(cache_dir) / "gguf" / _file_key(path)


def _gguf_folder(path: Path, cache_dir=None) -> Path | None:
    """The de-quantized safetensors cache of a GGUF (None until it is complete)."""
    folder = _gguf_cache(path, cache_dir)
    return folder if (folder / "complete.json").is_file() else None


def _load_gguf(path: Path, *, device, dtype, cache_dir, trust_remote_code, gpus=None):
    """Load a GGUF through its de-quantized safetensors cache; build the cache on a miss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_cache(path, cache_dir)
    if (folder / "complete.json").is_file():
        try:
            tok, model = _from_pretrained(str(folder), device=device, dtype=dtype,
                                          trust_remote_code=trust_remote_code, local_only=True,
                                          gpus=gpus)
            return tok, model, True
        except Exception:  # a cache from another transformers version: rebuild it
            shutil.rmtree(folder, ignore_errors=True)
    if build_gguf_cache(path, cache_dir) is not None:
        tok, model = _from_pretrained(str(folder), device=device, dtype=dtype,
                                      trust_remote_code=trust_remote_code, local_only=True,
                                      gpus=gpus)
        return tok, model, False
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    # The config carries a gguf quantization_config that save_pretrained refuses; the weights are
    # plain de-quantized tensors by now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _seal(tmp, folder, path)
    except OSError:
        pass  # an unwritable cache only costs speed
    model.to(dtype)
    if device.type == "cuda":
        model.to(device)
    return tok, model, False


def build_gguf_cache(path: Path, cache_dir=None) -> Path | None:
    """The GGUF's de-quantized safetensors cache, written tensor by tensor on a miss without
    loading a model (never a float32 state dict beside the model: transformers' own GGUF loading
    peaks at about 2.3x); None where this cannot be done (an architecture of transformers' newer
    packed GGUF path, an unwritable cache): then a whole load writes it."""
    folder = _gguf_folder(path, cache_dir)
    if folder is not None:
        return folder
    from dtm_core.models.gguf_cache import streamable, write_cache

    if not streamable(path):
        return None
    folder = _gguf_cache(path, cache_dir)
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        write_cache(path, tmp)
        _seal(tmp, folder, path)
    except OSError:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return None
    return _gguf_folder(path, cache_dir)


def _seal(tmp: Path, folder: Path, path: Path) -> None:
    """Mark a written cache complete and move it into place atomically."""
    (tmp / "complete.json").write_text(json.dumps({"source": str(path.resolve()),
                                                   "format": _CACHE_FORMAT}))
    if folder.exists() and not (folder / "complete.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)  # left by a crash: never trusted
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _available_bytes(device: torch.device) -> int:
    """Memory a model can be placed in: free GPU memory plus free RAM (accelerate offloads)."""
    free = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        return 1 << 62
    if device.type == "cuda":
        free += sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    return free


def _estimated_bytes(kind: str, path: Path | None, dtype: torch.dtype) -> int | None:
    """Rough size of the loaded weights, from the files, before loading anything."""
    elem = torch.empty((), dtype=dtype).element_size()
    if kind in ("default", "gguf") and path is not None:
        # GGUF weights average 4-8 bits; the de-quantized model holds dtype-sized values
        return int(path.stat().st_size * 8 / 4.5 * elem)
    if kind == "folder" and path is not None:
        files = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
        stored = sum(f.stat().st_size for f in files)
        try:
            quantized = "quantization_config" in json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            quantized = False
        # checkpoints are mostly 16-bit; a compressed one is assumed 4-bit (de-quantized here)
        return int(stored / (0.5 if quantized else 2) * elem) if stored else None
    return None


def check_fits(source: str, kind: str, path: Path | None, device: torch.device,
               dtype: torch.dtype) -> None:
    need = _estimated_bytes(kind, path, dtype)
    have = _available_bytes(device)
    if need is not None and need > have:
        raise DTMError(f"Model '{source}' needs about {need / 2**30:.1f} GiB in {dtype} but only "
                       f"{have / 2**30:.1f} GiB are free on this machine ({device.type}); pick a "
                       "smaller model or a lower-precision dtype.")


def load_model(source: str = "default", *, device: str | None = None, dtype: str | None = None,
               trust_remote_code: bool = False, cache_dir: str | None = None,
               gpus: list[int] | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer from ``default``, a folder, a ``.gguf`` file or a hub id.

    Hub ids are looked up in the local Hugging Face cache only: nothing is downloaded.
    ``gpus``: with CUDA, place the model over these GPUs only (a torchrun rank's share of its
    node, :func:`dtm_core.distributed.rank_gpus`).
    """
    kind, path = _classify(source)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_fits(source, kind, path, dev, dt)
    from_cache = False
    checkpoint = snap = None
    try:
        if kind in ("default", "gguf"):
            tok, model, from_cache = _load_gguf(path, device=dev, dtype=dt, cache_dir=cache_dir,
                                                trust_remote_code=trust_remote_code, gpus=gpus)
            key = _file_key(path)
        elif kind == "folder":
            tok, model, checkpoint = _load_folder(path, source, dev, dt, trust_remote_code, gpus)
            key = checkpoints.fingerprint(str(path))
        else:
            snap = local_snapshot(source)
            if snap is not None and (snap / "config.json").is_file():
                # a cached hub model is a folder: compressed checkpoints load as folders do
                tok, model, checkpoint = _load_folder(snap, source, dev, dt, trust_remote_code,
                                                      gpus)
            else:
                tok, model = _from_pretrained(source, device=dev, dtype=dt,
                                              trust_remote_code=trust_remote_code,
                                              local_only=True, gpus=gpus)
            key = hashlib.sha256(source.encode()).hexdigest()[:24]
    except DTMError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        if kind == "hub":
            raise DTMError(f"Model '{source}' is not in the local Hugging Face cache and cannot be "
                           "downloaded here; download it where there is network or give a local "
                           "folder.") from exc
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "trust_remote_code" in msg:
            raise DTMError(f"Model '{source}' needs custom code; pass --trust-remote-code if you "
                           "trust it.") from exc
        raise DTMError(f"Could not load model '{source}': {msg}") from exc
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    description = DEFAULT_DESCRIPTION if kind == "default" else f"{source} ({kind})"
    fingerprint = hashlib.sha256(f"{kind}|{key}|{dt}".encode()).hexdigest()[:16]
    loaded = LoadedModel(model=model, tokenizer=tok, source=source, description=description,
                         fingerprint=fingerprint, from_cache=from_cache)
    # where the loaded tensors can be re-read from (an in-place compression's restore)
    files = _gguf_folder(path, cache_dir) if kind in ("default", "gguf") else \
        (path if kind == "folder" else snap)
    if files is not None and not checkpoint and Path(files).is_dir():
        loaded.extra["files"] = str(files)
    if checkpoint:
        loaded.extra["quant_method"] = checkpoint
        if getattr(model, "dtm_loader", None):
            loaded.extra["loader"] = model.dtm_loader
    return loaded


def _load_folder(path: Path, source: str, dev, dt, trust_remote_code, gpus=None):
    """A transformers folder; a compressed checkpoint through the library of its format (or
    de-quantized into its architecture where that library cannot run here, see
    :mod:`dtm_core.models.checkpoints`). Returns (tokenizer, model, quant_method or None)."""
    config = checkpoints.read_config(path)
    method = checkpoints.quant_method(config)
    fmt = checkpoints.FORMATS.get(method) if method else None
    if fmt is not None:
        fmt.requirements()
    loader = None
    try:
        if fmt is not None and not fmt.via_transformers(config):
            tok, model = checkpoints.load_dequantized(path, config, checkpoint_weights(str(path)),
                                                      dt, dev, trust_remote_code)
        else:
            try:
                tok, model = _from_pretrained(str(path), device=dev, dtype=dt,
                                              trust_remote_code=trust_remote_code,
                                              local_only=True, gpus=gpus)
            except RuntimeError as exc:
                if fmt is None or not fmt.can_dequantize:
                    raise
                # e.g. asymmetric pack-quantized zero points, which compressed-tensors 0.20
                # writes packed and transformers 5.23 expects unpacked: the library's own
                # decompressor still reads them
                try:
                    tok, model = checkpoints.load_dequantized(
                        path, config, checkpoint_weights(str(path)), dt, dev, trust_remote_code)
                except DTMError as again:
                    first = str(exc).splitlines()[0][:160]
                    raise DTMError(f"Could not load the {method} checkpoint '{source}': "
                                   f"transformers failed ({first}) and so did reading it "
                                   f"module by module ({again})") from exc
                loader = (f"de-quantized into the base architecture by {fmt.name}'s own "
                          f"decompressor (transformers could not load it: "
                          f"{str(exc).splitlines()[0][:80]})")
            if method:
                checkpoints.finish_load(model)
    except DTMError:
        raise
    except (ImportError, RuntimeError) as exc:
        why = checkpoints.explain_load_error(source, config, exc) if method else None
        if why is None:
            raise
        raise why from exc
    if loader:
        model.dtm_loader = loader
    return tok, model, method


def same_tokenizer(a, b) -> bool:
    """Two tokenizers agree on every token id and on the special tokens the metrics rely on."""
    if len(a) != len(b) or a.get_vocab() != b.get_vocab():
        return False
    return (a.eos_token_id, a.bos_token_id) == (b.eos_token_id, b.bos_token_id)


def eos_ids(loaded: LoadedModel) -> set[int]:
    """Every token id that ends a generation: the generation config's and the tokenizer's EOS."""
    ids: set[int] = set()
    gen = getattr(loaded.model, "generation_config", None)
    for val in (getattr(gen, "eos_token_id", None), loaded.tokenizer.eos_token_id):
        if isinstance(val, int):
            ids.add(val)
        elif isinstance(val, (list, tuple)):
            ids.update(int(v) for v in val)
    return ids


def max_positions(model) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        val = getattr(cfg, name, None)
        if isinstance(val, int) and val > 0:
            return val
    return None


# ---------------------------------------------------------------------------------------------
# A checkpoint's tensors one at a time (what from:PATH reads): the formats' own readers from
# dtm_core.models.checkpoints, or the whole model loaded here where a format has none


def gguf_weights(path: str) -> "checkpoints.CheckpointWeights":
    """A GGUF's tensors from its de-quantized safetensors cache (written tensor by tensor on a
    miss), read one at a time."""
    gguf = default_gguf_path() if path == "default" else Path(path)
    folder = build_gguf_cache(gguf)
    if folder is None:                      # transformers' packed path: one whole load writes it
        load_model(str(gguf), device="cpu", dtype="float32")
        folder = _gguf_folder(gguf)
    if folder is None:
        return LoadedWeights(path)          # an unwritable cache: hold the model instead
    return checkpoints.PlainWeights(folder)


class LoadedWeights(checkpoints.CheckpointWeights):
    """Formats that transformers loads (bitsandbytes, torchao, GGUF, plain folders): the whole
    checkpoint is loaded once and each weight de-quantized from its module."""

    def __init__(self, source: str):
        self.loaded = load_model(source, device="cpu", dtype="float32")
        self.params = dict(self.loaded.model.named_parameters(remove_duplicate=False))
        self.modules = dict(self.loaded.model.named_modules())

    def names(self):
        return list(self.params)

    def tensor(self, name):
        w = self.params.get(name)
        if w is None:
            return None
        mod = self.modules.get(name.rpartition(".")[0])
        return checkpoints.dequantized(w, mod).float()


@functools.lru_cache(maxsize=4)
def _weights(path: str, stamp: tuple) -> "checkpoints.CheckpointWeights":
    p = Path(path)
    if p.suffix.lower() == ".gguf" or path == "default":
        return gguf_weights(path)
    config = checkpoints.read_config(p)
    method = checkpoints.quant_method(config)
    fmt = checkpoints.FORMATS.get(method) if method else None
    if method is None and list(p.glob("*.safetensors")):
        return checkpoints.located(checkpoints.PlainWeights(p), path)
    if fmt is None:
        return LoadedWeights(path)
    fmt.requirements()
    reader = fmt.reader(p, config)
    return LoadedWeights(path) if reader is None else checkpoints.located(reader, path)


def checkpoint_weights(source: str) -> "checkpoints.CheckpointWeights":
    """The de-quantized tensors of a checkpoint (kept for the last few checkpoints read)."""
    path = checkpoints.resolve_source(source)
    return _weights(path, checkpoints.stamp(path))
