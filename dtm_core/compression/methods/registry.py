"""The table of registered methods and the one error a bad spec raises (imported by the method
files; :mod:`dtm_core.compression.methods` builds parsing and listings on it)."""
from __future__ import annotations

from dtm_core.errors import DTMError

METHODS: dict = {}   # name -> method class, in registration order


def register(cls):
    """Add a method class to the registry (a decorator); a later class of the same name
    replaces the earlier one."""
    if not getattr(cls, "name", None) or not getattr(cls, "forms", None):
        raise TypeError(f"{cls.__name__} needs a 'name' and its accepted 'forms'.")
    METHODS[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    METHODS.pop(name, None)


def accepted_forms() -> str:
    forms = " | ".join(f for cls in METHODS.values() for f in cls.forms)
    return f"{forms}   (S a sparsity in [0, 1], B bits 2-8, G a group size)"


def bad_spec(spec: str, why: str = "") -> DTMError:
    return DTMError(f"Bad compression spec '{spec}'{': ' + why if why else ''}. "
                    f"Accepted forms: {accepted_forms()}.")


def parse_sparsity(spec: str, text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise bad_spec(spec, f"'{text}' is not a number") from None
    if not 0.0 <= s <= 1.0:
        raise bad_spec(spec, "sparsity must lie in [0, 1]")
    return s
