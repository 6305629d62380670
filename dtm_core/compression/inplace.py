"""Compressing the dense model itself, and putting it back bit for bit.

A recipe pair (:func:`dtm_core.compression.pair.make_pair`) keeps the dense model and a compressed
copy of every changed weight: twice the model's memory for a whole-model spec. Every view except
the live side-by-side stream can instead run the dense model first, compress it in place, run it
again, and restore it. While compressed, each replaced tensor waits where a :class:`Keeper` puts it:

* ``memory``: kept as it is (no saving, the copy's cost; the default where nothing better fits);
* ``cpu``: moved to CPU memory (a model on a GPU: GPU memory holds one model);
* ``files``: dropped, and read from the model's own safetensors files on restore (the de-quantized
  GGUF cache, a checkpoint folder). A tensor that transformers memory-mapped from the file (a CPU
  model loaded in the file's dtype) keeps its place: its resident pages are given back to the
  kernel (``madvise(MADV_DONTNEED)``) and fault back in from the file when the model is dense
  again. Any other tensor is dropped only after the file's copy was found equal to it bit for
  bit, and re-read one tensor at a time; a tensor the files do not reproduce is kept in memory;
* ``none``: dropped for good (a command that ends after the compressed pass; a memory-mapped
  tensor's pages are given back too); the model cannot be restored and refuses a second
  compression.

``auto`` picks ``cpu`` on a GPU, ``files`` where the model has its files, else ``memory``.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from dtm_core.errors import DTMError

AUTO, MEMORY, CPU, FILES, NONE = "auto", "memory", "cpu", "files", "none"
KEEP_MODES = (AUTO, MEMORY, CPU, FILES, NONE)


def check_keep(mode: str) -> None:
    """One sentence for a keep mode that does not exist."""
    if mode not in KEEP_MODES:
        raise DTMError(f"Unknown keep mode '{mode}': use {', '.join(KEEP_MODES)}.")


class FileTensors:
    """The tensors of a folder of safetensors files, by name, read one at a time."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.where: dict[str, Path] = {}
        for f in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:     # reads the header only
                for k in fh.keys():
                    self.where.setdefault(k, f)

    def read(self, name: str) -> torch.Tensor | None:
        """The tensor ``name`` (a fresh copy; the file's mapping is closed at once, so its pages
        never pile up in this process), or None when the folder has none of that name."""
        from safetensors import safe_open

        f = self.where.get(name)
        if f is None:
            return None
        with safe_open(str(f), framework="pt") as fh:
            return fh.get_tensor(name).clone()


def file_mappings() -> list[tuple[int, int]]:
    """The address ranges of this process mapped from files (memory-mapped safetensors)."""
    out = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 6 and parts[4] != "0" and parts[5].startswith("/"):
                    a, b = (int(x, 16) for x in parts[0].split("-"))
                    out.append((a, b))
    except OSError:
        pass
    return out


def in_file_mapping(t: torch.Tensor, ranges) -> bool:
    """Whether ``t``'s bytes lie in a file mapping (a CPU tensor memory-mapped from its file)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return False
    a = t.data_ptr()
    b = a + t.numel() * t.element_size()
    return any(lo <= a and b <= hi for lo, hi in ranges)


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)


def release_pages(t: torch.Tensor) -> None:
    """Give back the resident pages of a file-mapped tensor (the kernel reads them from the file
    again if the tensor is ever read); only whole pages inside the tensor."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    a = t.data_ptr()
    b = a + t.numel() * t.element_size()
    lo, hi = -(-a // page) * page, b // page * page
    if hi > lo:
        _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)   # MADV_DONTNEED


class _InFile:
    __slots__ = ("name", "dtype", "device", "param")

    def __init__(self, name, dtype, device, param):
        self.name, self.dtype, self.device, self.param = name, dtype, device, param


class _Moved:
    __slots__ = ("tensor", "device", "param")

    def __init__(self, tensor, device, param):
        self.tensor, self.device, self.param = tensor, device, param


class _Dropped:
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


class Keeper:
    """Where an in-place compression's replaced tensors wait (see the module's text)."""

    def __init__(self, model: torch.nn.Module, mode: str = "auto", files: FileTensors | None = None):
        check_keep(mode)
        dev = next(model.parameters()).device
        if mode == AUTO:
            mode = CPU if dev.type != "cpu" else (FILES if files is not None else MEMORY)
        if mode == FILES and files is None:
            raise DTMError("The model has no safetensors files to re-read its tensors from.")
        self.mode, self.files = mode, files
        self.names = {id(m): p for p, m in model.named_modules()}
        self.kept_bytes = 0        # bytes kept in memory (or CPU memory) while compressed
        self.dropped = 0           # tensors dropped (re-read from files, or never restored)
        self._maps = None

    def _ranges(self):
        if self._maps is None:
            self._maps = file_mappings()
        return self._maps

    def _name(self, module, attr: str) -> str:
        prefix = self.names.get(id(module), "")
        return f"{prefix}.{attr}" if prefix else attr

    def keep(self, module: torch.nn.Module, attr: str, orig: torch.Tensor):
        is_param = isinstance(orig, torch.nn.Parameter)
        mapped = self.mode in (NONE, FILES) and in_file_mapping(orig, self._ranges())
        if self.mode == NONE:
            if mapped:
                release_pages(orig)
            self.dropped += 1
            return _Dropped(self._name(module, attr))
        if mapped:
            # a tensor memory-mapped from the model's file (a model loaded from safetensors on
            # the CPU): its pages go back to the kernel and come back from the same file (the
            # mapping holds the file as it was when loaded, even if it is replaced since)
            release_pages(orig)
            self.dropped += 1
            return orig
        if self.mode == FILES:
            name = self._name(module, attr)
            got = self.files.read(name)
            if got is not None and got.shape == orig.shape:
                got = got.to(orig.dtype)
                if torch.equal(got, orig.detach().cpu()):
                    self.dropped += 1
                    return _InFile(name, orig.dtype, orig.device, is_param)
        self.kept_bytes += orig.numel() * orig.element_size()
        if self.mode == CPU and orig.device.type != "cpu":
            return _Moved(orig.detach().to("cpu"), orig.device, is_param)
        return orig

    def back(self, held):
        """The original tensor (a Parameter where it was one), bit for bit."""
        if isinstance(held, _Dropped):
            raise DTMError(f"{held.name} was compressed in place for a run that ends, so the "
                           "dense weights are gone; load the model again.")
        if isinstance(held, _InFile):
            t = self.files.read(held.name).to(held.dtype).to(held.device)
        elif isinstance(held, _Moved):
            t = held.tensor.to(held.device)
        else:
            return held
        return torch.nn.Parameter(t, requires_grad=False) if held.param else t


def model_files(loaded) -> FileTensors | None:
    """The safetensors files a loaded model's tensors can be re-read from (None: none known)."""
    folder = getattr(loaded, "extra", {}).get("files")
    if not folder or not list(Path(folder).glob("*.safetensors")):
        return None
    return FileTensors(folder)
