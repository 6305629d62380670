"""Run sweep with "Estimate first": every cell's estimate on the heatmap at once, then exact
cells in place of estimated ones, most sensitive by estimate first, the heatmap redrawn as they
arrive; at the end the exact sweep's own outputs (every cell stored, so nothing is measured
twice), or the refined table when the top-K settled or the sweep was stopped."""
from __future__ import annotations

import queue
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from dtm_core.compression.intactkv import IntactKV
from dtm_core.compression.methods import parse_spec
from dtm_core.jobs import estimated_sweep
from dtm_core.measure.exports import write_table
from dtm_core.models.generation import encode_prompts

from . import common
from .charts import estimated_heatmap
from .common import STOPS
from .render import friendly, readable_table

REDRAW_S = 1.0    # at most one heatmap redraw a second while exact cells arrive


def agreement_line(table: pd.DataFrame) -> str:
    """Spearman's rank correlation of estimate and exact once five cells are exact."""
    from dtm_core.analysis.sweep.estimate import agreement

    a = agreement(table)
    if a["cells"] < 5:
        return ""
    return (f" Estimate against exact over {a['cells']} cells: Spearman {a['spearman_kl']:.2f} "
            f"on KL, {a['spearman_fdt']:.2f} on FDT.")


def _status(table: pd.DataFrame, seconds: float) -> str:
    return (f"Estimated {len(table)} cells in {seconds:.1f} s (≈ on the heatmap); measuring "
            f"exact cells, most sensitive by estimate first: {int(table.exact.sum())} of "
            f"{len(table)} exact.{agreement_line(table)}")


def sweep_handler(run_sweep):
    """The Run sweep button's handler around ``run_sweep`` (:func:`ui.sensitivity.run_sweep`,
    which runs the exact sweep as it always has), given by the tab that owns it."""
    def sweep_click(model, spec, upload, builtin, chat, new_tokens, layers, kinds, metric,
                    ikv_text="off", view="IntactKV", calibration=None, calibration_file=None,
                    calib_ctx=None, calib_samples=None, sequential=True, whole=False,
                    estimate_first=True, settle=0, request: gr.Request = None,
                    progress=gr.Progress()):
        yield from _sweep_click(run_sweep, model, spec, upload, builtin, chat, new_tokens,
                                layers, kinds, metric, ikv_text, view, calibration,
                                calibration_file, calib_ctx, calib_samples, sequential, whole,
                                estimate_first, settle, request, progress)
    return sweep_click


def _sweep_click(run_sweep, model, spec, upload, builtin, chat, new_tokens, layers, kinds,
                 metric, ikv_text, view, calibration, calibration_file, calib_ctx,
                 calib_samples, sequential, whole, estimate_first, settle, request, progress):
    """``run_sweep`` as it is, or (``estimate_first``, without IntactKV) estimates first and
    refinement, yielding the heatmap as it fills."""
    base = (model, spec, upload, builtin, chat, new_tokens, layers, kinds, metric, ikv_text,
            view, calibration, calibration_file, calib_ctx, calib_samples, sequential, whole)
    try:
        plain = not estimate_first or IntactKV.parse(ikv_text) is not None
    except Exception:  # noqa: BLE001 - run_sweep reports a bad setting in its own words
        plain = True
    if plain:
        yield run_sweep(*base, request=request, progress=progress)
        return
    try:
        parse_spec(spec)
        pset = common.load_set(upload, builtin)
        setting = common.calibration_setting(calibration, calibration_file, calib_ctx,
                                             calib_samples)
        k = int(settle or 0)
        if k < 0:
            raise ValueError("The settled top-K takes K >= 1, or 0 to measure every cell.")
        progress(0, desc="loading the model")
        dense = common.CACHE.dense(model)
        ids = encode_prompts(dense.tokenizer, pset.prompts, chat=bool(chat))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        yield None, None, friendly(exc), None, None, None
        return
    events: queue.Queue = queue.Queue()
    out: dict = {}
    t0 = time.perf_counter()

    def work(stop):
        try:
            out["res"] = estimated_sweep(
                dense, spec, ids, int(new_tokens), calibration=setting, chat=bool(chat),
                layers=(layers or "").strip() or None, kinds=(kinds or "").strip() or None,
                refine=0 if k else None, settle=k or None, stop=stop,
                on_estimate=lambda t: events.put(("estimate", t, time.perf_counter() - t0)),
                on_table=lambda t: events.put(("table", t, None)),
                progress=lambda f, m: events.put(("progress", f, m)))
        except Exception as exc:  # noqa: BLE001 - every failure becomes a message
            out["error"] = exc
        finally:
            events.put(("end", None, None))

    keep = (gr.update(),) * 3
    with STOPS.running("sweep", request) as stop:
        thread = threading.Thread(target=work, args=(stop,), daemon=True)
        thread.start()
        last, latest, est_s = 0.0, None, 0.0
        while True:
            kind, a, b = events.get()
            if kind == "progress":
                progress(a, desc=b)
                continue
            if kind == "end":
                break
            latest = a
            if kind == "estimate":
                est_s = b
            if kind == "estimate" or time.monotonic() - last >= REDRAW_S or events.empty():
                last = time.monotonic()
                yield (estimated_heatmap(latest, metric), gr.update(), _status(latest, est_s),
                       *keep)
        thread.join()
        stopped = stop.is_set()
    if "error" in out:
        yield None, None, friendly(out["error"]), None, None, None
        return
    res = out["res"]
    agree = agreement_line(res.table)
    if res.table.exact.all() and not stopped:
        final = list(run_sweep(*base, request=request, progress=progress))
        if final[2]:
            final[2] += f" Every cell was estimated first ({res.estimate.seconds:.1f} s).{agree}"
        yield tuple(final)
        return
    source = setting.source or common.upload_path(upload) or builtin
    yield _partial(res, dense, spec, pset, ids, chat, new_tokens, metric, k, stopped, agree,
                   source, setting.source)


def _partial(res, dense, spec, pset, ids, chat, new_tokens, metric, k, stopped, agree, source,
             explicit):
    """The outputs of a refinement that ended before every cell was exact: the merged table
    (estimates and exact cells) in the files and on the page; the exact cells in the state
    (what Plan and opening a cell use)."""
    table = res.table
    path = Path(tempfile.mkdtemp(prefix="dtm-sweep-")) / "sweep.csv"
    config = {"model": dense.source, "spec": str(parse_spec(spec)), "prompts": pset.name,
              "prompt_count": len(ids), "new_tokens": int(new_tokens), "chat": bool(chat),
              "estimate": {"probe": res.estimate.probe, "seconds": res.estimate.seconds},
              "cell_store": str(res.sweep.folder) if res.sweep else None}
    write_table(table, path, config)
    write_table(table, path.with_suffix(".parquet"))
    exact = res.sweep.table if res.sweep is not None else table.iloc[0:0]
    state = {"table": exact.to_dict("records"), "spec": str(parse_spec(spec)),
             "prompts": pset.prompts, "chat": bool(chat), "new_tokens": int(new_tokens),
             "calibration": source, "calibration_explicit": explicit,
             "estimated": table.to_dict("records")}
    n, total = int(table.exact.sum()), len(table)
    why = ("Stopped" if stopped else
           f"Settled: the top {k} stayed the same over the last {max(k, 3)} exact cells")
    msg = (f"{why}; {n} of {total} cells exact, the others estimated (≈) for {spec} on "
           f"{pset.name}. Set the settled top-K to 0 to measure every cell.{agree}")
    shown = readable_table(table, sort=["kl_estimate"], ascending=[False])
    return (estimated_heatmap(table, metric), shown, msg, str(path), state,
            str(path.with_suffix(".parquet")))
