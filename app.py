"""DTM Inspector: the Gradio app, a thin layer over dtm_core.

    python app.py [--model M] [--host 127.0.0.1] [--port 7860]

This file is the entry point and the page's layout (the pair row shared by every tab, then one tab
each from ``ui/``); handlers live with their tab and call the engine's job layer
(:mod:`dtm_core.jobs`); HTML and plots are made in ``ui/render.py``, at the edge.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from dtm_core import DTMError  # noqa: E402
from dtm_core.jobs import PairCache  # noqa: E402
from dtm_core.plugins import load_plugins  # noqa: E402
from ui import common, compare, kld, prompt_sets, sensitivity  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"


def pair_row(default_model: str) -> tuple[common.PairForm, common.IntactKVForm]:
    """The pair every tab works on: what defines it (dense model, compressed side, components or
    checkpoint) in one row, the advanced settings (IntactKV, calibration) folded under a header
    that summarizes them."""
    with gr.Row(elem_id="pair-row"):
        model = gr.Textbox(value=default_model, label="Dense model",
                           info="'default', a hub id (local cache), a folder or a .gguf",
                           elem_id="model-source", scale=1, max_lines=1)
        preset = gr.Dropdown(common.preset_choices(), value="int8", label="Compressed side",
                             elem_id="preset")
        spec = gr.Textbox(label="Custom spec", placeholder="int4:g64:asym", elem_id="spec",
                          info=common.format_help(), scale=2, max_lines=1)
        components = gr.Textbox(value="*.*", label="Components",
                                info=r"LAYERS.KIND, e.g. \*.q,\*.k,0-3.down", elem_id="components",
                                max_lines=1)
        checkpoint = gr.Textbox(label="Second checkpoint", elem_id="checkpoint",
                                placeholder="path, .gguf or hub id", max_lines=1)
    # what the checkpoint of the compressed side is (format, schemes, kept, size against the base)
    info = gr.Markdown("", elem_id="checkpoint-info")
    for event in (checkpoint.submit, checkpoint.blur, preset.change, spec.submit, spec.blur):
        event(common.checkpoint_info, [model, preset, spec, checkpoint], [info], queue=False)
    with gr.Accordion(common.settings_summary(), open=False,
                      elem_id="advanced-settings") as advanced:
        with gr.Row(elem_classes="intactkv-row"):
            intactkv = gr.Dropdown(["off", "1", "2", "4", "prefix"], value="off",
                                   allow_custom_value=True, label="IntactKV",
                                   info="keep the dense KV of the first K tokens, or of the chat "
                                        "template's system prefix",
                                   elem_id="intactkv")
            ikv_cal = gr.Checkbox(value=False, label="Calibrate the pivot KV (IntactKV+Cal)",
                                  info="trained on the calibration prompts (cached); needs the "
                                       "same first tokens in every prompt", elem_id="intactkv-cal")
            calib_steps = gr.Slider(1, 500, value=50, step=1, label="Calibration steps",
                                    elem_id="calib-steps")
        with gr.Row(elem_classes="calibration-row"):
            calibration = gr.Dropdown(common.calibration_choices(), value=common.EVALUATED,
                                      allow_custom_value=True, label="Calibration prompts",
                                      info="for methods that need statistics (wanda, gptq, "
                                           "sparsegpt, awq) and calibrated IntactKV: the prompts "
                                           "being evaluated, or a set",
                                      elem_id="calibration", scale=2)
            calibration_file = gr.File(label="or a calibration file", height=120,
                                       file_types=[".txt", ".jsonl", ".csv"],
                                       elem_id="calibration-file", scale=2)
            calib_ctx = gr.Number(value=0, precision=0, minimum=0, label="Chunk (tokens)",
                                  info="cut the calibration text into chunks of this many "
                                       "tokens; 0: one sequence per prompt", elem_id="calib-ctx")
            calib_samples = gr.Number(value=0, precision=0, minimum=0, label="Samples",
                                      info="use the first M sequences; 0: all",
                                      elem_id="calib-samples")
            sequential = gr.Checkbox(value=True, label="Sequential",
                                     info="gptq, sparsegpt, wanda and awq calibrate each layer on "
                                          "the outputs of the compressed layers before it, as "
                                          "llm-compressor does; off: every layer on dense inputs",
                                     elem_id="sequential")
    # the closed header says what the folded settings are
    folded = [intactkv, ikv_cal, calibration, calibration_file, calib_ctx, calib_samples,
              sequential]
    for box in folded:
        box.change(common.settings_header, folded, [advanced], queue=False,
                   show_progress="hidden")
    return (common.PairForm(model, preset, spec, components, checkpoint, calibration,
                            calibration_file, calib_ctx, calib_samples, sequential),
            common.IntactKVForm(intactkv, ikv_cal, calib_steps))


def build_app(default_model: str = "default") -> gr.Blocks:
    with gr.Blocks(title="DTM Inspector") as demo:
        gr.Markdown("## DTM Inspector <small>where and how a compressed LLM stops behaving like "
                    "its dense original (Divergent Token Metrics, Deiseroth et al. 2024)</small>",
                    elem_id="page-title")
        pair, ikv = pair_row(default_model)
        with gr.Tabs() as tabs:
            with gr.Tab("Compare", id="compare"):
                cmp = compare.build(pair, ikv)
            with gr.Tab("Prompt sets", id="prompt-sets"):
                sets = prompt_sets.build(pair, ikv)
            with gr.Tab("Sensitivity", id="sensitivity"):
                sens = sensitivity.build(pair, ikv.pivots)
            with gr.Tab("KLD report", id="kld"):
                kld.build(pair)
        # the Components help follows the dense model's family
        for event in (pair.model.submit, pair.model.blur, demo.load):
            event(common.component_help, [pair.model], [pair.components], queue=False,
                  show_progress="hidden")
        # wiring across tabs: a selected row or a clicked heatmap cell opens in Compare
        for table in (sets.results, sets.worst):   # first column: the prompt's index
            table.select(prompt_sets.open_in_compare, [sets.run_state],
                         [tabs, cmp.prompt, cmp.chat, cmp.new_tokens])
        to_compare = [tabs, pair.preset, pair.spec, pair.components, cmp.prompt, cmp.chat,
                      cmp.new_tokens, pair.calibration]
        sens.cells.select(sensitivity.cell_to_compare, [sens.state], to_compare)
        # (assets/app.js fills the hidden box and presses the button)
        sens.cell_open.click(sensitivity.heatmap_cell_to_compare, [sens.state, sens.clicked],
                             to_compare, queue=False)
    return demo


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SystemExit("--auth (or DTM_AUTH) must be USER:PASS")
    return user, password


def main(argv=None) -> None:
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
    ap.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                    help="GiB of model tensors the app may hold (default: the free memory): "
                         "Compare's stream, which holds a compressed copy beside the dense "
                         "model, is refused beyond it; the other views run in one model's "
                         "memory")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="heavy jobs run at once per device (queued beyond that)")
    args = ap.parse_args(argv)
    if args.memory_limit is not None and args.memory_limit <= 0:
        raise SystemExit("error: --memory-limit is a positive number of GiB, e.g. 8.")
    try:
        load_plugins()   # modules in DTM_PLUGINS register methods, metrics and families
    except DTMError as exc:
        raise SystemExit(f"error: {exc}") from None
    # in-place pairs (one model's memory) change the shared dense model while a job runs: only
    # where heavy jobs run one at a time
    common.CACHE = PairCache(device=args.device, dtype=args.dtype,
                             trust_remote_code=args.trust_remote_code,
                             in_place=args.concurrency == 1,
                             memory_limit=None if args.memory_limit is None
                             else int(args.memory_limit * 2**30))
    demo = build_app(args.model)
    demo.queue(default_concurrency_limit=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                auth=parse_auth(args.auth), max_file_size=args.max_file_size,
                css_paths=[str(ASSETS / "app.css")], js=(ASSETS / "app.js").read_text(),
                show_error=True)


if __name__ == "__main__":
    main()
