"""A dense model and its compressed counterpart.

A recipe pair is a *shared copy* of the dense model: a second module tree whose every parameter and
buffer is the dense model's own tensor, except the weights the recipe replaces. So a pair costs the
dense model plus the changed tensors, and the dense side is never touched.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import torch

from dtm_core.compression.calibration import Calibration, calibration_from
from dtm_core.compression.recipe import Applied, Recipe, apply_recipe
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

    @property
    def tokenizer(self):
        return self.dense.tokenizer


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A new module tree that shares every parameter and buffer tensor with ``model``."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


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
    recipe.components(dense.model)  # validate selections before copying anything
    calib = None
    if recipe.needs_calibration:
        names = ", ".join(sorted({i.spec.name for i in recipe.items if i.spec.needs}))
        calib = calibration_from(dense, calibration, chat, names)
    if sequential is None:
        sequential = recipe.sequential_default
    comp = shared_copy(dense.model)
    applied = apply_recipe(comp, recipe, calib, sequential=sequential)
    label = str(recipe) + (" (sequential)" if applied.layer_by_layer else "")
    return Pair(dense=dense, compressed=comp, label=label, recipe=recipe, applied=applied,
                calibration=calib)


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
