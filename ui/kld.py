"""The KLD report tab: a text scored the way ``llama-perplexity --kl-divergence`` does."""
from __future__ import annotations

import gradio as gr

from dtm_core import DTMError
from dtm_core.kld import format_report, score_text
from dtm_core.prompts import read_text_file

from . import common
from .common import PairForm
from .render import friendly, kld_figures


def run_kld(model, preset, spec, components, checkpoint, text_file, ctx, calibration=None,
            calibration_file=None, calib_ctx=None, calib_samples=None, sequential=False,
            progress=gr.Progress()):
    try:
        path = common.upload_path(text_file)
        if not path:
            raise DTMError("Upload a plain-text file to score.")
        text = read_text_file(path)
        req = common.pair_request(model, preset, spec, components, checkpoint, False,
                                  calibration, calibration_file, calib_ctx, calib_samples,
                                  sequential)
        progress(0, desc="loading the pair")
        # the evaluated prompts of a text: its first 64 non-empty lines (as the CLI's kld)
        pair = common.CACHE.open(req, [ln for ln in text.splitlines() if ln.strip()][:64])
        stats, values = score_text(pair, text, int(ctx), progress=lambda f, m: progress(f, desc=m))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        return friendly(exc), None, None
    kld, dp = kld_figures(values)
    return f"{pair.dense.source} vs {pair.label}, ctx {int(ctx)}\n" + format_report(stats), kld, dp


def build(pair: PairForm) -> None:
    gr.Markdown("### llama.cpp-style KL-divergence report on a plain-text file\n"
                "The text is cut into chunks of `ctx` tokens and the second half of each chunk is "
                "scored, as `llama-perplexity --kl-divergence` does, for the pair above.")
    with gr.Row():
        text_file = gr.File(label="Text file", file_types=[".txt"], elem_id="kld-upload")
        ctx = gr.Number(value=512, precision=0, minimum=4, label="ctx", elem_id="kld-ctx")
        kld_btn = gr.Button("Score text", elem_id="kld-run")
    kld_report = gr.Textbox(label="Report", lines=12, elem_id="kld-report", interactive=False)
    with gr.Row():
        kld_plot = gr.Plot(elem_id="kld-hist")
        dp_plot = gr.Plot(elem_id="kld-dp")
    kld_btn.click(run_kld, pair.side + [text_file, ctx] + pair.calib,
                  [kld_report, kld_plot, dp_plot], concurrency_id="model")
