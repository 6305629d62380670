"""The reports' charts and tables: the KLD report's histograms, the KL-by-confidence view
(Prompt sets and KLD report) and a mixed plan's per-kind curves of its cells."""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .figstyle import tidy
from .render import significant


def kld_figures(values) -> tuple[go.Figure, go.Figure]:
    import numpy as np

    kld = px.histogram(x=np.asarray(values.kld), nbins=60, log_y=True,
                       title="KL divergence per scored position", labels={"x": "KLD (nats)"})
    dp = px.histogram(x=np.exp(values.logp_comp) - np.exp(values.logp_base), nbins=60,
                      log_y=True, title="Δp: change in the probability of the real next token",
                      labels={"x": "Δp"})
    for fig in (kld, dp):
        fig.update_layout(height=300)
    return tidy(kld), tidy(dp)


def confidence_figure(table, agree_label: str = "top-1 agreement") -> go.Figure:
    """KL by the dense model's top-token probability: per bucket the share of positions and
    the share of the total KL (bars), and the mean KL (a line on its own axis)."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    x = list(table.bucket)
    fig.add_bar(x=x, y=table.share, name="share of positions")
    fig.add_bar(x=x, y=table.kl_share, name="share of total KL")
    fig.add_scatter(x=x, y=table.kl_mean, name="mean KL (nats)", mode="lines+markers",
                    secondary_y=True)
    if "agree" in table:
        fig.add_scatter(x=x, y=table.agree, name=agree_label, mode="lines+markers",
                        line=dict(dash="dot"))
    fig.update_yaxes(title_text="share", range=[0, 1.02], secondary_y=False)
    fig.update_yaxes(title_text="mean KL (nats)", secondary_y=True, rangemode="tozero")
    fig.update_xaxes(title_text="dense model's probability of its top token", type="category")
    fig.update_layout(title="KL by the dense model's confidence", height=360,
                      barmode="group", margin=dict(l=50, r=50, t=90, b=50),
                      legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0))
    return tidy(fig)


CONFIDENCE_HEADERS = {"bucket": "dense p(top)", "positions": "positions",
                      "share": "positions (%)", "kl_mean": "mean KL (nats)",
                      "kl_share": "share of KL (%)", "agree": "agreement (%)"}


def confidence_rows(table):
    """The KL-by-confidence table as people read it (shares in %)."""
    out = table[[c for c in CONFIDENCE_HEADERS if c in table]].copy()
    for c in ("share", "kl_share", "agree"):
        if c in out:
            out[c] = (100 * out[c]).round(1)
    out["kl_mean"] = out["kl_mean"].map(lambda v: significant(v))
    return out.rename(columns=CONFIDENCE_HEADERS)


def confidence_view(elem_id: str, table_label: str, plot_label: str):
    """The KL-by-confidence table and plot side by side (``#ELEM_ID``, ``#ELEM_ID-plot``), as
    Prompt sets and the KLD report show them."""
    import gradio as gr

    with gr.Row():
        table = gr.Dataframe(label=table_label, headers=list(CONFIDENCE_HEADERS.values()),
                             elem_id=elem_id, interactive=False)
        plot = gr.Plot(label=plot_label, elem_id=f"{elem_id}-plot")
    return table, plot


def _objective_column(cells: pd.DataFrame) -> str:
    """The plan's objective in its cells: fdt_mean, or a draft plan's accept_len_kK_mean."""
    return next((c for c in cells.columns if c.startswith("accept_len_k")), "fdt_mean")


def cell_curves(cells: pd.DataFrame) -> pd.DataFrame:
    """The level curves inside a mixed plan's cells: per kind and candidate, the mean over
    layers of the single-component fit mean FDT, against bits per weight (kept choices left
    out)."""
    from dtm_core.planning.allocation import KEEP

    t = cells[cells.spec != KEEP].copy()
    t["kind"] = t.component.str.split(".", n=1).str[1]
    value = _objective_column(cells)
    out = t.groupby(["kind", "spec"], sort=False).agg(
        bits_per_weight=("bits_per_weight", "mean"), sparsity=("sparsity", "mean"),
        **{value: (value, "mean")}, kl_mean=("kl_mean", "mean")).reset_index()
    order = {k: i for i, k in enumerate(dict.fromkeys(t.kind))}     # kinds in model order
    out["_order"] = out.kind.map(order)
    return out.sort_values(["_order", "bits_per_weight"], kind="stable").drop(
        columns="_order").reset_index(drop=True)


def cells_figure(cells: pd.DataFrame) -> go.Figure:
    """:func:`cell_curves` as one line per kind."""
    curves = cell_curves(cells)
    value = _objective_column(cells)
    fig = px.line(curves, x="bits_per_weight", y=value, color="kind", markers=True,
                  hover_data=["spec", "sparsity", "kl_mean"],
                  title="Each kind alone (mean over layers of its cells, fit prompts)",
                  labels={"bits_per_weight": "bits per weight", "fdt_mean": "mean FDT (tokens)",
                          value: value.replace("_mean", "").replace(
                              "accept_len_k", "accepted per step, drafting ")})
    fig.update_layout(height=320)
    return tidy(fig)


ESTIMATED = {"kl_mean": "kl_estimate", "fdt_mean": "fdt_estimate"}


def estimated_heatmap(table: pd.DataFrame, metric: str) -> go.Figure:
    """The layers x kinds heatmap of a sweep being refined (columns of
    :func:`dtm_core.analysis.sweep.refine.merged_table`): exact cells as measured, the others
    their estimate marked "≈" (KL and FDT; other metrics exist for exact cells only)."""
    from dtm_core.analysis.sweep import heatmap_frame, heatmap_metrics

    labels = heatmap_metrics()
    t = table.copy()
    est = ESTIMATED.get(metric)
    t["value"] = t[metric].where(t.exact, t[est] if est else float("nan"))
    t["mark"] = t.exact.map({True: "", False: "≈"})
    t["how"] = t.exact.map({True: "exact", False: "estimate"})
    z, mark, how = (heatmap_frame(t, c) for c in ("value", "mark", "how"))
    exact = int(t.exact.sum())
    fig = go.Figure(go.Heatmap(
        z=z.values.tolist(), x=list(z.columns), y=list(z.index), text=mark.values.tolist(),
        customdata=how.values.tolist(),
        texttemplate="%{text}", textfont=dict(size=11),
        colorscale="RdYlGn" if metric.startswith("fdt") else "RdYlGn_r",
        hovertemplate="layer %{y}, %{x}<br>" + labels.get(metric, metric) +
                      " %{z:.4g} (%{customdata})<extra></extra>"))
    fig.update_layout(height=max(300, 18 * len(z.index) + 120), yaxis_title="layer",
                      xaxis_title="kind",
                      title=f"{labels.get(metric, metric)} when one component is compressed "
                            f"alone: {exact} of {len(t)} cells exact, ≈ estimated",
                      margin=dict(l=50, r=20, t=50, b=40), yaxis=dict(autorange="reversed"))
    return tidy(fig, ("yaxis",))


def length_ratio_figure(res):
    """Histogram of the free-running length ratios (compressed / dense) in log2 bins; None
    without a free run."""
    from dtm_core.measure.freerun import lengths_histogram

    if "len_ratio" not in res.table:
        return None
    h = lengths_histogram(res.table.len_ratio)
    labels = [f"{lo:.2g}–{hi:.2g}" for lo, hi in zip(h.low, h.high)]
    fig = go.Figure(go.Bar(x=labels, y=h.prompts, marker_color="#7a5195",
                           hovertemplate="ratio %{x}<br>%{y} prompts<extra></extra>"))
    fig.add_vline(x=(len(labels) - 1) / 2, line_dash="dot", line_color="#888")
    fig.update_layout(height=300, margin=dict(l=40, r=20, t=50, b=60),
                      title="Length ratio c/d (free run)",
                      xaxis_title="length ratio", yaxis_title="prompts")
    return tidy(fig)
