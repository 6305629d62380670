"""Sensitivity sweeps: compress one ``LAYER.KIND`` at a time and measure the divergence it causes.

Layers before the compressed one see exactly the dense model's inputs, so the dense pass records
every decoder layer's input once per prompt set (:mod:`.record`), and a cell reruns only the
layers at and after its component, then the final norm and the LM head (:mod:`.cell`). The shapes
and kernels are those of a full forward pass, so a cell's numbers equal
``divergence --components LAYER.KIND``.

Cells are stored on disk one at a time (:mod:`.store`: a small JSON file each, written atomically)
under a key of (model fingerprint, spec, prompt tokens, N, metric version): a stopped or killed
sweep resumes without recomputing finished cells, and a finished one loads instantly. :mod:`.run`
runs a sweep (alone or across torch.distributed ranks); :mod:`.timing` estimates how long one takes.
"""
from dtm_core.analysis.sweep.cell import (CELL_COLUMNS, ROW_CHUNK, WHOLE, cell_columns, cell_table,
                                          heatmap_frame, heatmap_metrics, summarize_cell,
                                          weight_error)
from dtm_core.analysis.sweep.record import SweepContext, continuation_hidden, prepare
from dtm_core.analysis.sweep.run import SweepResult, select_components, sweep
from dtm_core.analysis.sweep.store import CellStore, sweep_key
from dtm_core.analysis.sweep.timing import CELL_OF_FORWARD, estimate_seconds

__all__ = ["CELL_COLUMNS", "CELL_OF_FORWARD", "ROW_CHUNK", "WHOLE", "CellStore", "SweepContext",
           "SweepResult", "cell_columns", "cell_table", "continuation_hidden", "estimate_seconds",
           "heatmap_frame", "heatmap_metrics", "prepare", "select_components", "summarize_cell",
           "sweep", "sweep_key", "weight_error"]
