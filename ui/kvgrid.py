"""The Sensitivity tab's KV grid: every (K bits, V bits) of KV-cache quantization on all layers,
mean FDT and mean KL as two heatmaps that fill in cell by cell (``dtm_core.jobs.kv_grid``)."""
from __future__ import annotations

import os
import tempfile

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from dtm_core.analysis.kvgrid import COLUMNS, grid_matrix, parse_bits
from dtm_core.jobs import grid_rows
from dtm_core.measure.divergence import reference_continuations
from dtm_core.models.generation import encode_prompts

from . import common
from .common import STOPS
from .figstyle import tidy
from .render import friendly

HEADERS = {"k_bits": "K bits", "v_bits": "V bits", "cache_bits": "bits per cached value",
           "fdt_mean": "mean FDT (tokens)", "sdt_mean": "mean SDT", "kl_mean": "mean KL (nats)",
           "top1_agree_mean": "top-1 agreement"}


def grid_figure(table: pd.DataFrame, metric: str, k_bits, v_bits, title: str) -> go.Figure:
    """One metric over the whole K x V grid (cells not measured yet empty), values written in
    the cells."""
    full = pd.DataFrame(index=list(k_bits), columns=list(v_bits), dtype=float)
    if len(table):
        got = grid_matrix(table, metric)
        full.loc[got.index, got.columns] = got.values
    z = [[None if pd.isna(v) else float(v) for v in row] for row in full.values]
    fmt = "{:.1f}" if metric == "fdt_mean" else "{:.3g}"
    text = [["" if v is None else fmt.format(v) for v in row] for row in z]
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(v) for v in v_bits], y=[str(k) for k in k_bits], text=text,
        texttemplate="%{text}", colorscale="Viridis" if metric == "fdt_mean" else "Magma",
        reversescale=metric != "fdt_mean", colorbar=dict(title=metric.split("_")[0].upper()),
        hovertemplate="K %{y} bits, V %{x} bits: %{z}<extra></extra>"))
    fig.update_xaxes(title_text="value bits", type="category")
    fig.update_yaxes(title_text="key bits", type="category")
    fig.update_layout(title=title, height=380, margin=dict(l=60, r=20, t=60, b=50))
    return tidy(fig)


def _outputs(table, ks, vs, status, csv=None):
    return (grid_figure(table, "fdt_mean", ks, vs, "Mean FDT (tokens)"),
            grid_figure(table, "kl_mean", ks, vs, "Mean KL (nats)"),
            table[list(HEADERS)].rename(columns=HEADERS).round(4), status, csv)


def run_grid(model, upload, builtin, chat, new_tokens, k_text, v_text, group, grid_layers,
             request: gr.Request, progress=gr.Progress()):
    """A generator: the two heatmaps after every cell, then the CSV."""
    empty = pd.DataFrame(columns=COLUMNS)
    try:
        ks, vs = parse_bits(k_text), parse_bits(v_text)
        g = int(group) if group else None
        pset = common.load_set(upload, builtin)
        progress(0, desc="loading the model")
        dense = common.CACHE.dense(model)
        ids = encode_prompts(dense.tokenizer, pset.prompts, chat=bool(chat))
        yield _outputs(empty, ks, vs, "Dense references…")
        refs = reference_continuations(dense, ids, int(new_tokens))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        yield None, None, None, friendly(exc), None
        return
    rows = []
    cells = len(ks) * len(vs)
    layers = (grid_layers or "").strip() or "*"
    with STOPS.running("kvgrid", request) as stop:
        try:
            for row in grid_rows(dense, ids, int(new_tokens), k_bits=ks, v_bits=vs, group=g,
                                 layers=layers, references=refs):
                rows.append(row)
                table = pd.DataFrame(rows, columns=COLUMNS)
                progress(len(rows) / cells, desc=f"K {row['k_bits']} bits, V {row['v_bits']} "
                                                 "bits")
                yield _outputs(table, ks, vs, f"{len(rows)} of {cells} cells…")
                if stop.is_set():
                    break
        except Exception as exc:  # noqa: BLE001 - every failure becomes a message
            yield gr.update(), gr.update(), gr.update(), friendly(exc), None
            return
    table = pd.DataFrame(rows, columns=COLUMNS)
    fd, path = tempfile.mkstemp(prefix="kvgrid-", suffix=".csv")
    os.close(fd)
    table.to_csv(path, index=False)
    done = "Stopped" if len(table) < len(ks) * len(vs) else "Done"
    yield _outputs(table, ks, vs, f"{done}: {len(table)} cells, {len(ids)} prompts, "
                                  f"N = {int(new_tokens)}.", path)


def build(model, upload, builtin, chat, new_tokens) -> None:
    gr.Markdown("Every layer's keys quantized to K bits and values to V bits at once "
                "(`kv:intK` on `*.kcache`, `kv:intV` on `*.vcache`), for every (K, V), on the set "
                "and N above. Keys are stored after the rotary embedding; every query reads the "
                "stored entries.")
    with gr.Row():
        k_bits = gr.Textbox(value="2-8", label="Key bits", elem_id="kvg-k-bits")
        v_bits = gr.Textbox(value="2-8", label="Value bits", elem_id="kvg-v-bits")
        group = gr.Number(value=0, precision=0, minimum=0, label="Group size",
                          info="one scale per G values of a head; 0: one per vector",
                          elem_id="kvg-group")
        grid_layers = gr.Textbox(label="Layers (optional)", placeholder="all",
                                 elem_id="kvg-layers")
        with gr.Column(min_width=160):
            run = gr.Button("Run grid", variant="primary", elem_id="kvg-run")
            stop = gr.Button("Stop", variant="stop", elem_id="kvg-stop")
    status = common.StatusText("", elem_id="kvg-status")
    with gr.Row():
        fdt_plot = gr.Plot(label="Mean FDT by key and value bits (after Run grid)",
                           elem_id="kvg-fdt")
        kl_plot = gr.Plot(label="Mean KL by key and value bits (after Run grid)",
                          elem_id="kvg-kl")
    table = gr.Dataframe(label="Cells (after Run grid)", headers=list(HEADERS.values()),
                         interactive=False, elem_id="kvg-table", max_height=300)
    csv_file = gr.File(label="Grid CSV (after Run grid)", elem_id="kvg-csv")
    run.click(run_grid, [model, upload, builtin, chat, new_tokens, k_bits, v_bits, group,
                         grid_layers], [fdt_plot, kl_plot, table, status, csv_file],
              concurrency_id="model", api_name="run_kvgrid")
    stop.click(STOPS.stopper("kvgrid", "Stopping after the current cell…"), None, [status],
               queue=False)
