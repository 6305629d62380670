"""The compression-method registry: one file per method, found by the spec's name.

    from dtm_core.methods import parse_spec, register, Method
    parse_spec("int4:g128")        # -> RTN(bits=4, group=128, asym=False)

A method is a frozen dataclass subclassing :class:`~dtm_core.compression.methods.base.Method`, decorated with
:func:`register`. Everything else (recipes, pairs, sweeps, level curves, plans, the app's presets,
the CLI's help) asks the registry; nothing branches on a method's name. Registering a new method
needs no change to any engine file.
"""
from __future__ import annotations

from dtm_core.compression.methods.base import Method
from dtm_core.compression.methods.registry import (METHODS, accepted_forms, bad_spec, register,
                                                   unregister)

Spec = Method                            # the old name of a parsed spec


def method_class(head: str) -> type[Method] | None:
    for cls in METHODS.values():
        if cls.matches(head):
            return cls
    return None


def parse_spec(spec) -> Method:
    """Parse a spec string; a bad one raises DTMError naming the accepted forms."""
    if isinstance(spec, Method):
        return spec
    if not isinstance(spec, str):
        raise bad_spec(str(spec))
    text = spec.strip().lower()
    head, *options = text.split(":")
    cls = method_class(head)
    if cls is None:
        raise bad_spec(spec)
    if getattr(cls, "keeps_case", False):     # options that name files keep their case
        options = spec.strip().split(":")[1:]
    return cls.parse(head, options, spec)


def presets() -> list[str]:
    """The specs the app lists, from every registered method (quantization first)."""
    order = sorted(METHODS.values(), key=lambda c: c.family != "quantization")
    return [p for cls in order for p in cls.presets]


def level_methods() -> list[str]:
    """Method names that level curves accept (e.g. magnitude, int, int:g128)."""
    return [m for cls in METHODS.values() for m in cls.level_methods]


def level_spec(method: str, level: float) -> Method:
    """The spec of one level-curve point: ``method`` (a name with options, e.g. ``int:g128``) at
    ``level``."""
    from dtm_core.errors import DTMError

    head, _, options = str(method).strip().lower().partition(":")
    cls = METHODS.get(head) or method_class(head)
    if cls is None or cls.level_axis is None:
        raise DTMError(f"Unknown level-curve method '{method}': use "
                       f"{', '.join(level_methods())}.")
    return cls.at_level(level, options)


# the built-in methods register themselves on import
# (in this order, which is the order of the accepted forms and of the app's presets)
from dtm_core.compression.methods import (none, magnitude, nm, wanda, sparsegpt, rtn, gptq, awq,  # noqa: E402,F401,I001
                                          w8a8, fp8, nvfp4, mx, w4afp8, kv, checkpoint)

__all__ = ["METHODS", "Method", "Spec", "accepted_forms", "bad_spec", "level_methods",
           "level_spec", "parse_spec", "presets", "register", "unregister"]
