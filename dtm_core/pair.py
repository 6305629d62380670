"""A dense model and its compressed counterpart.

A recipe pair is a *shared copy* of the dense model: a second module tree whose every parameter and
buffer is the dense model's own tensor, except the weights the recipe replaces. So a pair costs the
dense model plus the changed tensors, and the dense side is never touched.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .compress import Applied, Recipe, apply_recipe
from .errors import DTMError
from .generation import encode_prompts, model_device
from .models import LoadedModel, same_tokenizer


@dataclass
class Pair:
    dense: LoadedModel
    compressed: torch.nn.Module
    label: str
    recipe: Recipe | None = None
    compressed_source: str | None = None
    applied: Applied | None = None
    config: dict = field(default_factory=dict)

    @property
    def tokenizer(self):
        return self.dense.tokenizer


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A new module tree that shares every parameter and buffer tensor with ``model``."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def input_norms(model, paths: Sequence[str], seqs: Sequence[Sequence[int]],
                batch_size: int = 8) -> dict[str, torch.Tensor]:
    """L2 norm of each input feature of the modules at ``paths`` over every real token."""
    sums: dict[str, torch.Tensor | None] = {p: None for p in paths}
    live_mask: list[torch.Tensor] = []

    def hook_for(path):
        def hook(module, args):
            x = args[0].float()
            m = live_mask[0].to(x.device)[..., None]
            s = (x * x * m).sum(dim=tuple(range(x.dim() - 1)))
            sums[path] = s if sums[path] is None else sums[path] + s
        return hook

    handles = [model.get_submodule(p).register_forward_pre_hook(hook_for(p)) for p in paths]
    try:
        dev = model_device(model)
        pad = 0
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width))
            for j, s in enumerate(chunk):
                ids[j, :len(s)] = torch.tensor(s)
                mask[j, :len(s)] = 1
            live_mask[:] = [mask]
            model(input_ids=ids.to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {p: s.sqrt() for p, s in sums.items()}


def make_pair(dense: LoadedModel, recipe: Recipe, calibration: Sequence[str] | None = None,
              chat: bool = False) -> Pair:
    """The dense model and a shared copy compressed by ``recipe``.

    ``calibration`` prompts measure input activations for wanda (the prompt set being evaluated,
    or a separate calibration set).
    """
    recipe.components(dense.model)  # validate selections before copying anything
    norms = None
    if recipe.needs_calibration:
        if not calibration:
            raise DTMError("wanda needs calibration prompts: give a prompt set or --calibration.")
        seqs = encode_prompts(dense.tokenizer, list(calibration), chat=chat)
        # measured on the dense model, whose modules have the same paths as the copy's
        norms = lambda comps: input_norms(dense.model, [c.path for c in comps], seqs)  # noqa: E731
    comp = shared_copy(dense.model)
    applied = apply_recipe(comp, recipe, norms)
    return Pair(dense=dense, compressed=comp, label=str(recipe), recipe=recipe, applied=applied)


def checkpoint_pair(dense: LoadedModel, compressed: LoadedModel) -> Pair:
    """A pair of two checkpoints of the same base; refuses tokenizers that differ."""
    if not same_tokenizer(dense.tokenizer, compressed.tokenizer):
        raise DTMError(f"The tokenizers of '{dense.source}' and '{compressed.source}' differ, so "
                       "their tokens cannot be compared; pick checkpoints of the same base model.")
    if model_device(compressed.model) != model_device(dense.model):
        compressed.model.to(model_device(dense.model))
    return Pair(dense=dense, compressed=compressed.model, label=compressed.source,
                compressed_source=compressed.source)


def tensor_bytes(*models: torch.nn.Module) -> int:
    """Bytes of the distinct tensor storages that the given models hold together."""
    seen: dict[int, int] = {}
    for m in models:
        for t in itertools.chain(m.parameters(), m.buffers()):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def open_pair(dense: LoadedModel, *, compress: str | None = None, components: str = "*.*",
              recipe: Recipe | None = None, compressed_model: str | None = None,
              calibration: Sequence[str] | None = None, chat: bool = False,
              load_kwargs: dict | None = None) -> Pair:
    """Build a pair from user-level strings: a spec + selection, a recipe, or a second checkpoint."""
    from .models import load_model

    given = [x for x in (compress, recipe, compressed_model) if x]
    if len(given) != 1:
        raise DTMError("Give exactly one compressed side: a compression spec (with a component "
                       "selection), a recipe file, or a compressed checkpoint.")
    if compressed_model:
        return checkpoint_pair(dense, load_model(compressed_model, **(load_kwargs or {})))
    if recipe is None:
        recipe = Recipe.single(compress, components or "*.*")
    return make_pair(dense, recipe, calibration=calibration, chat=chat)
