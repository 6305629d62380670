"""``checkpoint``: what a compressed checkpoint is (format, schemes, what is kept, size), and
whether it is a compression of a given base."""
from __future__ import annotations

import json

NAME = "checkpoint"


def add_parser(sub) -> None:
    ck = sub.add_parser(NAME, help="what a compressed checkpoint is: format, scheme per "
                                   "group of layers, what is kept, size on disk")
    ck.add_argument("path", help="a checkpoint folder (llm-compressor, GPTQ, AWQ, bitsandbytes, "
                                 "torchao) or a .gguf file")
    ck.add_argument("--base", metavar="MODEL",
                    help="the base model: compare sizes, and check (by loading both) that the "
                         "checkpoint is a compression of it")
    ck.add_argument("--json", help="write the description as JSON here")
    ck.add_argument("--device", default="cpu")


def run(args) -> int:
    from dtm_core.models.checkpoints import inspect

    info = inspect(args.path, base=args.base)
    print(info.text())
    out = info.to_json()
    if args.base:
        from dtm_core.jobs import build_pair, PairRequest
        from dtm_core.models.load import load_model

        dense = load_model(args.base, device=args.device)
        build_pair(dense, PairRequest(model=args.base, compressed_model=args.path),
                   load=lambda src: load_model(src, device=args.device))
        print(f"- a compression of {args.base}: same tokenizer, architecture and tensor shapes")
        out["base"] = args.base
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
    return 0
