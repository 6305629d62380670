"""Why it diverged (in the Compare tab): the logit lens and the patching map at the first divergent
token or at a clicked token; and over a prompt set (in the Sensitivity tab), how often each
component carries the first divergence."""
from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from dtm_core import DTMError
from dtm_core.measure.exports import write_table
from dtm_core.analysis.explain import PATCH_COLUMNS, explain, explain_set
from dtm_core.models.generation import encode_prompts
from dtm_core.jobs import PairRequest

from . import common
from .common import PairForm
from .render import (first_ranked_bars, friendly, lens_figure, readable_headers,
                     readable_table, restore_heatmap)

SCOPES = {"every position up to it": "all", "this position only": "position"}
GRANULARITIES = {"component": "component", "whole layer": "layer"}


def run_explain(model, preset, spec, components, checkpoint, prompt, chat, new_tokens,
                position=-1, scope="every position up to it", granularity="component",
                calibration=None, calibration_file=None, calib_ctx=None, calib_samples=None,
                sequential=True, progress=gr.Progress()):
    """The lens plot, the restoring-power heatmap, the ranked table, the ranking sentence and
    the table as CSV, for the Compare tab's pair and prompt."""
    none = (None, None, None)
    try:
        if not (prompt or "").strip():
            raise DTMError("Type a prompt first.")
        req = common.pair_request(model, preset, spec, components, checkpoint, chat, calibration,
                                  calibration_file, calib_ctx, calib_samples, sequential)
        pair = common.CACHE.open(req, [prompt])
        ids = encode_prompts(pair.tokenizer, [prompt], chat=bool(chat))[0]
        pos = None if position in (None, "") or int(position) < 0 else int(position)
        e = explain(pair, ids, int(new_tokens), position=pos,
                    scope=SCOPES.get(scope, scope), granularity=GRANULARITIES.get(
                        granularity, granularity),
                    progress=lambda f, m: progress(f, desc=m))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        return none + (friendly(exc), None)
    ranked = e.ranked().drop(columns=["order"])
    out = Path(tempfile.mkdtemp(prefix="dtm-explain-")) / "explain.csv"
    write_table(ranked, out, {"model": pair.dense.source, "pair": pair.label, "prompt": prompt,
                              "chat": bool(chat), "new_tokens": int(new_tokens),
                              "position": e.position, "scope": e.scope,
                              "granularity": e.granularity})
    flip = e.lens_flip_layer
    lens = (f" The compressed model's lens first prefers its own token at layer {flip}."
            if flip is not None else "")
    heat = restore_heatmap(e.patching) if e.granularity == "component" else None
    return (lens_figure(e), heat, readable_table(ranked), e.ranking() + lens, str(out))


def build(pair: PairForm, prompt, chat, new_tokens) -> None:
    """The "Why it diverged" panel of the Compare tab."""
    with gr.Accordion("Why it diverged: logit lens and component patching", open=True,
                      elem_id="explain-panel"):
        gr.Markdown("At the first divergent token (or click any token of either column), each "
                    "layer's residual stream through the final norm and LM head in both models, "
                    "and the compressed model run with one component's output replaced by the "
                    "dense model's: which components restore the dense token.")
        with gr.Row():
            position = gr.Number(value=-1, precision=0, label="Position (-1: the first "
                                 "divergent token)", elem_id="explain-position")
            scope = gr.Radio(list(SCOPES), value="every position up to it", label="Patch at",
                             elem_id="explain-scope")
            granularity = gr.Radio(list(GRANULARITIES), value="component", label="Patch one",
                                   elem_id="explain-granularity")
            run = gr.Button("Explain the first divergent token", elem_id="explain-run")
        status = common.StatusText("", elem_id="explain-status")
        with gr.Row():
            lens = gr.Plot(label="Logit lens (after an explanation)", elem_id="explain-lens")
            heat = gr.Plot(label="Restoring power per component (after an explanation)",
                           elem_id="explain-heatmap")
        table = gr.Dataframe(label="Components, most restoring first (after an explanation)",
                             interactive=False, elem_id="explain-table", max_height=320,
                             headers=readable_headers(c for c in PATCH_COLUMNS if c != "order"))
        csv = gr.File(label="Patching map CSV", elem_id="explain-csv")
        with gr.Row(elem_classes="dtm-hidden"):
            clicked = gr.Textbox(elem_id="explain-clicked", show_label=False, container=False)
            open_btn = gr.Button("explain token", elem_id="explain-open")
    inputs = pair.side + [prompt, chat, new_tokens, position, scope, granularity] + pair.calib
    outputs = [lens, heat, table, status, csv]
    run.click(lambda: -1, None, [position], queue=False).then(
        run_explain, inputs, outputs, concurrency_id="model")
    # (assets/app.js puts a clicked token's position into the hidden box and presses the button)
    open_btn.click(lambda v: int(v), [clicked], [position], queue=False).then(
        run_explain, inputs, outputs, concurrency_id="model")


def run_explain_set(model, spec, upload, builtin, chat, new_tokens, layers, kinds,
                    progress=gr.Progress()):
    """Over the Sensitivity tab's prompt set, with its spec on the selected components at once:
    how often each component ranks first at a prompt's first divergent token."""
    try:
        pset = common.load_set(upload, builtin)
        spans = [p.strip() for p in (layers or "*").split(",") if p.strip()] or ["*"]
        wanted = [k.strip() for k in (kinds or "*").split(",") if k.strip()] or ["*"]
        selection = ",".join(f"{s}.{k}" for s in spans for k in wanted)
        req = PairRequest(model=(model or "default").strip(), compress=spec.strip(),
                          components=selection, chat=bool(chat))
        pair = common.CACHE.open(req, pset.prompts)
        ids = encode_prompts(pair.tokenizer, pset.prompts, chat=bool(chat))
        table, found = explain_set(pair, ids, int(new_tokens),
                                   progress=lambda f, m: progress(f, desc=m))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        return None, None, friendly(exc)
    if not found:
        return None, None, "No prompt of the set diverges within N tokens: nothing to explain."
    top = table.iloc[0]
    msg = (f"{len(found)} of {len(ids)} prompts diverge with {spec} on {selection}; "
           f"{top.component} carries the first divergence of {int(top['first'])} of them "
           "(ranked first by patching, the smallest KL to the dense distribution after it).")
    return first_ranked_bars(table), readable_table(table.head(30)), msg


def build_set(model, spec, upload, builtin, chat, new_tokens, layers, kinds) -> None:
    """The prompt-set view next to the sensitivity heatmap."""
    gr.Markdown("Which component carries each prompt's first divergence: each diverging prompt "
                "of the set, with the spec on the selected layers and kinds, patched back to "
                "dense one component at a time.")
    with gr.Row():
        run = gr.Button("Explain every prompt's first divergent token", variant="primary",
                        elem_id="explain-set-run")
    status = common.StatusText("", elem_id="explain-set-status")
    with gr.Row():
        bars = gr.Plot(label="Ranked first, by prompt (after Explain every prompt's first "
                             "divergent token)", elem_id="explain-set-bars")
        table = gr.Dataframe(label="Components that carry first divergences (after a run)",
                             interactive=False, elem_id="explain-set-table",
                             headers=["component", "ranked first (prompts)",
                                      "mean restored (%)"], max_height=320)
    run.click(run_explain_set, [model, spec, upload, builtin, chat, new_tokens, layers, kinds],
              [bars, table, status], concurrency_id="model")
