"""A dense model and its compressed counterpart.

A recipe pair is a *shared copy* of the dense model: a second module tree whose every parameter and
buffer is the dense model's own tensor, except the weights the recipe replaces. So a pair costs the
dense model plus the changed tensors, and the dense side is never touched.
"""
from __future__ import annotations

import copy
import itertools
import threading
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from dtm_core.compression.calibration import Calibration, calibration_from
from dtm_core.compression.recipe import Applied, Recipe, apply_recipe, runs_layer_by_layer
from dtm_core.errors import DTMError
from dtm_core.models.generation import model_device
from dtm_core.models.load import LoadedModel, same_tokenizer


@dataclass
class Pair:
    dense: LoadedModel
    compressed: torch.nn.Module
    label: str
    recipe: Recipe | None = None
    compressed_source: str | None = None
    applied: Applied | None = None
    config: dict = field(default_factory=dict)
    calibration: Calibration | None = None    # what the recipe's methods were calibrated on
    # set for a pair that compresses the dense model itself (no copy): see :func:`in_place_pair`
    in_place: "InPlace | None" = None

    @property
    def tokenizer(self):
        return self.dense.tokenizer

    def require_two_models(self, what: str) -> None:
        """One sentence when ``what`` (run with both models side by side) meets an in-place
        pair."""
        if self.in_place is not None:
            raise DTMError(f"{what} runs the dense and the compressed model side by side, so it "
                           "needs a pair of two models, not one compressed in place.")

    def dense_model(self) -> torch.nn.Module:
        """The dense model, as dense (an in-place pair is restored first)."""
        if self.in_place is not None:
            self.in_place.restore()
        return self.dense.model

    def compressed_model(self) -> torch.nn.Module:
        """The compressed model (an in-place pair compresses the dense model now)."""
        if self.in_place is not None:
            self.applied = self.in_place.compress()
        return self.compressed

    def dense_head(self):
        """A block in which the model's LM head is the dense one (an in-place pair whose
        compression replaced the head: the dense side's logits from kept hidden states)."""
        applied = self.in_place.applied if self.in_place is not None else None
        head = getattr(applied, "dense_head", None)
        return head() if head is not None else nullcontext()

    @contextmanager
    def session(self):
        """A run of a view: an in-place pair holds its model's lock and is dense again when the
        run ends (unless its keep mode is ``none``: then the run was the model's last)."""
        if self.in_place is None:
            yield self
            return
        with self.in_place.lock:
            self.in_place.depth += 1
            try:
                yield self
            finally:
                self.in_place.depth -= 1
                # a run inside a run (evaluate's chunks) leaves the restore to the outer one
                if self.in_place.depth == 0 and not self.in_place.ends_run:
                    self.in_place.restore()


class InPlace:
    """A compression applied to the dense model itself on demand, and undone bit for bit.

    ``apply(keeper)`` compresses the dense model, handing each replaced tensor to the
    :class:`~dtm_core.compression.inplace.Keeper`, and returns what restores it: a recipe's
    :class:`Applied`, or a checkpoint's :class:`~dtm_core.compression.swap.Swapped`."""

    def __init__(self, dense: LoadedModel, apply, keep: str = "auto"):
        from dtm_core.compression.inplace import check_keep

        check_keep(keep)
        self.dense, self.apply, self.keep = dense, apply, keep
        self.applied = None
        self.lock = _model_lock(dense)
        self.compressions = 0        # how many times the recipe was applied (tests check reuse)
        self.depth = 0               # sessions open (nested runs restore at the outermost end)

    def compress(self):
        from dtm_core.compression.inplace import Keeper, model_files

        if self.applied is None:
            if self.ends_run and self.compressions:
                raise DTMError("This model was compressed in place for a run that ended and its "
                               "dense weights were dropped; load it again.")
            keeper = Keeper(self.dense.model, self.keep, model_files(self.dense))
            self.applied = self.apply(keeper)
            self.compressions += 1
        return self.applied

    @property
    def ends_run(self) -> bool:
        """Whether the dense weights are dropped for good (keep mode ``none``)."""
        from dtm_core.compression.inplace import NONE
        return self.keep == NONE

    def restore(self) -> None:
        if self.applied is not None:
            applied, self.applied = self.applied, None
            applied.restore()


_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = \
    weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _model_lock(dense: LoadedModel) -> "threading.RLock":
    """One lock per model: two in-place runs on it never overlap."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(dense.model, threading.RLock())


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A new module tree that shares every parameter and buffer tensor with ``model``."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _prepared(dense: LoadedModel, recipe: Recipe, calibration, chat: bool, sequential):
    """A recipe's calibration and whether it runs layer by layer (selections validated first,
    before anything is copied or measured)."""
    recipe.components(dense.model)
    calib = None
    if recipe.needs_calibration:
        names = ", ".join(sorted({i.spec.name for i in recipe.items if i.spec.needs}))
        calib = calibration_from(dense, calibration, chat, names)
    return calib, recipe.sequential_default if sequential is None else sequential


def make_pair(dense: LoadedModel, recipe: Recipe, calibration=None, chat: bool = False,
              sequential: bool | None = None) -> Pair:
    """The dense model and a shared copy compressed by ``recipe``.

    ``calibration`` feeds the statistics that the recipe's methods need (wanda's input norms, ...):
    prompt texts (encoded with ``chat``), token sequences, or a
    :class:`~dtm_core.compression.calibration.Calibration`; statistics are measured on the dense model, whose
    modules have the same paths as the copy's, and shared with every other user of the same
    calibration prompts (:func:`~dtm_core.compression.calibration.calibration_for`). ``sequential``: each
    layer's statistics on the outputs of the layers before it as compressed (see
    :func:`~dtm_core.compression.recipe.apply_recipe`); None (the default): as the recipe's methods
    are run by llm-compressor (:attr:`Recipe.sequential_default`: layer by layer for GPTQ,
    SparseGPT, Wanda and AWQ).
    """
    calib, sequential = _prepared(dense, recipe, calibration, chat, sequential)
    comp = shared_copy(dense.model)
    applied = apply_recipe(comp, recipe, calib, sequential=sequential)
    label = str(recipe) + (" (sequential)" if applied.layer_by_layer else "")
    return Pair(dense=dense, compressed=comp, label=label, recipe=recipe, applied=applied,
                calibration=calib)


def in_place_pair(dense: LoadedModel, recipe: Recipe, calibration=None, chat: bool = False,
                  sequential: bool | None = None, keep: str = "auto") -> Pair:
    """A pair that costs one model's memory: nothing is copied; the views that support it
    (divergence, evaluate, kld, plans' verification) run the dense model first, then compress it
    in place (:meth:`Pair.compressed_model`) and restore it bit for bit when the run ends
    (:meth:`Pair.session`). ``keep``: where the replaced tensors wait
    (:mod:`dtm_core.compression.inplace`). The numbers equal :func:`make_pair`'s."""
    calib, sequential = _prepared(dense, recipe, calibration, chat, sequential)
    label = str(recipe) + (" (sequential)" if runs_layer_by_layer(dense.model, recipe, calib,
                                                                    sequential) else "")
    def apply(keeper):
        return apply_recipe(dense.model, recipe, calib, sequential=sequential, keeper=keeper)

    return Pair(dense=dense, compressed=dense.model, label=label, recipe=recipe,
                calibration=calib, in_place=InPlace(dense, apply, keep))


def checkpoint_pair(dense: LoadedModel, compressed: LoadedModel, info=None) -> Pair:
    """A pair of two checkpoints of the same base; refuses tokenizers that differ, and an
    architecture or tensor shapes that differ (naming what differs). ``info``: what the
    compressed checkpoint is (:class:`~dtm_core.models.checkpoints.CheckpointInfo`), kept on the pair."""
    from dtm_core.models.checkpoints import config_differences, shape_differences

    if not same_tokenizer(dense.tokenizer, compressed.tokenizer):
        raise DTMError(f"The tokenizers of '{dense.source}' and '{compressed.source}' differ, so "
                       "their tokens cannot be compared; pick checkpoints of the same base model.")
    diff = (config_differences(dense.model.config, compressed.model.config)
            or shape_differences(dense.model, compressed.model))
    if diff:
        raise DTMError(f"'{compressed.source}' is not a compression of '{dense.source}': "
                       f"{'; '.join(diff[:3])}.")
    if model_device(compressed.model) != model_device(dense.model):
        compressed.model.to(model_device(dense.model))
    config = {"checkpoint": info.to_json()} if info is not None else {}
    return Pair(dense=dense, compressed=compressed.model, label=compressed.source,
                compressed_source=compressed.source, config=config)


def checkpoint_in_place_pair(dense: LoadedModel, source: str, info=None, keep: str = "auto",
                             cache_dir=None) -> Pair | None:
    """A checkpoint pair that costs one model's memory: the checkpoint's tensors are read one at
    a time into the dense model itself when a view's compressed pass runs, and put back when it
    ends (:mod:`dtm_core.compression.swap`); None where the checkpoint's format does not allow it
    (then :func:`checkpoint_pair` loads it as a model of its own). Refuses what
    :func:`checkpoint_pair` refuses, in the same words. ``cache_dir``: where a GGUF's
    de-quantized cache lives."""
    from transformers import AutoTokenizer

    from dtm_core.compression.swap import LOADER, swap_in, swap_reader
    from dtm_core.models.checkpoints import config_differences

    found = swap_reader(dense, source, cache_dir)
    if found is None:
        return None
    reader, folder, cfg = found
    tok = AutoTokenizer.from_pretrained(str(folder))
    if not same_tokenizer(dense.tokenizer, tok):
        raise DTMError(f"The tokenizers of '{dense.source}' and '{source}' differ, so "
                       "their tokens cannot be compared; pick checkpoints of the same base model.")
    diff = config_differences(dense.model.config, cfg)
    if diff:
        raise DTMError(f"'{source}' is not a compression of '{dense.source}': "
                       f"{'; '.join(diff[:3])}.")
    if info is not None:
        info.loader = LOADER
    config = {"checkpoint": info.to_json()} if info is not None else {}

    def apply(keeper):
        return swap_in(dense.model, reader, keeper)

    return Pair(dense=dense, compressed=dense.model, label=source, compressed_source=source,
                config=config, in_place=InPlace(dense, apply, keep))


def tensor_bytes(*models: torch.nn.Module) -> int:
    """Bytes of the distinct tensor storages that the given models hold together."""
    seen: dict[int, int] = {}
    for m in models:
        for t in itertools.chain(m.parameters(), m.buffers()):
            # an experts parameter with overridden experts also holds their own matrices
            for x in [t] + list(getattr(t, "extra_tensors", lambda: [])()):
                st = x.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


ONE_MODEL_VIEWS = ("Prompt sets, KLD and the CLI's divergence, evaluate and kld run this pair in "
                   "one model's memory")


def copy_bytes(dense: LoadedModel, recipe: Recipe) -> int:
    """Bytes a compressed copy of the recipe's components adds to the dense model (each changed
    parameter once; an experts parameter: its compressed experts' matrices)."""
    seen: dict[tuple[int, str], int] = {}
    for comp, spec in recipe.components(dense.model):
        if not spec.changes_weights:
            continue
        w = comp.weight
        per = w[0].numel() if comp.experts is not None else w.numel()
        key = (id(comp.module), comp.param)
        n = per * len(comp.experts) if comp.experts is not None else per
        seen[key] = max(seen.get(key, 0), n * w.element_size())
    return sum(seen.values())


def check_copy_fits(dense: LoadedModel, recipe: Recipe, limit: int | None = None) -> None:
    """One sentence when a compressed copy beside the dense model does not fit the free memory,
    or the ``limit`` on the bytes of model tensors (the live stream needs both models at
    once)."""
    from dtm_core.models.load import _available_bytes

    need = copy_bytes(dense, recipe)
    free = _available_bytes(dense.device)
    if limit is not None:
        free = min(free, max(0, limit - tensor_bytes(dense.model)))
    if need > free:
        total = tensor_bytes(dense.model) + need
        raise DTMError(f"The side-by-side stream holds the dense and the compressed model at "
                       f"once: the compressed copy needs {need / 2**30:.2f} GiB more "
                       f"({total / 2**30:.2f} GiB for the pair) but only {free / 2**30:.2f} GiB "
                       f"are free; {ONE_MODEL_VIEWS}.")
