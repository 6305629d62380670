"""DTM Inspector engine: where and how a compressed LLM stops behaving like its dense original.

UI-free: the Gradio app and the CLI (``python -m dtm_core``) both call these functions, through
:mod:`dtm_core.jobs`. The packages, each one concern (``docs/architecture.md`` maps them):

- :mod:`dtm_core.models`: where a side's model comes from and how it runs (sources, families,
  components, hooks, generation, other tools' checkpoints)
- :mod:`dtm_core.compression`: what makes the compressed side (methods, recipes, calibration,
  pairs, IntactKV)
- :mod:`dtm_core.measure`: a pair's numbers (metrics, divergence, streaming, prompt sets, KLD,
  exports)
- :mod:`dtm_core.analysis`: where a divergence comes from (sweeps, level curves, explain, sinks)
- :mod:`dtm_core.planning`: what to compress (plans, budgets, exports to other tools)
- :mod:`dtm_core.cli`: the command line, one module per command

Old module names (``dtm_core.measure.metrics``, ``dtm_core.compression.methods``, ...) keep working: see
:mod:`dtm_core.moved`.
"""
from dtm_core import moved as _moved
from dtm_core.errors import DTMError

_moved.install()

__version__ = "0.1.0"
METRIC_VERSION = 4  # bump when a metric's definition or precision changes (keys cached results)

__all__ = ["DTMError", "__version__", "METRIC_VERSION"]
