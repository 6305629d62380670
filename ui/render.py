"""Rendering: pure functions from engine results to HTML and plotly figures (data in, pictures
out). Nothing here runs a model."""
from __future__ import annotations

import html
import logging

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dtm_core.errors import user_error
from dtm_core.measure.evaluate import EvalResult
from dtm_core.measure.streaming import StreamState
from dtm_core.analysis.sweep import heatmap_frame, heatmap_metrics

from .figstyle import tidy


def friendly(exc: Exception) -> str:
    """The message a handler shows for a failure; the app keeps serving either way."""
    err = user_error(exc)
    if err is not None:
        return f"⚠️ {err}"
    logging.getLogger("dtm_inspector").exception("unexpected failure")
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"⚠️ Unexpected {type(exc).__name__}: {first}"


class TokenTexts:
    """Each token's text as it appears in the decoded string (multi-byte characters included),
    extended incrementally so that a stream decodes each prefix once."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.texts, self.prev = tokenizer, [], [], ""

    def __call__(self, ids: list[int]) -> list[str]:
        if ids[:len(self.ids)] != self.ids:
            self.ids, self.texts, self.prev = [], [], ""
        for k in range(len(self.ids), len(ids)):
            cur = self.tokenizer.decode(ids[:k + 1], skip_special_tokens=False)
            self.texts.append(cur[len(self.prev):] if cur.startswith(self.prev)
                              else self.tokenizer.decode([ids[k]]))
            self.prev = cur
        self.ids = list(ids)
        return self.texts


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    return TokenTexts(tokenizer)(ids)


def _top_text(tokenizer, top: list[tuple[int, float]]) -> str:
    return ", ".join(f"{tokenizer.decode([i])!r} {p:.2f}" for i, p in top)


def visible(text: str) -> str:
    """A token's text as HTML with its whitespace kept and newlines shown as ⏎ (then broken)."""
    return html.escape(text).replace("\n", '<span class="nl">⏎</span>\n')


def card_head(label: str, hint: str) -> str:
    """The label of a metric card, with its definition on hover."""
    return f'<div class="metric-head" title="{html.escape(hint)}">{html.escape(label)}</div>'


def card_sub(text_html: str) -> str:
    """The line under a card's number (``<span class="n-tokens">`` shows the page's N)."""
    return f'<div class="metric-sub">{text_html}</div>'


FDT_HINT = ("First divergent token: how many tokens the compressed model reproduces exactly before "
            "its greedy output first differs from the dense model's (N when it never does).")
SDT_HINT = ("Share of divergent tokens: the share of positions where the compressed model's "
            "argmax, given the dense prefix, differs from the dense token.")
ACCEPT_HINT = ("The compressed model as a self-speculative draft for the dense one: drafting "
               "4 tokens at a time from the dense prefix, the mean number the dense model "
               "accepts per verification step under greedy verification (exact, from the "
               "teacher-forced agreement).")
N_TOKENS = '<span class="n-tokens">N</span>'


def accept_from_sdt_map(sdt_map: str | None, k: int = 4) -> str:
    """The acceptance card from the finished run's SDT map (its tokens in order, each marked
    agree or disagree: the engine's teacher-forced agreement): accepted draft tokens per
    verification step when the compressed model drafts ``k`` (exact, as ``accept_len_k4``)."""
    import re

    from dtm_core.measure.metrics import acceptance

    ok = [m == "agree" for m in re.findall(r'class="tok (agree|disagree)"', sdt_map or "")]
    if not ok:
        return "–"
    a, _, steps = acceptance(ok, k)
    return f"{a / steps:.2f}"


def render_column(tokenizer, state: StreamState, side: str, fdt: int | None,
                  texts: TokenTexts | None = None) -> str:
    """A column of token spans with data-pos, divergence classes and top-5 hover text."""
    steps = [s for s in state.steps if (s.dense_token if side == "dense" else s.comp_token)
             is not None]
    ids = [s.dense_token if side == "dense" else s.comp_token for s in steps]
    texts = (texts or TokenTexts(tokenizer))(ids)
    spans = []
    for s, text in zip(steps, texts):
        cls = ["tok"]
        if fdt is not None and s.pos == fdt:
            cls.append("first-divergent")
        elif fdt is not None and s.pos > fdt:
            cls.append("after-divergence")
        if side == "dense":
            hover = (f"pos {s.pos} | dense top-5: {_top_text(tokenizer, s.dense_top)} | "
                     f"compressed top-5 (same prefix): {_top_text(tokenizer, s.forced_top)}")
        else:
            hover = (f"pos {s.pos} | compressed top-5: {_top_text(tokenizer, s.comp_top)} | "
                     f"dense top-5 (dense prefix): {_top_text(tokenizer, s.dense_top)}")
        spans.append(f'<span class="{" ".join(cls)}" data-pos="{s.pos}" '
                     f'title="{html.escape(hover)}">{visible(text)}</span>')
    return f'<div class="tokens">{"".join(spans)}</div>'


def render_sdt_map(tokenizer, refs: list[int], agree: list[bool]) -> str:
    """The dense continuation, each token marked by whether the compressed argmax agrees."""
    spans = []
    for pos, (text, ok) in enumerate(zip(token_texts(tokenizer, refs), agree)):
        spans.append(f'<span class="tok {"agree" if ok else "disagree"}" data-pos="{pos}" '
                     f'title="pos {pos}: compressed argmax {"agrees" if ok else "differs"}">'
                     f"{visible(text)}</span>")
    return f'<div class="tokens sdt-map">{"".join(spans)}</div>'


def position_plot(state: StreamState, fdt: int | None = None) -> go.Figure:
    """KL per position (bars) and both models' probability of the dense token, with the first
    divergent token marked (``fdt``: the engine's; default the stream's)."""
    fdt = state.fdt if fdt is None else fdt
    steps = [s for s in state.steps if s.dense_token is not None]
    pos = [s.pos for s in steps]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=pos, y=[s.kl for s in steps], name="KL(dense || compressed)",
                         marker_color="#c0392b", opacity=0.55), secondary_y=False)
    fig.add_trace(go.Scatter(x=pos, y=[s.p_dense for s in steps], name="p_dense(dense token)",
                             mode="lines+markers"), secondary_y=True)
    fig.add_trace(go.Scatter(x=pos, y=[s.p_comp for s in steps], name="p_compressed(dense token)",
                             mode="lines+markers"), secondary_y=True)
    fig.update_layout(height=300, margin=dict(l=40, r=40, t=30, b=30),
                      legend=dict(orientation="h", y=1.15), xaxis_title="position")
    fig.update_yaxes(title_text="KL (nats)", secondary_y=False)
    fig.update_yaxes(title_text="probability", range=[0, 1], secondary_y=True)
    if fdt is not None and any(s.pos == fdt for s in steps):
        fig.add_vline(x=fdt, line_dash="dash", line_color="#e74c3c",
                      annotation_text=f"first divergent token (pos {fdt})",
                      annotation_position="top left")
    return tidy(fig, ("xaxis",))


def fdt_badge(state: StreamState, final: int | None = None) -> str:
    if final is not None:
        return str(final)
    f = state.fdt
    return str(f) if f is not None else f"≥{len(state.dense_tokens)}"


def summary_cards(res: EvalResult) -> str:
    s = res.summary
    cards = [("Mean FDT", f"{s['fdt_mean']:.2f}"), ("Median FDT", f"{s['fdt_median']:.1f}"),
             ("Mean SDT", f"{s['sdt_mean']:.1%}"), ("Mean KL", f"{s['kl_mean']:.4f}"),
             ("Perplexity change", f"{s.get('ppl_change', float('nan')):+.1%}")]
    if "accept_len_k4_mean" in s:
        cards.append(("Accepted per step as a draft, K = 4 / 8",
                      f"{s['accept_len_k4_mean']:.2f} / {s['accept_len_k8_mean']:.2f}"))
    if "top5_hit_mean" in s:
        cards.append(("Dense token in compressed top 5", f"{s['top5_hit_mean']:.1%}"))
    if "js_mean" in s:
        cards.append(("Jensen-Shannon / reverse KL",
                      f"{s['js_mean']:.4f} / {s['reverse_kl_mean']:.4f}"))
    if "accuracy_dense" in s:
        cards.append(("Accuracy dense → compressed",
                      f"{s['accuracy_dense']:.1%} → {s['accuracy_compressed']:.1%}"))
        cards.append(("Δ accuracy (95 % CI)",
                      f"{s['accuracy_delta']:+.1%} [{s['accuracy_delta_ci95_low']:+.1%}, "
                      f"{s['accuracy_delta_ci95_high']:+.1%}]"))
    if "flips_correct_to_wrong" in s:
        cards.append(("Flips correct → wrong / wrong → correct",
                      f"{s['flips_correct_to_wrong']} / {s['flips_wrong_to_correct']} "
                      f"(McNemar p = {s['accuracy_mcnemar_p']:.3g})"))
    if "loop_rate_compressed" in s:
        cards.append(("Loop rate dense → compressed",
                      f"{s['loop_rate_dense']:.1%} → {s['loop_rate_compressed']:.1%}"))
        cards.append(("Length ratio compressed / dense (mean / median)",
                      f"{s['len_ratio_mean']:.2f} / {s['len_ratio_median']:.2f}"))
        cards.append(("Rejoin the dense text after diverging", f"{s['rejoin_share']:.1%}"))
    if "answer_agreement" in s:
        cards.append(("Final answers agree", f"{s['answer_agreement']:.1%}"))
    body = "".join(f'<div class="card"><div class="card-label">{html.escape(k)}</div>'
                   f'<div class="card-value">{html.escape(v)}</div></div>' for k, v in cards)
    return f'<div class="cards">{body}</div>'


def set_plots(res: EvalResult, n: int):
    t = res.table
    hist = px.histogram(t, x="fdt", nbins=min(n + 1, 50), title="FDT histogram")
    hist.update_xaxes(range=[-0.5, n + 0.5])
    surv = px.line(res.survival, x="position", y="surviving", markers=True,
                   title="Survival: share of prompts with no divergence up to position t")
    surv.update_yaxes(range=[0, 1.02])
    scat = px.scatter(t, x="fdt", y="ppl_change", hover_data=["prompt_index", "line"],
                      title="Per-prompt perplexity change vs FDT (what perplexity misses)",
                      labels={"ppl_change": "PPL compressed / dense - 1"})
    for fig in (hist, surv, scat):
        fig.update_layout(height=300, margin=dict(l=40, r=20, t=50, b=40))
    return tidy(hist, ("xaxis",)), tidy(surv), tidy(scat)




def sink_figures(shares, acts) -> tuple[go.Figure, go.Figure]:
    """Heatmaps (layer x head) of attention share on the pivots, dense next to compressed, and
    the per-layer massive-activation ratio."""
    models = ["dense", "compressed"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=[f"{m}" for m in models],
                        horizontal_spacing=0.08)
    for c, m in enumerate(models, 1):
        z = shares[shares.model == m].pivot(index="layer", columns="head", values="share")
        fig.add_trace(go.Heatmap(z=z.values, x=list(z.columns), y=list(z.index), zmin=0, zmax=1,
                                 colorscale="Viridis", showscale=c == 2,
                                 hovertemplate=f"{m}<br>layer %{{y}}, head %{{x}}<br>"
                                               "attention on pivots %{z:.3f}<extra></extra>"),
                      row=1, col=c)
    fig.update_yaxes(autorange="reversed", title_text="layer", row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    fig.update_xaxes(title_text="head")
    fig.update_layout(height=max(320, 14 * shares.layer.nunique() + 120),
                      title="Share of attention that later queries put on the pivot tokens",
                      margin=dict(l=50, r=20, t=70, b=40))
    act = px.line(acts, x="layer", y="ratio", color="model", markers=True, log_y=True,
                  hover_data=["pivot_max", "other_max", "median_abs"],
                  title="Massive activations: largest |hidden| at the pivots / median |hidden| "
                        "elsewhere")
    act.update_layout(height=300, margin=dict(l=50, r=20, t=50, b=40))
    return tidy(fig), tidy(act)



def sensitivity_heatmap(table, metric: str, suffix: str = "", diverging: bool = False
                        ) -> go.Figure:
    labels = heatmap_metrics()
    z = heatmap_frame(table, metric)
    params = heatmap_frame(table, "params")
    good_high = metric.startswith("fdt")
    extra = {}
    if diverging:
        lim = float(abs(z.values).max()) or 1.0
        extra = dict(zmid=0, zmin=-lim, zmax=lim)
    fig = go.Figure(go.Heatmap(
        z=z.values, x=list(z.columns), y=list(z.index), customdata=params.values, **extra,
        colorscale="RdYlGn" if good_high else "RdYlGn_r",
        hovertemplate="layer %{y}, %{x}<br>" + labels.get(metric, metric) + " %{z:.4g}<br>"
                      "params %{customdata:,}<extra></extra>"))
    fig.update_layout(height=max(300, 18 * len(z.index) + 120), yaxis_title="layer",
                      xaxis_title="kind", title=f"{labels.get(metric, metric)} when one component is "
                                                f"compressed alone{suffix}",
                      margin=dict(l=50, r=20, t=50, b=40), yaxis=dict(autorange="reversed"))
    return tidy(fig, ("yaxis",))


def lens_figure(e) -> go.Figure:
    """The logit lens of an explanation: per layer the log-probabilities of the dense and the
    compressed token in both models (lines), KL(dense lens || compressed lens) (bars), and the
    layer where the compressed lens first prefers its own token (marked)."""
    lens = e.lens
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=lens.layer, y=lens.kl, name="KL(dense lens || compressed lens)",
                         marker_color="#c0392b", opacity=0.45), secondary_y=True)
    d, c = e.tokens.get("dense", ""), e.tokens.get("compressed", "")
    for col, name, dash, color in (
            ("dense_logp_dense_token", f"dense model: {visible_plain(d)!s}", "solid", "#1f77b4"),
            ("compressed_logp_dense_token", f"compressed model: {visible_plain(d)!s}", "dash",
             "#1f77b4"),
            ("dense_logp_compressed_token", f"dense model: {visible_plain(c)!s}", "solid",
             "#ff7f0e"),
            ("compressed_logp_compressed_token", f"compressed model: {visible_plain(c)!s}",
             "dash", "#ff7f0e")):
        fig.add_trace(go.Scatter(x=lens.layer, y=lens[col], name=name, mode="lines+markers",
                                 line=dict(dash=dash, color=color)), secondary_y=False)
    flip = e.lens_flip_layer
    if flip is not None:
        fig.add_vline(x=flip, line_dash="dot", line_color="#c0392b")
        fig.add_annotation(x=flip, y=1.0, yref="paper", showarrow=False, xanchor="right",
                           text=f"compressed lens prefers its token from layer {flip}",
                           font=dict(color="#c0392b", size=11))
    fig.update_yaxes(title_text="log-probability", secondary_y=False)
    fig.update_yaxes(title_text="KL (nats)", secondary_y=True)
    fig.update_xaxes(range=[-0.5, len(lens) - 0.5], title_text="layer")
    fig.update_layout(height=460, legend=dict(orientation="h", y=-0.2, x=0),
                      title=f"Logit lens at position {e.position}",
                      margin=dict(l=50, r=50, t=50, b=40))
    return tidy(fig, ("xaxis",))


def visible_plain(text: str) -> str:
    """A token's text for a plot label: newlines and tabs shown as escapes."""
    return repr(text)[1:-1] if text.strip() != text or not text else text


def restore_heatmap(table) -> go.Figure:
    """Restoring power per component (layers x kinds): the share of the dense token's
    log-probability that patching it restores (1 = all of it)."""
    t = table[~table.component.str.contains(r"\*")]
    kinds = list(dict.fromkeys(t.kind))
    z = t.pivot_table(index="layer", columns="kind", values="restored_share",
                      aggfunc="first")[kinds]
    kl = t.pivot_table(index="layer", columns="kind", values="kl_after_patch",
                       aggfunc="first")[kinds]
    fig = go.Figure(go.Heatmap(
        z=z.values, x=kinds, y=list(z.index), customdata=kl.values, colorscale="RdYlGn",
        zmid=0, hovertemplate="layer %{y}, %{x}<br>restores %{z:.0%} of the dense token's "
                              "log-probability<br>KL after the patch %{customdata:.4g}"
                              "<extra></extra>"))
    fig.update_layout(height=max(300, 18 * len(z.index) + 120), yaxis_title="layer",
                      xaxis_title="kind", title="Restoring power (share of the dense token's "
                      "log p restored)",
                      margin=dict(l=50, r=20, t=50, b=40), yaxis=dict(autorange="reversed"))
    return tidy(fig, ("yaxis",))


def first_ranked_bars(table, top: int = 20) -> go.Figure:
    """How often each component ranks first at a prompt's first divergent token."""
    t = table[table["first"] > 0].head(top)
    fig = go.Figure(go.Bar(x=t.component, y=t["first"], marker_color="#1f77b4",
                           customdata=t.mean_restored_share,
                           hovertemplate="%{x}: first at %{y} prompts<br>mean restored share "
                                         "%{customdata:.0%}<extra></extra>"))
    fig.update_layout(height=320, xaxis_title="component", yaxis_title="prompts",
                      title="Components that most often carry a prompt's first divergence "
                            "(ranked first by patching)", margin=dict(l=50, r=20, t=50, b=40))
    return tidy(fig)


def level_figure(table, method: str) -> go.Figure:
    from dtm_core.analysis.levels import FORMATS

    across = str(method).strip().lower() == FORMATS
    table = table.sort_values(["kind", "level"])
    fig = px.line(table, x="level", y="fdt_mean", color="kind", markers=True,
                  hover_data=["spec"], text="spec" if across else None,
                  title=("Mean FDT against bits per weight across formats, one line per kind "
                         "(all layers)" if across else
                         f"Mean FDT against {method} level, one line per kind (all layers)"))
    if across:   # each point labelled with its spec, room kept above the highest label
        fig.update_traces(textposition="top center", cliponaxis=False)
        fig.update_xaxes(title="bits per weight (scales included)")
        lo, hi = float(table.fdt_mean.min()), float(table.fdt_mean.max())
        pad = max(0.5, 0.15 * (hi - lo))
        fig.update_yaxes(range=[lo - pad, hi + 2 * pad])
    fig.update_layout(height=320)
    return tidy(fig)


def plan_figure(plan) -> go.Figure:
    fig = px.line(plan.curve, x="share_params", y="fdt_mean", markers=True,
                  hover_data=["k"], title="Bisection probes: mean FDT of the combined compression")
    fig.add_hline(y=plan.budget_fdt, line_dash="dash", annotation_text="budget")
    fig.update_layout(height=300)
    return tidy(fig)


PARETO_STYLE = {  # planner -> (marker, size)
    "fdt": ("star", 18), "dtm": ("diamond", 13), "kl": ("square", 12), "random": ("x", 12),
    "uniform": ("circle", 11)}


def pareto_figure(holdout: pd.DataFrame, new_tokens: int | None = None,
                  budget: float | None = None) -> go.Figure:
    """Held-out mean FDT against average bits per weight: the plan, the baselines and each
    uniform spec as points (hover: sparsity, size, KL and the paired difference to the plan)."""
    fig = go.Figure()
    kv = "kv_cache_bytes_per_1k_tokens" in holdout     # a KV plan: bits per cached value
    unit = "cached value" if kv else "weight"
    for _, row in holdout[holdout.planner != "dense"].iterrows():   # dense: far right, FDT = N
        marker, size = PARETO_STYLE.get(row.planner, ("circle", 10))
        lo, hi = row.fdt_vs_plan_ci95_low, row.fdt_vs_plan_ci95_high
        size_text = (f"KV cache {row.kv_cache_bytes_per_1k_tokens / 2 ** 20:.3g} MiB per 1000 "
                     "tokens" if kv else
                     f"{row.sparsity:.1%} sparsity, {row.bytes / 2 ** 20:.1f} MiB")
        fig.add_trace(go.Scatter(
            x=[row.avg_bits], y=[row.fdt_mean], name=row.config,
            # the uniform specs are labelled on the chart; the plans (close together) in the legend
            mode="markers+text" if row.planner == "uniform" else "markers",
            text=[row.config.replace(" (closest)", "")], textposition="top center",
            marker=dict(symbol=marker, size=size),
            hovertemplate=(f"{row.config}<br>%{{x:.3f}} bits per {unit}, {size_text}<br>"
                           f"held-out mean FDT %{{y:.2f}}, mean KL {row.kl_mean:.4g}<br>"
                           f"FDT vs plan {row.fdt_vs_plan:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                           "<extra></extra>")))
    if budget is not None:
        fig.add_vline(x=budget, line_dash="dash", annotation_text="budget")
    fig.update_layout(title=f"Held-out prompts: mean FDT against average bits per {unit}",
                      xaxis_title="average bits per cached value (the selected KV caches, "
                                  "scales included)" if kv else
                      "average bits per weight (compressible components)",
                      yaxis_title="held-out mean FDT (tokens)", height=380, showlegend=True)
    if new_tokens:
        fig.update_yaxes(range=[-0.5, new_tokens + 1])
    return tidy(fig)


# --------------------------------------------------------------------------------------------
# Tables as people read them (exports keep the raw columns and full precision)

HEADERS = {  # column -> (header with unit, scale: 100 shows a share as %)
    "len_dense": ("len d", 1), "len_compressed": ("len c", 1), "len_ratio": ("len c/d", 1),
    "loop_dense": ("loop d", 1), "loop_compressed": ("loop c", 1), "rejoin_pos": ("rejoins at", 1),
    "edit_sim": ("edit sim (%)", 100), "answer_dense": ("answer d", 1),
    "answer_compressed": ("answer c", 1), "answer_match": ("answers agree", 1),
    "prompt_index": ("#", 1), "line": ("line", 1), "fdt": ("FDT (tokens)", 1),
    "sdt": ("SDT (%)", 100), "kl_mean": ("mean KL (nats)", 1), "kl_max": ("max KL (nats)", 1),
    "top1_agree": ("top-1 agree (%)", 100), "ppl_dense": ("PPL dense", 1),
    "ppl_compressed": ("PPL compressed", 1), "ppl_change": ("PPL change (%)", 100),
    "dp_ref_mean": ("Δp of reference", 1), "nll": ("NLL (nats)", 1),
    "correct_dense": ("correct (dense)", 1), "correct_compressed": ("correct (compressed)", 1),
    "choice_dense": ("choice (dense)", 1), "choice_compressed": ("choice (compressed)", 1),
    "pivots": ("pivot tokens", 1), "prompt": ("prompt", 1), "dense_text": ("dense text", 1),
    "compressed_text": ("compressed text", 1), "before": ("… text before", 1),
    "dense_token": ("dense token", 1), "compressed_token": ("compressed token", 1),
    "dense_after": ("dense goes on", 1),
    "layer": ("layer", 1), "kind": ("kind", 1), "component": ("component", 1),
    "params": ("params", 1), "fdt_mean": ("mean FDT (tokens)", 1),
    "kl_estimate": ("≈ mean KL (nats)", 1), "fdt_estimate": ("≈ mean FDT (tokens)", 1),
    "exact": ("exact", 1),
    "fdt_median": ("median FDT (tokens)", 1), "fdt_p25": ("FDT p25 (tokens)", 1),
    "fdt_p10": ("FDT p10 (tokens)", 1), "fdt_p75": ("FDT p75 (tokens)", 1),
    "fdt_p90": ("FDT p90 (tokens)", 1), "n_tokens": ("new tokens", 1),
    "sdt_mean": ("mean SDT (%)", 100), "top1_agree_mean": ("top-1 agree (%)", 100),
    "ppl_ratio_mean": ("PPL ratio", 1), "seconds": ("time (s)", 1),
    "weight_error": ("weight error ‖W−Ŵ‖/‖W‖ (%)", 100),
    "restored_logp": ("log p(dense token) after the patch", 1),
    "restores_argmax": ("argmax back", 1), "kl_after_patch": ("KL after the patch", 1),
    "restored_share": ("restored (%)", 100), "patched_by": ("patched by", 1),
    "reverse_logp_compressed_token": ("reverse: log p(compressed token)", 1),
    "reverse_flips_argmax": ("reverse: argmax flips", 1), "reverse_kl": ("reverse: KL", 1),
    "first": ("ranked first (prompts)", 1), "mean_restored_share": ("mean restored (%)", 100),
    "metric": ("metric", 1), "plain": ("plain", 1), "intactkv": ("IntactKV", 1),
    "delta": ("Δ", 1), "config": ("plan", 1), "planner": ("planner", 1),
    "avg_bits": ("bits per weight", 1), "sparsity": ("sparsity (%)", 100),
    "bytes": ("size (MiB)", 1 / 2 ** 20), "fdt_vs_plan": ("FDT − plan (tokens)", 1),
    "fdt_vs_plan_ci95_low": ("FDT − plan, 95 % low", 1),
    "fdt_vs_plan_ci95_high": ("FDT − plan, 95 % high", 1), "accuracy": ("accuracy (%)", 100),
    "accuracy_vs_plan": ("accuracy − plan (points)", 100),
    "accuracy_vs_plan_ci95_low": ("accuracy − plan, 95 % low", 100),
    "accuracy_vs_plan_ci95_high": ("accuracy − plan, 95 % high", 100),
    "kv_cache_bytes_per_1k_tokens": ("KV cache per 1000 tokens (MiB)", 1 / 2 ** 20),
    "bits_per_cached_value": ("bits per cached value", 1)}
SUFFIXES = {"_intactkv": "IntactKV", "_plain": "plain"}


def _header(col: str) -> tuple[str, float]:
    for suffix, label in SUFFIXES.items():
        base = col[:-len(suffix)]
        if col.endswith(suffix) and base in HEADERS:
            head, scale = HEADERS[base]
            return f"{head} · {label}", scale
    return HEADERS.get(col, (col, 1))


def readable_headers(columns) -> list[str]:
    """The headers :func:`readable_table` gives these columns (an empty table's headers)."""
    return [_header(str(c))[0] for c in columns]


def significant(v, digits: int = 3):
    """A float to ``digits`` significant digits (still a number, so the table sorts)."""
    if isinstance(v, bool) or not isinstance(v, float) or v != v or v in (float("inf"),
                                                                           float("-inf")):
        return v
    return float(f"{v:.{digits}g}")


def readable_table(table, sort: list[str] | None = None, ascending: list[bool] | None = None):
    """The table as the page shows it: worst first (``sort``), floats to 3 significant digits,
    shares in %, headers that say what they are with their units."""
    import pandas as pd

    t = table.copy()
    if sort:
        keys = [c for c in sort if c in t.columns]
        if keys:
            t = t.sort_values(keys, ascending=(ascending or [True] * len(sort))[:len(keys)],
                              kind="stable")
    out = {}
    for col in t.columns:
        head, scale = _header(str(col))
        values = t[col]
        if pd.api.types.is_float_dtype(values):
            values = (values * scale).map(significant)
        out[head] = values.to_list()
    return pd.DataFrame(out)
