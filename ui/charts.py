"""The reports' charts and tables: the KLD report's histograms and the KL-by-confidence view
(Prompt sets and KLD report)."""
from __future__ import annotations

import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

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
    return kld, dp


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
    return fig


def confidence_rows(table):
    """The KL-by-confidence table as people read it (shares in %)."""
    out = table[["bucket", "positions", "share", "kl_mean", "kl_share"]
                + (["agree"] if "agree" in table else [])].copy()
    for c in ("share", "kl_share", "agree"):
        if c in out:
            out[c] = (100 * out[c]).round(1)
    out["kl_mean"] = out["kl_mean"].map(lambda v: significant(v))
    return out.rename(columns={"bucket": "dense p(top)", "share": "positions (%)",
                               "kl_mean": "mean KL (nats)", "kl_share": "share of KL (%)",
                               "agree": "agreement (%)"})
