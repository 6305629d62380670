"""One layout rule for every figure of the page, so that no legend sits on a title or an axis
label and layer axes count in whole layers: the title at the top left, in the top margin; the
legend at the right of a plot with one y axis (Plotly's place for it, beside the plot area), and
below the x-axis title of a plot with a second y axis (whose title and ticks take the right
side), with the bottom margin grown to hold it."""
from __future__ import annotations

import math

import plotly.graph_objects as go

LEGEND_GAP_PX = 75        # from the bottom of the plot area past the x-axis title
LEGEND_ROW_PX = 24


def tidy(fig: go.Figure, integer_axes: tuple[str, ...] = ()) -> go.Figure:
    """``fig`` laid out by the page's rule (in place; returned for chaining). ``integer_axes``:
    the layout's axes (``"xaxis"``, ``"yaxis"``) that count whole units such as layers."""
    layout = fig.layout
    if layout.title.text:
        fig.update_layout(title=dict(x=0.01, xanchor="left", y=0.98, yanchor="top",
                                     yref="container", font=dict(size=15)))
    top = 60 if layout.title.text else 20
    margin = dict(t=max(top, layout.margin.t or 0))
    named = [t for t in fig.data if getattr(t, "showlegend", None) is not False and t.name]
    legend = len(named) > 1 or layout.showlegend
    second = fig.layout.to_plotly_json().get("yaxis2", {}).get("overlaying")
    if legend and second:
        # below the x-axis title: rows of about four entries across the width
        rows = math.ceil(len(named) / 3)
        bottom = LEGEND_GAP_PX + rows * LEGEND_ROW_PX + 10
        height = layout.height or 450
        plot = max(height - margin["t"] - bottom, 120)
        fig.update_layout(height=plot + margin["t"] + bottom,
                          legend=dict(orientation="h", x=0, xanchor="left",
                                      y=-LEGEND_GAP_PX / plot, yanchor="top"))
        margin["b"] = bottom
    elif legend:
        fig.update_layout(legend=dict(orientation="v", x=1.02, xanchor="left", y=1,
                                      yanchor="top"))
    fig.update_layout(margin=margin)
    for axis in integer_axes:
        fig.update_layout({axis: dict(tickformat="d", dtick=_whole_step(fig, axis))})
    return fig


def _whole_step(fig: go.Figure, axis: str) -> int:
    """A tick every k units, k whole, about 16 ticks at most."""
    letter = axis[0]
    values = []
    for trace in fig.data:
        v = getattr(trace, letter, None)
        if v is not None:
            values.extend(x for x in v if isinstance(x, (int, float)))
    if not values:
        return 1
    span = max(values) - min(values) + 1
    return max(1, math.ceil(span / 16))
