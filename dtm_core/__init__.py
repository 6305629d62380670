"""DTM Inspector engine: where and how a compressed LLM stops behaving like its dense original.

UI-free: the Gradio app and the CLI (``python -m dtm_core``) both call these functions.
"""
from .errors import DTMError

__version__ = "0.1.0"
METRIC_VERSION = 3  # bump when a metric's definition or precision changes (keys cached results)

__all__ = ["DTMError", "__version__", "METRIC_VERSION"]
