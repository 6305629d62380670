"""The Compare tab: both models stream side by side, then the engine's teacher-forced numbers; the
attention-sink view of the same prompt."""
from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr

from dtm_core import DTMError
from dtm_core.models.generation import encode_prompts
from dtm_core.compression.intactkv import describe_pivots
from dtm_core.jobs import calibration_note, compare_variants, resolve_intactkv
from dtm_core.models.load import DEFAULT_DESCRIPTION, eos_ids
from dtm_core.analysis.sinks import pair_sinks
from dtm_core.measure.streaming import stream_pair

from . import common
from .common import STOPS, IntactKVForm, PairForm
from .strip import free_run_note, render_strip, stream_differs
from .render import (ACCEPT_HINT, FDT_HINT, N_TOKENS, SDT_HINT, TokenTexts,
                     accept_from_sdt_map, card_head, card_sub, fdt_badge, friendly,
                     position_plot, render_column, render_sdt_map, sink_figures)

UPDATE_EVERY_S = 0.04  # throttle for streamed page updates (each carries both columns)


@dataclass
class CompareTab:
    prompt: gr.Textbox
    chat: gr.Checkbox
    new_tokens: gr.Slider


def compare(model, preset, spec, components, checkpoint, prompt, chat, new_tokens,
            ikv_text="off", ikv_cal=False, calib_steps=50, calibration=None,
            calibration_file=None, calib_ctx=None, calib_samples=None, sequential=True,
            thinking=None,
            request: gr.Request = None, progress=gr.Progress()):
    """Generator: stream both generations, then finalize with the engine's teacher-forced pass.

    Inputs come positionally in the order API clients have always used; the calibration inputs
    came last."""
    empty = ("", "", "–", "–", None, "")    # + status, strip
    try:
        if not (prompt or "").strip():
            raise DTMError("Type a prompt first.")
        req = common.pair_request(model, preset, spec, components, checkpoint, chat, calibration,
                                  calibration_file, calib_ctx, calib_samples,
                                  sequential)
        setting = common.intactkv_setting(ikv_text, ikv_cal, calib_steps)
        yield empty + ("Starting…", "")
        if not common.CACHE.cached(req.model):
            yield empty + (
                f"Loading {req.model}… (the first load of the default model de-quantizes its "
                "GGUF, about 15 s; later loads use the cache)", "")
        pair = common.CACHE.open(req, [prompt])
        n = int(new_tokens)
        tok = pair.tokenizer
        if setting.calibrated and setting.parse() is not None:
            yield empty + ("Calibrating the pivot KV on "
                           f"{req.calibration.texts([prompt], 'the prompt in use')[1]} (cached "
                           "after the first time)…", "")
        ikv = resolve_intactkv(setting, pair, [prompt], chat=bool(chat),
                               calibration=req.calibration,
                               progress=common.calib_progress(progress))
        pivots = common.pivot_note(tok, ikv, prompt, chat)
        with STOPS.running("compare", request) as stop:
            t0 = last = time.perf_counter()
            state = None
            dtx, ctx = TokenTexts(tok), TokenTexts(tok)

            def columns(st, f):
                return (render_column(tok, st, "dense", f, dtx),
                        render_column(tok, st, "comp", f, ctx))

            think = None if thinking is None or not chat else bool(thinking)
            for state in stream_pair(pair, prompt, n, chat=bool(chat), stop=stop, intactkv=ikv,
                                     thinking=think):
                now = time.perf_counter()
                if now - last < UPDATE_EVERY_S and not (state.dense_done and state.comp_done):
                    continue  # the page is updated at most every UPDATE_EVERY_S seconds
                last = now
                yield (*columns(state, state.fdt), fdt_badge(state), f"{state.sdt:.0%}", None,
                       "", f"Streaming… {len(state.steps)} tokens, {now - t0:.1f} s.{pivots}",
                       render_strip(stream_differs(state), n, state.fdt))
        if state is None:
            return
        if state.stopped:
            f = state.fdt
            yield (*columns(state, f),
                   fdt_badge(state), f"{state.sdt:.0%}", position_plot(state), "",
                   f"Stopped after {len(state.steps)} tokens.",
                   render_strip(stream_differs(state), n, f))
            return
        # The engine's batch computation on the same prompt: the numbers the CLI reports.
        variants = {"main": ikv} if ikv is None else {"main": ikv, "plain": None}
        cmp = compare_variants(pair, [state.prompt_ids], n, variants,
                               references=[state.dense_tokens])
        res = cmp.runs["main"]
        row = res.table.iloc[0]
        if ikv is not None:
            plain = cmp.runs["plain"].table.iloc[0]
            pivots += (f" Without IntactKV: FDT {int(plain.fdt)}, SDT {plain.sdt:.1%}, "
                       f"mean KL {plain.kl_mean:.4f}.")
        f = int(row.fdt)
        tm = res.tokens[0]
        note = "" if f == state.fdt else (f" (the live stream saw {state.fdt}: a numerical "
                                          "near-tie between cached and full forward passes)")
        calib = calibration_note(pair)
        yield (*columns(state, f), str(f), f"{row.sdt:.0%}", position_plot(state, f),
               render_sdt_map(tok, state.dense_tokens, tm.agree.tolist()),
               f"Done: {len(state.dense_tokens)} dense tokens, FDT {f}, SDT {row.sdt:.1%}, "
               f"mean KL {row.kl_mean:.4f} nats, {pair.dense.source} vs {pair.label}"
               f"{free_run_note(state, eos_ids(pair.dense))}"
               f"{f' with IntactKV {ikv.label}' if ikv else ''}{note}.{pivots} "
               f"{calib + ' ' if calib else ''}"
               f"{DEFAULT_DESCRIPTION if pair.dense.source == 'default' else ''}",
               render_strip((~tm.agree).tolist(), n, f))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        yield empty + (friendly(exc), "")


def run_sinks(model, preset, spec, components, checkpoint, ikv_text, prompt, chat, k,
              calibration=None, calibration_file=None, calib_ctx=None, calib_samples=None,
              sequential=True):
    from dtm_core.compression.intactkv import IntactKV

    try:
        if not (prompt or "").strip():
            raise DTMError("Type a prompt first.")
        req = common.pair_request(model, preset, spec, components, checkpoint, chat, calibration,
                                  calibration_file, calib_ctx, calib_samples,
                                  sequential)
        pair = common.CACHE.open(req, [prompt])
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


EXAMPLE_PROMPT = "The three primary colors are"


def example_setup():
    """A prompt and int4:g64 on every linear: streams in seconds on the default model."""
    return EXAMPLE_PROMPT, False, 48, common.CUSTOM, "int4:g64", "*.*"


def build(pair: PairForm, ikv: IntactKVForm) -> CompareTab:
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", scale=4,
                            placeholder="The capital of France is")
        with gr.Column(scale=1):
            with gr.Row():
                chat = gr.Checkbox(value=False, label="Chat template", elem_id="chat",
                                   min_width=80)
                thinking = gr.Checkbox(value=True, label="Thinking", elem_id="thinking",
                                       min_width=80)
            new_tokens = gr.Slider(1, 2048, value=48, step=1, label="Max new tokens",
                                   elem_id="new-tokens")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="generate",
                                     min_width=90)
                stop = gr.Button("Stop", variant="stop", elem_id="stop", min_width=60)
                example = gr.Button("Example", elem_id="compare-example", min_width=70)
    status = common.StatusText("", elem_id="status")
    with gr.Row(elem_classes="badges"):
        # a card each: label (definition on hover), the number, N (filled in from the N setting
        # by assets/app.js); the outputs #fdt and #sdt stay the plain values API clients read
        with gr.Column(elem_classes="metric-card"):
            gr.HTML(card_head("First divergent token (FDT)", FDT_HINT))
            fdt = gr.HTML("–", elem_id="fdt")
            gr.HTML(card_sub(f"tokens, of N = {N_TOKENS} new tokens"))
        with gr.Column(elem_classes="metric-card"):
            gr.HTML(card_head("Share of divergent tokens (SDT)", SDT_HINT))
            sdt = gr.HTML("–", elem_id="sdt")
            gr.HTML(card_sub(f"of the positions up to N = {N_TOKENS}"))
        with gr.Column(elem_classes="metric-card"):
            gr.HTML(card_head("Accepted per step as a draft (K = 4)", ACCEPT_HINT))
            accept = gr.HTML("–", elem_id="accept")
            gr.HTML(card_sub("of 4 draft tokens, per verification step (when the run "
                             "finishes)"))
    with gr.Row():
        with gr.Column():
            with gr.Row(elem_classes="column-head-row"):
                gr.Markdown("### Dense", elem_classes="column-head")
                # the divergence strip over the dense text, its jump button inside it (ui/strip)
                strip = gr.HTML("", elem_id="diff-strip")
            dense_out = gr.HTML("", elem_id="dense-output")
        with gr.Column():
            gr.Markdown("### Compressed", elem_classes="column-head")
            comp_out = gr.HTML("", elem_id="compressed-output")
    plot = gr.Plot(label="Per position: KL and probability of the dense token (after Generate)",
                   elem_id="position-plot")
    gr.Markdown("### Teacher-forced view (SDT map): green where the compressed model's argmax on "
                "the dense prefix agrees, red where it differs")
    sdt_map = gr.HTML("", elem_id="sdt-map")
    # later inputs last: API clients written before them keep working (defaults: off)
    generate.click(compare, pair.side + [prompt, chat, new_tokens] + ikv.inputs + pair.calib
                   + [thinking],
                   [dense_out, comp_out, fdt, sdt, plot, sdt_map, status, strip],
                   concurrency_id="model", api_name="compare"
                   ).then(accept_from_sdt_map, [sdt_map], [accept], queue=False,
                          show_progress="hidden")
    with gr.Accordion("Attention sinks and massive activations", open=False,
                      elem_id="sinks-panel"):
        gr.Markdown("How much attention later tokens put on the first K tokens of this prompt, "
                    "per layer and head (hover for values), dense next to compressed; and the "
                    "largest hidden-state magnitude at those tokens against the median.")
        with gr.Row():
            sink_k = gr.Number(value=0, precision=0, minimum=0, label="K (0: the IntactKV "
                               "setting, else 1)", elem_id="sinks-k")
            sink_btn = gr.Button("Show attention sinks", elem_id="sinks-run")
        sink_status = common.StatusText("", elem_id="sinks-status")
        sink_heat = gr.Plot(label="Attention to each key position, per layer (after a run)",
                            elem_id="sink-heatmap")
        sink_act = gr.Plot(label="Largest hidden-state activations per layer (after a run)",
                           elem_id="massive-plot")
    sink_btn.click(run_sinks, pair.side + [ikv.pivots, prompt, chat, sink_k] + pair.calib,
                   [sink_heat, sink_act, sink_status], concurrency_id="model")
    stop.click(STOPS.stopper("compare", "Stopping…"), None, [status], queue=False)
    example.click(example_setup, None, [prompt, chat, new_tokens, pair.preset, pair.spec,
                                        pair.components], queue=False)
    from . import explain as explain_ui
    explain_ui.build(pair, prompt, chat, new_tokens)
    return CompareTab(prompt=prompt, chat=chat, new_tokens=new_tokens)
