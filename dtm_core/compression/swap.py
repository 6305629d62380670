"""A compressed checkpoint's tensors put into the dense model itself, one tensor at a time.

A checkpoint pair of two models holds the base and the whole compressed checkpoint at once. Where
the checkpoint's forward pass is the base architecture running its de-quantized tensors (plus, for
the formats de-quantized here, the same per-module input quantization hooks the whole load
attaches), the dense model can become the checkpoint instead: each of its parameters is replaced
by the checkpoint's tensor of the same name (read one at a time by the format's own reader, cast
to the model's dtype, on the model's device), the replaced tensors wait where a
:class:`~dtm_core.compression.inplace.Keeper` puts them, and :meth:`Swapped.restore` puts them back
bit for bit. The numbers are those of the two-model pair (tested per format).

:func:`swap_reader` says whether a checkpoint allows it: a GGUF, a plain folder, a format that
transformers cannot load here (de-quantized into the base architecture exactly as this module
does), or a compressed-tensors checkpoint without activation quantization. Not: bitsandbytes and
torchao (their own kernels run the loaded model), compressed-tensors with activation quantization
(the library's forward rounds differently from the per-module hook in the last bits), a checkpoint
that stores a parameter under another name (experts one module each) or ties the embeddings
where the base does not.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from dtm_core.compression.inplace import file_mappings, in_file_mapping, release_pages
from dtm_core.errors import DTMError

LOADER = "tensor by tensor into the base model's structure (one model's memory)"


def swap_reader(dense, source: str, cache_dir=None):
    """``(reader, folder, config)`` of a checkpoint whose tensors can replace the dense model's
    one at a time (``folder``: where its config and tokenizer are), or None where the checkpoint must be loaded as a
    model of its own (see the module's text). ``cache_dir``: where a GGUF's de-quantized cache
    lives (:func:`dtm_core.models.load.load_model`'s)."""
    from transformers import AutoConfig

    from dtm_core.models import checkpoints as C
    from dtm_core.models.load import LoadedWeights, build_gguf_cache, checkpoint_weights
    from dtm_core.models.sources import _classify, default_gguf_path

    path = C.resolve_source(source)          # a missing checkpoint: its own sentence
    kind, _ = _classify(source.strip())
    via_transformers = False
    if kind in ("default", "gguf"):
        folder = build_gguf_cache(default_gguf_path() if kind == "default" else Path(path),
                                  cache_dir)
        if folder is None:
            return None
        reader = C.PlainWeights(folder)
    else:
        folder = Path(path)
        config = C.read_config(folder)
        method = C.quant_method(config)
        if method is not None:
            fmt = C.FORMATS.get(method)
            if fmt is None or fmt.name not in SWAPPABLE:
                return None
            fmt.requirements()
            via_transformers = fmt.via_transformers(config)
        reader = checkpoint_weights(path)
    if isinstance(reader, LoadedWeights):
        return None
    if via_transformers and any(reader.input_hook(p) is not None
                                for p, _ in dense.model.named_modules()):
        return None                # the library's own forward quantizes the activations
    names = set(reader.names())
    if not all(any(n in names for n in group) for group in _tied_groups(dense.model)):
        return None                # stored under other names (e.g. experts one module each)
    try:
        cfg = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError):
        return None
    if _ties(cfg) != _ties(dense.model.config):
        return None
    return reader, folder, cfg


# the formats whose loaded checkpoint computes the base architecture on de-quantized tensors
SWAPPABLE = ("compressed-tensors", "gptq", "awq", "modelopt", "mxfp4")


def _ties(config) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def _tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """Every parameter's names (a tied one has several), grouped by the parameter."""
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    return list(groups.values())


class Swapped:
    """The checkpoint's tensors in the dense model's parameters; :meth:`restore` undoes it."""

    layer_by_layer = False
    in_place = True

    def __init__(self, keeper):
        self.keeper = keeper
        self._saved: list[tuple[torch.nn.Parameter, object]] = []
        self._hooks: list = []
        # the LM head's dense tensors, kept in memory: the dense side's logits come from hidden
        # states kept by the dense pass and the dense head (:meth:`dense_head`)
        self._head: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.changed_params = 0
        self.changed_bytes = 0

    @contextmanager
    def dense_head(self):
        """While in the block, the LM head holds its dense tensors (tied ones included)."""
        now = [(p, p.data) for p in self._head]
        for p, d in self._head.items():
            p.data = d
        try:
            yield
        finally:
            for p, d in now:
                p.data = d

    def restore(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        saved, self._saved = self._saved, []
        self._head.clear()
        for param, held in reversed(saved):
            # the parameter object stays (tied modules share it): only its data goes back
            param.data = self.keeper.back(held).data


def swap_in(model: torch.nn.Module, reader, keeper) -> Swapped:
    """Replace each of ``model``'s parameters by ``reader``'s tensor of the same name where they
    differ (tied parameters once), and attach the reader's input quantization hooks."""
    out = Swapped(keeper)
    modules = dict(model.named_modules())
    names = set(reader.names())
    maps = file_mappings()
    head = model.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    try:
        for group in _tied_groups(model):
            name = next(n for n in group if n in names)
            mod_path, _, attr = name.rpartition(".")
            param = getattr(modules[mod_path], attr)
            got = reader.tensor(name)
            if tuple(got.shape) != tuple(param.shape):
                raise DTMError(f"The checkpoint's {name} is shaped {tuple(got.shape)} but the "
                               f"base's is {tuple(param.shape)}; it is not a compression of "
                               "this base.")
            got = got.to(device=param.device, dtype=param.dtype)
            if torch.equal(got, param.data):
                if in_file_mapping(got, maps):   # read from the checkpoint's mapped file: its
                    release_pages(got)           # pages go back (they count as resident)
                continue
            if id(param) in head_params:     # kept as it is (see Swapped._head)
                out._head[param] = param.data
                out._saved.append((param, param.data))
            else:
                out._saved.append((param, keeper.keep(modules[mod_path], attr, param.data)))
            param.data = got
            out.changed_params += 1
            out.changed_bytes += got.numel() * got.element_size()
            del got
        for path, mod in modules.items():
            hook = reader.input_hook(path)
            if hook is not None:
                out._hooks.append(mod.register_forward_pre_hook(hook))
    except BaseException:
        out.restore()
        raise
    return out
