"""Where a side's model comes from and how it runs: sources (the default GGUF, folders, the hub
cache, ``.gguf`` files), loading (:mod:`.load`), the family registry (:mod:`.families`), component
names (:mod:`.components`), hooks, generation and teacher-forced passes (:mod:`.generation`), and
other tools' checkpoints (:mod:`.checkpoints`, one module per format).

``from dtm_core.models import load_model`` keeps working: the names of the former
``dtm_core/models.py`` are re-exported here from :mod:`dtm_core.models.load` and
:mod:`dtm_core.models.sources`.
"""
from dtm_core.models.load import (LoadedModel, LoadedWeights, check_fits, checkpoint_weights,
                                  eos_ids, gguf_weights, load_model, max_positions, model_type_of,
                                  resolve_device, resolve_dtype, same_tokenizer, validate_source)
from dtm_core.models.sources import (DEFAULT_DESCRIPTION, DEFAULT_GGUF, cache_root,
                                     default_gguf_path, local_snapshot)

__all__ = ["DEFAULT_DESCRIPTION", "DEFAULT_GGUF", "LoadedModel", "LoadedWeights", "cache_root",
           "check_fits", "checkpoint_weights", "default_gguf_path", "eos_ids", "gguf_weights",
           "load_model", "local_snapshot", "max_positions", "model_type_of", "resolve_device",
           "resolve_dtype", "same_tokenizer", "validate_source"]
