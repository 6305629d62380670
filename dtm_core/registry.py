"""The model and pair cache of the app and the CLI (kept under its old name; it lives in
:mod:`dtm_core.jobs` as :class:`~dtm_core.jobs.PairCache`)."""
from dtm_core.jobs import PairCache as Registry

__all__ = ["Registry"]
