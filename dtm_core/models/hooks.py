"""Forward hooks that are always removed: the one way the engine observes or alters a module.

    with hooks.attached(layers, fn):                 # fn(i, module, args, output)
        model(ids)
    with hooks.attached(mods, fn, pre=True):          # fn(i, module, args) -> new args or None
        ...
    with hooks.outputs(layers) as outs:              # each layer's hidden-state output, in order
        model(ids)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch


@contextmanager
def attached(modules: Sequence[torch.nn.Module], fn: Callable, *, pre: bool = False,
             with_kwargs: bool = False) -> Iterator[None]:
    """Register ``fn`` on every module (a forward hook, or a pre-hook with ``pre``), called with
    the module's index first; every handle is removed on exit, also after an exception."""
    handles = []
    try:
        for i, mod in enumerate(modules):
            def hook(*a, _i=i):
                return fn(_i, *a)
            if pre:
                handles.append(mod.register_forward_pre_hook(hook, with_kwargs=with_kwargs))
            else:
                handles.append(mod.register_forward_hook(hook, with_kwargs=with_kwargs))
        yield
    finally:
        for h in handles:
            h.remove()


def hidden_of(out) -> torch.Tensor:
    """The hidden states of a decoder layer's output (a tensor or a tuple starting with it)."""
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def outputs(modules: Sequence[torch.nn.Module], transform: Callable | None = None
            ) -> Iterator[list]:
    """Collect each module's hidden-state output (through ``transform`` if given), in call
    order."""
    store: list = []

    def keep(i, module, args, out):
        h = hidden_of(out)
        store.append(transform(h) if transform else h)
    with attached(modules, keep):
        yield store


def layer_call(layer, args: tuple, kwargs: dict, cache) -> tuple[tuple, dict]:
    """The recorded call of a decoder layer with ``past_key_values`` set to ``cache`` (None: no
    cache, and none kept alive by the recording)."""
    import inspect

    names = list(inspect.signature(layer.forward).parameters)
    if "past_key_values" in names and names.index("past_key_values") < len(args):
        args = list(args)
        args[names.index("past_key_values")] = cache
        return tuple(args), {**kwargs, "use_cache": cache is not None}
    return args, {**kwargs, "past_key_values": cache, "use_cache": cache is not None}


def recording(layers, rec: list):
    """Record each decoder layer's call (args, kwargs) into ``rec`` during a forward pass."""
    def keep(i, module, args, kwargs):
        rec[i] = layer_call(module, args, dict(kwargs), None)
    return attached(layers, keep, pre=True, with_kwargs=True)


def run_layer(layer, hidden, args: tuple, kwargs: dict):
    """A decoder layer's output hidden states for ``hidden`` with a recorded call's other
    arguments."""
    if args:
        out = layer(hidden, *args[1:], **kwargs)
    else:
        out = layer(**{**kwargs, "hidden_states": hidden})
    return hidden_of(out)
