"""DTM Inspector: a thin Gradio layer over dtm_core.

    python app.py [--model M] [--host 127.0.0.1] [--port 7860]

Event handlers call the engine and format its results; HTML and plots are made here, at the edge.
"""
from __future__ import annotations

import argparse
import html
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import plotly.express as px  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from plotly.subplots import make_subplots  # noqa: E402

from dtm_core import DTMError  # noqa: E402
from dtm_core.errors import user_error  # noqa: E402
from dtm_core.compress import parse_spec  # noqa: E402
from dtm_core.divergence import divergence  # noqa: E402
from dtm_core.evaluate import EvalResult, evaluate  # noqa: E402
from dtm_core.models import DEFAULT_DESCRIPTION  # noqa: E402
from dtm_core.prompts import builtin_names, load_prompts, parse_prompt_bytes  # noqa: E402
from dtm_core.registry import Registry  # noqa: E402
from dtm_core.streaming import StreamState, stream_pair  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"
PRESETS = ["int8", "int4:g128", "int3:g64", "magnitude:0.5", "nm:2:4", "wanda:0.5", "w8a8",
           "custom spec", "second checkpoint"]
REGISTRY = Registry()
UPDATE_EVERY_S = 0.04  # throttle for streamed page updates (each carries both columns)


# --------------------------------------------------------------------------------------------
# Rendering (pure functions of engine results)


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
                     f'title="{html.escape(hover)}">{html.escape(text)}</span>')
    return f'<div class="tokens">{"".join(spans)}</div>'


def render_sdt_map(tokenizer, refs: list[int], agree: list[bool]) -> str:
    """The dense continuation, each token marked by whether the compressed argmax agrees."""
    spans = []
    for pos, (text, ok) in enumerate(zip(token_texts(tokenizer, refs), agree)):
        spans.append(f'<span class="tok {"agree" if ok else "disagree"}" data-pos="{pos}" '
                     f'title="pos {pos}: compressed argmax {"agrees" if ok else "differs"}">'
                     f"{html.escape(text)}</span>")
    return f'<div class="tokens sdt-map">{"".join(spans)}</div>'


def position_plot(state: StreamState) -> go.Figure:
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
    return fig


def fdt_badge(state: StreamState, final: int | None = None) -> str:
    if final is not None:
        return str(final)
    f = state.fdt
    return str(f) if f is not None else f"≥{len(state.dense_tokens)}"


def summary_cards(res: EvalResult) -> str:
    s = res.summary
    cards = [("Mean FDT", f"{s['fdt_mean']:.2f}"), ("Median FDT", f"{s['fdt_median']:.1f}"),
             ("Mean SDT", f"{s['sdt_mean']:.1%}"), ("Mean KL", f"{s['kl_mean']:.4f}"),
             ("PPL ratio", f"{s.get('ppl_ratio_mean', float('nan')):.3f}")]
    if "accuracy_dense" in s:
        cards.append(("Accuracy dense → compressed",
                      f"{s['accuracy_dense']:.1%} → {s['accuracy_compressed']:.1%}"))
        cards.append(("Δ accuracy (95 % CI)",
                      f"{s['accuracy_delta']:+.1%} [{s['accuracy_delta_ci95_low']:+.1%}, "
                      f"{s['accuracy_delta_ci95_high']:+.1%}]"))
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
    return hist, surv, scat


TABLE_COLUMNS = ["prompt_index", "line", "fdt", "sdt", "kl_mean", "top1_agree", "ppl_dense",
                 "ppl_compressed", "correct_dense", "correct_compressed", "choice_dense",
                 "choice_compressed", "pivots", "fdt_intactkv", "sdt_intactkv", "kl_mean_intactkv",
                 "correct_compressed_intactkv", "choice_compressed_intactkv", "prompt",
                 "dense_text", "compressed_text", "compressed_text_intactkv"]


# --------------------------------------------------------------------------------------------
# Handlers


def side_from_inputs(preset: str, spec: str, components: str, checkpoint: str) -> dict:
    """The compressed side the form describes, validated before any model work."""
    if preset == "second checkpoint":
        if not (checkpoint or "").strip():
            raise DTMError("Give the path or hub id of the second checkpoint.")
        return {"compressed_model": checkpoint.strip()}
    text = (spec or "").strip() if preset == "custom spec" else preset
    if not text:
        raise DTMError("Give a compression spec, e.g. int4:g128.")
    sp = parse_spec(text)
    side = {"compress": str(sp), "components": (components or "").strip() or "*.*"}
    if sp.needs_calibration:  # wanda's activation norms: a fixed built-in set, so pairs are reused
        side["calibration"] = tuple(load_prompts("general").prompts[:32])
    return side


def get_pair(model: str, side: dict):
    return REGISTRY.pair((model or "default").strip(), **side)


FIRST = " For the first prompt: "  # lead of the pivot note of a prompt set


def pivot_note(tokenizer, ikv, text: str, chat, lead: str = " ") -> str:
    """Which tokens the pivots of ``text`` are (it matters for tokenizers without BOS), after
    ``lead``; empty when IntactKV is off."""
    from dtm_core.generation import encode_prompts
    from dtm_core.intactkv import describe_pivots

    if ikv is None:
        return ""
    ids = encode_prompts(tokenizer, [text], chat=bool(chat))[0]
    note = describe_pivots(tokenizer, ids, ikv.pivot_lengths(tokenizer, [ids])[0])
    return lead + note + (" (calibrated)" if ikv.calibrated is not None else "")


def intact_setting(pair, text, calibrated, steps, chat, prompts=None, progress=None):
    """The IntactKV choice of the form (None when off); calibrated on ``prompts`` (the set in use)
    or on the built-in 'general' set when asked. Calibrations are cached on disk."""
    from dtm_core.generation import encode_prompts
    from dtm_core.intactkv import IntactKV, calibrate

    ikv = IntactKV.parse(text)
    if ikv is None or not calibrated:
        return ikv
    texts = list(prompts) if prompts else load_prompts("general").prompts
    ids = encode_prompts(pair.tokenizer, texts, chat=bool(chat))
    cal = calibrate(pair, ids, ikv, steps=int(steps),
                    progress=None if progress is None else
                    (lambda f, m: progress(f, desc=f"calibrating pivot KV: {m}")))
    return ikv.with_calibration(cal)


STOP_EVENTS: dict[str, threading.Event] = {}  # per browser session and job: Stop's signal


def friendly(exc: Exception) -> str:
    """The message a handler shows for a failure; the app keeps serving either way."""
    err = user_error(exc)
    if err is not None:
        return f"⚠️ {err}"
    logging.getLogger("dtm_inspector").exception("unexpected failure")
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"⚠️ Unexpected {type(exc).__name__}: {first}"


def new_stop_event(job: str, request: gr.Request | None) -> threading.Event:
    ev = threading.Event()
    STOP_EVENTS[f"{job}:{request.session_hash if request else ''}"] = ev
    return ev


def stopper(job: str, message: str):
    """The handler of a Stop button: signals the session's running job of that kind."""
    def stop(request: gr.Request):
        ev = STOP_EVENTS.get(f"{job}:{request.session_hash if request else ''}")
        if ev is not None:
            ev.set()
        return message
    return stop


def compare(model, preset, spec, components, checkpoint, prompt, chat, new_tokens,
            ikv_text="off", ikv_cal=False, calib_steps=50, request: gr.Request = None,
            progress=gr.Progress()):
    """Generator: stream both generations, then finalize with the engine's teacher-forced pass."""
    empty = ("", "", "–", "–", None, "")
    try:
        if not (prompt or "").strip():
            raise DTMError("Type a prompt first.")
        side = side_from_inputs(preset, spec, components, checkpoint)
        source = (model or "default").strip()
        yield empty + ("Starting…",)
        if not REGISTRY.cached(source):
            yield empty + (
                f"Loading `{source}`… (the first load of the default model de-quantizes its GGUF, "
                "about 15 s; later loads use the cache)",)
        pair = get_pair(source, side)
        stop = new_stop_event("compare", request)
        n = int(new_tokens)
        tok = pair.tokenizer
        if ikv_cal and (ikv_text or "off") != "off":
            yield empty + ("Calibrating the pivot KV on the built-in 'general' set (cached "
                           "after the first time)…",)
        ikv = intact_setting(pair, ikv_text, ikv_cal, calib_steps, chat, progress=progress)
        pivots = pivot_note(tok, ikv, prompt, chat)
        t0 = last = time.perf_counter()
        state = None
        dtx, ctx = TokenTexts(tok), TokenTexts(tok)

        def columns(st, f):
            return (render_column(tok, st, "dense", f, dtx), render_column(tok, st, "comp", f, ctx))

        for state in stream_pair(pair, prompt, n, chat=bool(chat), stop=stop, intactkv=ikv):
            now = time.perf_counter()
            if now - last < UPDATE_EVERY_S and not (state.dense_done and state.comp_done):
                continue  # the page is updated at most every UPDATE_EVERY_S seconds
            last = now
            yield (*columns(state, state.fdt), fdt_badge(state), f"{state.sdt:.0%}", None, "",
                   f"Streaming… {len(state.steps)} tokens, {now - t0:.1f} s.{pivots}")
        if state is None:
            return
        if state.stopped:
            f = state.fdt
            yield (*columns(state, f),
                   fdt_badge(state), f"{state.sdt:.0%}", position_plot(state), "",
                   f"Stopped after {len(state.steps)} tokens.")
            return
        # The engine's batch computation on the same prompt: the numbers the CLI reports.
        res = divergence(pair, prompt_ids=[state.prompt_ids], new_tokens=n,
                         references=[state.dense_tokens], intactkv=ikv)
        row = res.table.iloc[0]
        if ikv is not None:
            plain = divergence(pair, prompt_ids=[state.prompt_ids], new_tokens=n,
                               references=[state.dense_tokens]).table.iloc[0]
            pivots += (f" Without IntactKV: FDT {int(plain.fdt)}, SDT {plain.sdt:.1%}, "
                       f"mean KL {plain.kl_mean:.4f}.")
        f = int(row.fdt)
        tm = res.tokens[0]
        note = "" if f == state.fdt else (f" (the live stream saw {state.fdt}: a numerical "
                                          "near-tie between cached and full forward passes)")
        yield (*columns(state, f), str(f), f"{row.sdt:.0%}", position_plot(state),
               render_sdt_map(tok, state.dense_tokens, tm.agree.tolist()),
               f"Done: {len(state.dense_tokens)} dense tokens, FDT {f}, SDT {row.sdt:.1%}, "
               f"mean KL {row.kl_mean:.4f} nats, `{pair.dense.source}` vs `{pair.label}`"
               f"{f' with IntactKV {ikv.label}' if ikv else ''}{note}.{pivots} "
               f"{DEFAULT_DESCRIPTION if pair.dense.source == 'default' else ''}")
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        yield empty + (friendly(exc),)


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
    return fig, act


def run_sinks(model, preset, spec, components, checkpoint, ikv_text, prompt, chat, k):
    from dtm_core.generation import encode_prompts
    from dtm_core.intactkv import IntactKV, describe_pivots
    from dtm_core.sinks import pair_sinks

    try:
        if not (prompt or "").strip():
            raise DTMError("Type a prompt first.")
        side = side_from_inputs(preset, spec, components, checkpoint)
        pair = get_pair(model, side)
        ids = encode_prompts(pair.tokenizer, [prompt], chat=bool(chat))[0]
        k = int(k or 0)
        if k < 1:  # follow the IntactKV setting, else the first token
            ikv = IntactKV.parse(ikv_text)
            k = ikv.pivot_lengths(pair.tokenizer, [ids])[0] if ikv else 1
        shares, acts = pair_sinks(pair, ids, k)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        return None, None, friendly(exc)
    heat, act = sink_figures(shares, acts)
    mean = shares.groupby("model").share.mean()
    msg = (f"{describe_pivots(pair.tokenizer, ids, k)} Mean share of attention on them: dense "
           f"{mean['dense']:.1%}, compressed {mean['compressed']:.1%} "
           f"({len(ids)} prompt tokens, eager attention).")
    return heat, act, msg


def load_set(upload, builtin):
    """The prompt set the tab describes: an uploaded file wins over the built-in choice."""
    if upload is not None:
        path = upload if isinstance(upload, str) else getattr(upload, "name", None)
        with open(path, "rb") as fh:
            data = fh.read(10 * 1024 * 1024 + 1)
        return parse_prompt_bytes(data, os.path.basename(path))
    if not builtin:
        raise DTMError("Upload a prompt file or pick a built-in set.")
    return load_prompts(builtin)


def run_set(model, preset, spec, components, checkpoint, upload, builtin, chat, new_tokens,
            ikv_text="off", ikv_cal=False, calib_steps=50, request: gr.Request = None,
            progress=gr.Progress()):
    """Evaluate a prompt set on the current pair; returns table, cards, plots, files, message."""
    nothing = (None, "", None, None, None, None, None)
    try:
        pset = load_set(upload, builtin)
        side = side_from_inputs(preset, spec, components, checkpoint)
        progress(0, desc="loading the pair")
        pair = get_pair(model, side)
        ikv = intact_setting(pair, ikv_text, ikv_cal, calib_steps, chat, pset.prompts,
                             progress)
        stop = new_stop_event("set", request)
        n = int(new_tokens)
        res = evaluate(pair, pset, n, chat=bool(chat), stop=stop, intactkv=ikv,
                       progress=lambda f, m: progress(f, desc=m))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        return nothing + (friendly(exc), None, None)
    out_dir = Path(tempfile.mkdtemp(prefix="dtm-export-"))
    csv_path, json_path = out_dir / "dtm_results.csv", out_dir / "dtm_results.json"
    csv_path.write_text(res.to_csv(), encoding="utf-8")
    json_path.write_text(res.to_json(), encoding="utf-8")
    table = res.table[[c for c in TABLE_COLUMNS if c in res.table.columns]]
    msg = (f"{'Stopped: ' if res.stopped else 'Done: '}{len(res.table)} prompts of "
           f"{pset.name} on {pair.dense.source} vs {pair.label}"
           f"{f', with and without IntactKV {ikv.label}' if ikv else ''}."
           f"{pivot_note(pair.tokenizer, ikv, pset.prompts[0], chat, FIRST)}")
    if res.rejected:
        msg += " ⚠️ " + "; ".join(f"line {n_}: {r}" for n_, r in res.rejected[:20])
        if len(res.rejected) > 20:
            msg += f" (and {len(res.rejected) - 20} more)"
    state = {"chat": bool(chat), "new_tokens": n,
             "prompts": [[int(i), p] for i, p in zip(res.table.prompt_index, res.table.prompt)]}
    comparison = None
    if res.comparison is not None:
        comparison = res.comparison.copy()
        if ikv.calibrated is not None:
            # the calibration's own gain: the same prompts and dense references with the
            # uncalibrated pivot KV
            base = divergence(pair, prompt_ids=res.prompt_ids, references=res.references,
                              new_tokens=n, intactkv=ikv.with_calibration(None))
            comparison.insert(3, "uncalibrated", comparison.key.map(base.summary))
            comparison["Δ calibration"] = comparison.intactkv - comparison.uncalibrated
            gain = base.summary["fdt_mean"]
            msg += (f" Calibrated pivot KV (loss {ikv.calibrated.loss_before:.4g} → "
                    f"{ikv.calibrated.loss_after:.4g}): mean FDT {gain:.2f} uncalibrated → "
                    f"{res.summary['fdt_mean_intactkv']:.2f} calibrated "
                    f"({res.summary['fdt_mean_intactkv'] - gain:+.2f}).")
        comparison = comparison.drop(columns="key").rename(
            columns={"plain": "without IntactKV", "intactkv": f"IntactKV {ikv.label}",
                     "uncalibrated": f"IntactKV {ikv.label.replace('+cal', '')} (uncalibrated)",
                     "delta": "Δ (IntactKV − plain)"})
    return (table, summary_cards(res), *set_plots(res, n), str(csv_path), str(json_path), msg,
            state, comparison)


def open_in_compare(run_state, evt: gr.SelectData):
    """A selected table row opens its prompt in the Compare tab with the same pair."""
    if evt is None or not run_state:
        return gr.update(), gr.update(), gr.update(), gr.update()
    prompts = dict((i, p) for i, p in run_state["prompts"])
    row = getattr(evt, "row_value", None)
    if row:  # the table's first column is prompt_index, wherever the user sorted the row to
        text = prompts.get(int(row[0]))
    else:
        text = run_state["prompts"][evt.index[0]][1]
    return (gr.Tabs(selected="compare"), text, run_state["chat"], run_state["new_tokens"])


def sensitivity_heatmap(table, metric: str, suffix: str = "", diverging: bool = False
                        ) -> go.Figure:
    from dtm_core.sweep import METRICS, heatmap_frame

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
        hovertemplate="layer %{y}, %{x}<br>" + METRICS[metric] + " %{z:.4g}<br>"
                      "params %{customdata:,}<extra></extra>"))
    fig.update_layout(height=max(300, 18 * len(z.index) + 120), yaxis_title="layer",
                      xaxis_title="kind", title=f"{METRICS[metric]} when one component is "
                                                f"compressed alone{suffix}",
                      margin=dict(l=50, r=20, t=50, b=40), yaxis=dict(autorange="reversed"))
    return fig


SWEEP_VIEWS = ["IntactKV", "plain", "IntactKV − plain"]


def run_sweep(model, spec, upload, builtin, chat, new_tokens, layers, kinds, metric,
              ikv_text="off", view="IntactKV", request: gr.Request = None,
              progress=gr.Progress()):
    from dtm_core.generation import encode_prompts
    from dtm_core.sweep import sweep

    try:
        parse_spec(spec)
        pset = load_set(upload, builtin)
        source = (model or "default").strip()
        progress(0, desc="loading the model")
        dense = REGISTRY.dense(source)
        ids = encode_prompts(dense.tokenizer, pset.prompts, chat=bool(chat))
        from dtm_core.intactkv import IntactKV
        ikv = IntactKV.parse(ikv_text)
        if ikv is not None:
            ikv.pivot_lengths(dense.tokenizer, ids)   # a bad setting fails before the sweep
        stop = new_stop_event("sweep", request)
        kw = dict(layers=(layers or "").strip() or None, kinds=(kinds or "").strip() or None,
                  stop=stop)
        plain = sweep(dense, spec, ids, int(new_tokens), **kw,
                      progress=lambda f, m: progress(f, desc=("plain sweep: " if ikv else "") + m))
        res = plain
        if ikv is not None and not plain.stopped:
            res = sweep(dense, spec, ids, int(new_tokens), **kw, intactkv=ikv,
                        progress=lambda f, m: progress(f, desc=f"IntactKV {ikv.label}: {m}"))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        return None, None, friendly(exc), None, None
    if res.table.empty:
        return None, None, "Stopped before any cell finished.", None, None
    out = Path(tempfile.mkdtemp(prefix="dtm-sweep-")) / "sweep.csv"
    res.table.to_csv(out, index=False)
    msg = (f"{'Stopped' if res.stopped else 'Done'}: {len(res.table)} components "
           f"({res.computed} computed, {res.reused} reused from the store) for {spec} on "
           f"{pset.name}. Select a row to open that single-component pair in Compare.")
    state = {"table": res.table.to_dict("records"), "spec": str(parse_spec(spec)),
             "prompts": pset.prompts, "chat": bool(chat), "new_tokens": int(new_tokens)}
    if ikv is not None and res is not plain:
        both = intact_sweep_table(plain.table, res.table)
        both.to_csv(out, index=False)
        msg = (f"{'Stopped' if res.stopped else 'Done'}: {len(res.table)} components with "
               f"IntactKV {ikv.label} and without ({res.computed + plain.computed} computed, "
               f"{res.reused + plain.reused} reused) for {spec} on {pset.name}; mean FDT over "
               f"cells {plain.table.fdt_mean.mean():.2f} → {res.table.fdt_mean.mean():.2f}. "
               "Select a row to open that single-component pair in Compare."
               f"{pivot_note(dense.tokenizer, ikv, pset.prompts[0], chat, FIRST)}")
        state.update(plain=plain.table.to_dict("records"), intactkv=ikv.label)
        return (sweep_view_figure(state, metric, view), both, msg, str(out), state)
    return sensitivity_heatmap(res.table, metric), res.table, msg, str(out), state


def intact_sweep_table(plain, intact):
    """The IntactKV sweep's rows with the plain sweep's metrics beside them (``*_plain``)."""
    from dtm_core.sweep import METRICS

    extra = plain.set_index("component")[list(METRICS)].add_suffix("_plain")
    return intact.join(extra, on="component")


def sweep_view_figure(state, metric, view):
    import pandas as pd

    table = pd.DataFrame(state["table"])
    if not state.get("plain"):
        return sensitivity_heatmap(table, metric)
    plain = pd.DataFrame(state["plain"])
    if view == "plain":
        return sensitivity_heatmap(plain, metric, " (plain)")
    if view == "IntactKV − plain":
        diff = table.copy()
        merged = table.set_index("component")[metric] - plain.set_index("component")[metric]
        diff[metric] = diff.component.map(merged)
        return sensitivity_heatmap(diff, metric, f" : IntactKV {state['intactkv']} − plain",
                                   diverging=True)
    return sensitivity_heatmap(table, metric, f" (IntactKV {state['intactkv']})")


def rerender_heatmap(state, metric, view="IntactKV"):
    if not state:
        return None
    return sweep_view_figure(state, metric, view)


def cell_to_compare(state, evt: gr.SelectData):
    """A selected sweep row opens that single-component pair in Compare."""
    if evt is None or not state:
        return (gr.update(),) * 7
    row = getattr(evt, "row_value", None)
    comp = row[2] if row else state["table"][evt.index[0]]["component"]
    return (gr.Tabs(selected="compare"), "custom spec", state["spec"], comp,
            state["prompts"][0], state["chat"], state["new_tokens"])


def heatmap_cell_to_compare(state, name):
    """A clicked heatmap cell ("LAYER.KIND") opens that single-component pair in Compare."""
    names = {r["component"] for r in (state or {}).get("table", [])}
    if not state or (name or "").strip() not in names:
        return (gr.update(),) * 7
    return (gr.Tabs(selected="compare"), "custom spec", state["spec"], name.strip(),
            state["prompts"][0], state["chat"], state["new_tokens"])


def run_plan(model, state, budget, progress=gr.Progress()):
    import pandas as pd

    from dtm_core.generation import encode_prompts
    from dtm_core.plan import make_plan
    from dtm_core.divergence import reference_continuations

    if not state:
        return "Run a sweep first.", None, None
    try:
        dense = REGISTRY.dense((model or "default").strip())
        ids = encode_prompts(dense.tokenizer, state["prompts"], chat=state["chat"])
        n = state["new_tokens"]
        progress(0, desc="dense references")
        refs = reference_continuations(dense, ids, n)
        plan = make_plan(dense, pd.DataFrame(state["table"]), state["spec"], ids, refs,
                         n, float(budget), progress=lambda k, m: progress(None, desc=m))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        return friendly(exc), None, None
    path = Path(tempfile.mkdtemp(prefix="dtm-plan-")) / "plan.json"
    plan.save(str(path))
    fig = px.line(plan.curve, x="share_params", y="fdt_mean", markers=True,
                  hover_data=["k"], title="Bisection probes: mean FDT of the combined compression")
    fig.add_hline(y=plan.budget_fdt, line_dash="dash", annotation_text="budget")
    fig.update_layout(height=300)
    msg = (f"Plan: {len(plan.components)} components ({plan.share_params:.1%} of component "
           f"parameters) compressed with {plan.spec}; mean FDT {plan.fdt_mean:.2f} "
           f"(budget {plan.budget_fdt:.2f}), verified with {len(plan.curve) - 1} evaluations. "
           "Load the JSON with `--recipe` in the CLI.")
    return msg, str(path), fig


def run_levels(model, upload, builtin, chat, new_tokens, method, levels, kinds,
               progress=gr.Progress()):
    from dtm_core.levels import level_curves

    try:
        pset = load_set(upload, builtin)
        dense = REGISTRY.dense((model or "default").strip())
        table = level_curves(dense, method, levels, kinds, pset.prompts, int(new_tokens),
                             chat=bool(chat), progress=lambda f, m: progress(f, desc=m))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        return None, friendly(exc)
    fig = px.line(table, x="level", y="fdt_mean", color="kind", markers=True,
                  title=f"Mean FDT against {method} level, one line per kind (all layers)")
    fig.update_layout(height=320)
    return fig, f"Done: {len(table)} points."


# --------------------------------------------------------------------------------------------
# Layout


def build_app(default_model: str = "default") -> gr.Blocks:
    with gr.Blocks(title="DTM Inspector") as demo:
        gr.Markdown("# DTM Inspector\nWhere and how a compressed LLM stops behaving like its "
                    "dense original (Divergent Token Metrics, Deiseroth et al. 2024).")
        # the pair: shared by every tab
        with gr.Row():
            model = gr.Textbox(value=default_model, label="Dense model",
                               info="'default', a hub id (local cache), a folder or a .gguf",
                               elem_id="model-source", scale=2)
            preset = gr.Dropdown(PRESETS, value="int8", label="Compressed side", elem_id="preset")
            spec = gr.Textbox(label="Custom spec", placeholder="int4:g64:asym", elem_id="spec")
            components = gr.Textbox(value="*.*", label="Components",
                                    info="LAYERS.KIND, e.g. *.q,*.k,0-3.down",
                                    elem_id="components")
            checkpoint = gr.Textbox(label="Second checkpoint", elem_id="checkpoint",
                                    placeholder="path, .gguf or hub id")
        with gr.Row(elem_classes="intactkv-row"):
            intactkv = gr.Dropdown(["off", "1", "2", "4", "prefix"], value="off",
                                   allow_custom_value=True, label="IntactKV",
                                   info="keep the dense KV of the first K tokens, or of the chat "
                                        "template's system prefix",
                                   elem_id="intactkv")
            ikv_cal = gr.Checkbox(value=False, label="Calibrate the pivot KV (IntactKV+Cal)",
                                  info="trained on the prompt set in use (cached); needs the "
                                       "same first tokens in every prompt", elem_id="intactkv-cal")
            calib_steps = gr.Slider(1, 500, value=50, step=1, label="Calibration steps",
                                    elem_id="calib-steps")
        pair_inputs = [model, preset, spec, components, checkpoint]
        ikv_inputs = [intactkv, ikv_cal, calib_steps]
        with gr.Tabs() as tabs:
            with gr.Tab("Compare", id="compare"):
                compare_tab(pair_inputs, ikv_inputs)
            with gr.Tab("Prompt sets", id="prompt-sets"):
                sets_tab(pair_inputs, ikv_inputs)
            with gr.Tab("Sensitivity", id="sensitivity"):
                sensitivity_tab(model, intactkv)
        # a row selected in the results table opens in Compare (wired here: it spans tabs)
        ui = UI
        ui["results"].select(open_in_compare, [ui["run_state"]],
                             [tabs, ui["prompt"], ui["chat"], ui["new_tokens"]])
        to_compare = [tabs, preset, spec, components, ui["prompt"], ui["chat"], ui["new_tokens"]]
        ui["cells"].select(cell_to_compare, [ui["sweep_state"]], to_compare)
        # a click on a heatmap cell (assets/app.js fills the hidden box and presses the button)
        ui["cell_open"].click(heatmap_cell_to_compare, [ui["sweep_state"], ui["cell_clicked"]],
                              to_compare, queue=False)
    return demo


UI: dict = {}  # components that handlers of one tab wire to another's


def compare_tab(pair_inputs, ikv_inputs):
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt", scale=4,
                            placeholder="The capital of France is")
        with gr.Column(scale=1):
            chat = gr.Checkbox(value=False, label="Chat template", elem_id="chat")
            new_tokens = gr.Slider(1, 512, value=48, step=1, label="Max new tokens",
                                   elem_id="new-tokens")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                stop = gr.Button("Stop", variant="stop", elem_id="stop")
    status = gr.Markdown("", elem_id="status")
    with gr.Row(elem_classes="badges"):
        gr.Markdown("**First divergent token (FDT)**")
        fdt = gr.HTML("–", elem_id="fdt")
        gr.Markdown("**Share of divergent tokens (SDT)**")
        sdt = gr.HTML("–", elem_id="sdt")
    with gr.Row():
        with gr.Column():
            gr.Markdown("### Dense")
            dense_out = gr.HTML("", elem_id="dense-output")
        with gr.Column():
            gr.Markdown("### Compressed")
            comp_out = gr.HTML("", elem_id="compressed-output")
    plot = gr.Plot(label="Per position: KL and probability of the dense token",
                   elem_id="position-plot")
    gr.Markdown("### Teacher-forced view (SDT map): green where the compressed model's argmax on "
                "the dense prefix agrees, red where it differs")
    sdt_map = gr.HTML("", elem_id="sdt-map")
    # IntactKV inputs last: API clients written before them keep working (defaults: off)
    generate.click(compare, pair_inputs + [prompt, chat, new_tokens] + ikv_inputs,
                   [dense_out, comp_out, fdt, sdt, plot, sdt_map, status],
                   concurrency_id="model")
    with gr.Accordion("Attention sinks and massive activations", open=False,
                      elem_id="sinks-panel"):
        gr.Markdown("How much attention later tokens put on the first K tokens of this prompt, "
                    "per layer and head (hover for values), dense next to compressed; and the "
                    "largest hidden-state magnitude at those tokens against the median.")
        with gr.Row():
            sink_k = gr.Number(value=0, precision=0, minimum=0, label="K (0: the IntactKV "
                               "setting, else 1)", elem_id="sinks-k")
            sink_btn = gr.Button("Show attention sinks", elem_id="sinks-run")
        sink_status = gr.Markdown("", elem_id="sinks-status")
        sink_heat = gr.Plot(elem_id="sink-heatmap")
        sink_act = gr.Plot(elem_id="massive-plot")
    sink_btn.click(run_sinks, pair_inputs + [ikv_inputs[0], prompt, chat, sink_k],
                   [sink_heat, sink_act, sink_status], concurrency_id="model")
    stop.click(stopper("compare", "Stopping…"), None, [status], queue=False)
    UI.update(prompt=prompt, chat=chat, new_tokens=new_tokens)


def run_kld(model, preset, spec, components, checkpoint, text_file, ctx, progress=gr.Progress()):
    from dtm_core.kld import format_report, score_text
    from dtm_core.prompts import read_text_file

    try:
        if text_file is None:
            raise DTMError("Upload a plain-text file to score.")
        path = text_file if isinstance(text_file, str) else text_file.name
        text = read_text_file(path)
        side = side_from_inputs(preset, spec, components, checkpoint)
        progress(0, desc="loading the pair")
        pair = get_pair(model, side)
        stats, values = score_text(pair, text, int(ctx), progress=lambda f, m: progress(f, desc=m))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        return friendly(exc), None, None
    import numpy as np
    kld = px.histogram(x=np.asarray(values.kld), nbins=60, log_y=True,
                       title="KL divergence per scored position",
                       labels={"x": "KLD (nats)"})
    dp = px.histogram(x=np.exp(values.logp_comp) - np.exp(values.logp_base), nbins=60,
                      log_y=True, title="Δp: change in the probability of the real next token",
                      labels={"x": "Δp"})
    for fig in (kld, dp):
        fig.update_layout(height=300)
    return f"{pair.dense.source} vs {pair.label}, ctx {int(ctx)}\n" + format_report(stats), kld, dp


def sensitivity_tab(model, intactkv):
    from dtm_core.sweep import METRICS

    gr.Markdown("Compress each `LAYER.KIND` alone with one spec and measure the divergence on a "
                "prompt set. Finished cells are stored on disk: a stopped sweep resumes, a "
                "finished one reopens instantly.")
    with gr.Row():
        spec = gr.Textbox(value="int4:g128", label="Spec", elem_id="sens-spec")
        builtin = gr.Dropdown(builtin_names(), value="general", label="Built-in set",
                              elem_id="sens-builtin")
        upload = gr.File(label="or a prompt file", file_types=[".txt", ".jsonl", ".csv"],
                         elem_id="sens-upload")
    with gr.Row():
        chat = gr.Checkbox(value=False, label="Chat template", elem_id="sens-chat")
        new_tokens = gr.Slider(1, 128, value=32, step=1, label="N", elem_id="sens-new-tokens")
        layers = gr.Textbox(label="Layers (optional)", placeholder="0-3", elem_id="sens-layers")
        kinds = gr.Textbox(label="Kinds (optional)", placeholder="q,k", elem_id="sens-kinds")
        metric = gr.Dropdown(list(METRICS), value="fdt_mean", label="Heatmap metric",
                             elem_id="sens-metric")
        view = gr.Radio(SWEEP_VIEWS, value="IntactKV", label="With IntactKV on, show",
                        elem_id="sens-view")
    with gr.Row():
        run = gr.Button("Run sweep", variant="primary", elem_id="sens-run")
        stop = gr.Button("Stop", variant="stop", elem_id="sens-stop")
    status = gr.Markdown("", elem_id="sens-status")
    heat = gr.Plot(label="Click a cell to open that single-component pair in Compare",
                   elem_id="sens-heatmap")
    with gr.Row(elem_classes="dtm-hidden"):
        clicked = gr.Textbox(elem_id="sens-clicked", show_label=False, container=False)
        cell_open = gr.Button("open cell", elem_id="sens-open")
    cells = gr.Dataframe(label="Cells (select a row to open it in Compare)", interactive=False,
                         elem_id="sens-table", max_height=400)
    csv_file = gr.File(label="Sweep CSV", elem_id="sens-csv")
    state = gr.State(None)
    run.click(run_sweep, [model, spec, upload, builtin, chat, new_tokens, layers, kinds, metric,
                          intactkv, view],
              [heat, cells, status, csv_file, state], concurrency_id="model")
    stop.click(stopper("sweep", "Stopping after the current cell…"), None, [status],
               queue=False)
    metric.change(rerender_heatmap, [state, metric, view], [heat])
    view.change(rerender_heatmap, [state, metric, view], [heat])
    gr.Markdown("### Plan: the largest least-sensitive set within a budget")
    with gr.Row():
        budget = gr.Slider(0.1, 1.0, value=0.9, step=0.01, label="Budget: mean FDT >= budget x N",
                           elem_id="plan-budget")
        plan_btn = gr.Button("Make plan", elem_id="plan-run")
    plan_status = gr.Markdown("", elem_id="plan-status")
    with gr.Row():
        plan_file = gr.File(label="Plan JSON (recipe)", elem_id="plan-json")
        plan_plot = gr.Plot(elem_id="plan-curve")
    plan_btn.click(run_plan, [model, state, budget], [plan_status, plan_file, plan_plot],
                   concurrency_id="model")
    gr.Markdown("### Level curves: a metric against sparsity or bit width, one line per kind")
    with gr.Row():
        method = gr.Dropdown(["magnitude", "wanda", "int", "int:g128"], value="magnitude",
                             label="Method", elem_id="lvl-method")
        levels = gr.Textbox(value="0.1,0.3,0.5,0.7,0.9", label="Levels (sparsities or bits)",
                            elem_id="lvl-levels")
        lvl_kinds = gr.Textbox(value="q,down", label="Kinds", elem_id="lvl-kinds")
        lvl_btn = gr.Button("Draw level curves", elem_id="lvl-run")
    lvl_status = gr.Markdown("", elem_id="lvl-status")
    lvl_plot = gr.Plot(elem_id="lvl-plot")
    lvl_btn.click(run_levels, [model, upload, builtin, chat, new_tokens, method, levels,
                               lvl_kinds], [lvl_plot, lvl_status], concurrency_id="model")
    UI.update(cells=cells, sweep_state=state, cell_clicked=clicked, cell_open=cell_open)


def sets_tab(pair_inputs, ikv_inputs):
    gr.Markdown("Evaluate a prompt set on the pair above. Upload `.txt` (one prompt per line), "
                "`.jsonl` or `.csv` (header row; prompt field `prompt`, `text`, `question`, "
                "`instruction` or `input`; optional `answer`/`answers`/`target`, `context`, "
                "`choices`), or pick a built-in set. Select a row to open it in Compare.")
    with gr.Row():
        upload = gr.File(label="Prompt file", file_types=[".txt", ".jsonl", ".csv"],
                         elem_id="set-upload")
        with gr.Column():
            builtin = gr.Dropdown(builtin_names(), value="general", label="Built-in set",
                                  elem_id="set-builtin")
            chat = gr.Checkbox(value=False, label="Chat template", elem_id="set-chat")
            new_tokens = gr.Slider(1, 256, value=32, step=1, label="New tokens (N)",
                                   elem_id="set-new-tokens")
            with gr.Row():
                run = gr.Button("Run set", variant="primary", elem_id="set-run")
                stop = gr.Button("Stop", variant="stop", elem_id="set-stop")
    status = gr.Markdown("", elem_id="set-status")
    cards = gr.HTML("", elem_id="set-summary")
    comparison = gr.Dataframe(label="With and without IntactKV (set IntactKV above)",
                              elem_id="intactkv-comparison", interactive=False)
    with gr.Row():
        hist = gr.Plot(elem_id="set-hist")
        surv = gr.Plot(elem_id="set-survival")
        scat = gr.Plot(elem_id="set-scatter")
    results = gr.Dataframe(label="Per prompt", elem_id="set-table", interactive=False,
                           wrap=True, max_height=500)
    with gr.Row():
        csv_file = gr.File(label="Export CSV", elem_id="set-csv")
        json_file = gr.File(label="Export JSON", elem_id="set-json")
    gr.Markdown("### llama.cpp-style KL-divergence report on a plain-text file\n"
                "The text is cut into chunks of `ctx` tokens and the second half of each chunk is "
                "scored, as `llama-perplexity --kl-divergence` does.")
    with gr.Row():
        text_file = gr.File(label="Text file", file_types=[".txt"], elem_id="kld-upload")
        ctx = gr.Number(value=512, precision=0, minimum=4, label="ctx", elem_id="kld-ctx")
        kld_btn = gr.Button("Score text", elem_id="kld-run")
    kld_report = gr.Textbox(label="Report", lines=12, elem_id="kld-report", interactive=False)
    with gr.Row():
        kld_plot = gr.Plot(elem_id="kld-hist")
        dp_plot = gr.Plot(elem_id="kld-dp")
    kld_btn.click(run_kld, pair_inputs + [text_file, ctx], [kld_report, kld_plot, dp_plot],
                  concurrency_id="model")
    run_state = gr.State(None)
    run.click(run_set, pair_inputs + [upload, builtin, chat, new_tokens] + ikv_inputs,
              [results, cards, hist, surv, scat, csv_file, json_file, status, run_state,
               comparison], concurrency_id="model")
    stop.click(stopper("set", "Stopping after the current chunk…"), None, [status], queue=False)
    UI.update(results=results, run_state=run_state)


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SystemExit("--auth (or DTM_AUTH) must be USER:PASS")
    return user, password


def main(argv=None) -> None:
    global REGISTRY
    ap = argparse.ArgumentParser(description="DTM Inspector web app")
    ap.add_argument("--model", default="default",
                    help="dense model preselected in the page (default: the embedded SmolLM2)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="bind address (default 127.0.0.1: only this machine can connect)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--auth", default=os.environ.get("DTM_AUTH"),
                    help="USER:PASS required to open the page (or set DTM_AUTH)")
    ap.add_argument("--share", action="store_true",
                    help="ask Gradio for a public share link (off unless given)")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="let models run their own Python code (off unless given)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-file-size", default="10mb", help="largest upload the server accepts")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="heavy jobs run at once per device (queued beyond that)")
    args = ap.parse_args(argv)
    REGISTRY = Registry(device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code)
    demo = build_app(args.model)
    demo.queue(default_concurrency_limit=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                auth=parse_auth(args.auth), max_file_size=args.max_file_size,
                css_paths=[str(ASSETS / "app.css")], js=(ASSETS / "app.js").read_text(),
                show_error=True)


if __name__ == "__main__":
    main()
