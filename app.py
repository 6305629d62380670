"""DTM Inspector: a thin Gradio layer over dtm_core."""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from dtm_core.models import DEFAULT_DESCRIPTION  # noqa: E402


def build_app(default_model: str = "default") -> gr.Blocks:
    with gr.Blocks(title="DTM Inspector") as demo:
        gr.Markdown("# DTM Inspector\nWhere and how a compressed LLM stops behaving like its "
                    f"dense original.\n\nModel: `{default_model}`. {DEFAULT_DESCRIPTION}")
    return demo


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="DTM Inspector web app")
    ap.add_argument("--model", default="default")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    args = ap.parse_args(argv)
    build_app(args.model).queue().launch(server_name=args.host, server_port=args.port,
                                         share=False)


if __name__ == "__main__":
    main()
