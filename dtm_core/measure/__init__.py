"""What a pair's numbers are: the metrics registry, divergence, streaming, prompt sets and their evaluation, the KLD report, exports."""

# the diagnostics register their metrics on import: every view has them
from dtm_core.measure import diagnostics  # noqa: E402,F401
