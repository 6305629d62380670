"""What the commands share: the model and compressed-side options, calibration and IntactKV
options, the pair a command's arguments describe (checked before any model loads), the pair cache,
torchrun's process group, progress on stderr and the summary printout."""
from __future__ import annotations

import argparse
import sys

from dtm_core.errors import DTMError


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default', a local transformers folder, a .gguf file or a hub id "
                        "(from the local Hugging Face cache)")
    side = p.add_argument_group("compressed side (give one)")
    side.add_argument("--compress", metavar="SPEC", help=spec_help())
    side.add_argument("--components", default="*.*", metavar="SELECTION",
                      help="comma-separated LAYERS.KIND, e.g. '*.q,*.k,0-3.down' (default: all)")
    side.add_argument("--recipe", metavar="JSON", help="a recipe file (list of spec + components)")
    side.add_argument("--compressed-model", metavar="PATH",
                      help="a second checkpoint of the same base instead of --compress")
    calibration_arg(p)
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="a whole-model recipe gathers each layer's calibration statistics on the "
                        "outputs of the layers before it as already compressed (full-model "
                        "GPTQ); default: on for gptq, sparsegpt, wanda and awq (as llm-compressor "
                        "runs them), off otherwise; --no-sequential: every component sees the "
                        "dense model's inputs")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, "
                                                    "bfloat16, float16")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model's own Python code to run (off unless asked)")
    p.add_argument("--cache-dir", help="cache folder (default $XDG_CACHE_HOME/dtm-inspector)")
    p.add_argument("--batch-size", type=int, default=16)
    gpus_arg(p)


def gpus_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus-per-rank", type=int, default=0, metavar="K",
                   help="under torchrun with CUDA: place each rank's models over K of its "
                        "node's GPUs (rank r of the node gets GPUs rK .. rK+K-1), e.g. 2 ranks "
                        "x 4 GPUs on an 8-GPU node")


def spec_help() -> str:
    from dtm_core.compression.methods import METHODS
    return "; ".join(f"{' | '.join(c.forms)}: {c.summary}" for c in METHODS.values())


def calibration_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", metavar="FILE",
                   help="prompts (a prompt file, a plain text or a built-in set) for the "
                        "statistics a method needs (wanda, gptq, sparsegpt, awq) and for "
                        "calibrated IntactKV; default: the evaluated prompts")
    p.add_argument("--calib-ctx", type=int, metavar="T",
                   help="cut the calibration text into chunks of T tokens (default: one "
                        "sequence per prompt)")
    p.add_argument("--calib-samples", type=int, metavar="M",
                   help="use the first M calibration sequences (prompts or chunks); default all")


def calibration_setting(args):
    from dtm_core.jobs import CalibrationSetting
    return CalibrationSetting.of(getattr(args, "calibration", None),
                                 getattr(args, "calib_ctx", None),
                                 getattr(args, "calib_samples", None))


def intactkv_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("IntactKV (the compressed model uses the dense KV of pivot tokens)")
    g.add_argument("--intactkv", metavar="K|prefix",
                   help="keep the dense model's KV cache for the first K input tokens, or for "
                        "the chat template's system prefix ('prefix', needs --chat); "
                        "default off. Runs are compared with the plain compressed model.")
    g.add_argument("--intactkv-calibrated", action="store_true",
                   help="use calibrated pivot KV (trained on the prompts, or on --calibration; "
                        "cached, so a second run reuses it)")
    g.add_argument("--calib-steps", type=int, default=50, metavar="S",
                   help="calibration steps (default 50)")
    g.add_argument("--calib-lr", type=float, default=1e-2, help="calibration learning rate")


def builtin_sets() -> list[str]:
    from dtm_core.measure.prompts import builtin_names
    return builtin_names()


def pair_request(args):
    """The pair the arguments describe, checked before any model loads."""
    from dtm_core.compression.recipe import Recipe
    from dtm_core.jobs import PairRequest

    if args.compress is None and not args.recipe and not args.compressed_model:
        raise DTMError("Give the compressed side: --compress SPEC, --recipe FILE or "
                       "--compressed-model PATH.")
    req = PairRequest(model=args.model, compress=args.compress, components=args.components,
                      recipe=Recipe.load(args.recipe) if args.recipe else None,
                      compressed_model=args.compressed_model,
                      calibration=calibration_setting(args),
                      chat=getattr(args, "chat", False),
                      sequential=getattr(args, "sequential", None))
    req.validate()
    return req


def pair_cache(args):
    from dtm_core.distributed import rank_gpus
    from dtm_core.jobs import PairCache

    gpus = rank_gpus(getattr(args, "gpus_per_rank", 0))
    return PairCache(max_pairs=1, device=args.device, dtype=args.dtype,
                     trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir,
                     **({"gpus": gpus} if gpus else {}))


# set by the program's entry point (``python -m dtm_core``, ``dtm-inspector``): the process ends
# with the command, so nothing it compresses in place needs restoring
PROCESS_ENDS = False


def one_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--two-models", action="store_true",
                   help="keep the compressed side beside the dense model (a compressed copy, "
                        "or the checkpoint loaded as a second model: about twice the memory); "
                        "default: one model's memory, the dense passes first, then the model "
                        "compressed in place or, for a checkpoint whose format allows it, its "
                        "tensors read into the model (same numbers)")


def in_place_of(args) -> str | None:
    """The keep mode of a command that may compress the dense model in place (None: a pair of
    two models): run as a program, the process ends after the command, so the dense weights
    need not come back (``none``); called from Python, the model is restored (``auto``)."""
    from dtm_core.distributed import world

    if getattr(args, "two_models", True) or getattr(args, "intactkv", None) \
            or world()[1] > 1:
        return None
    return "none" if PROCESS_ENDS else "auto"


def load_pair(args, prompts: list[str], in_place: str | None = None):
    """The pair of a command; ``prompts`` are the evaluated prompts (the default calibration);
    ``in_place``: see :meth:`dtm_core.jobs.PairCache.open`."""
    from dtm_core.jobs import calibration_note

    pair = pair_cache(args).open(pair_request(args), prompts, in_place=in_place)
    if pair.calibration is not None:
        print(calibration_note(pair), file=sys.stderr)
    if "checkpoint" in pair.config:
        from dtm_core.models.checkpoints import CheckpointInfo
        print(CheckpointInfo(**pair.config["checkpoint"]).text(), file=sys.stderr)
    return pair


def check_common(args) -> None:
    if args.batch_size < 1:
        raise DTMError("--batch-size must be at least 1.")
    if getattr(args, "new_tokens", 1) < 1:
        raise DTMError("--new-tokens must be at least 1.")


def intactkv_of(args, pair, prompts: list[str]):
    """The IntactKV setting of a command (None when off), calibrated when asked."""
    from dtm_core.jobs import IntactKVSetting, resolve_intactkv

    setting = IntactKVSetting(pivots=getattr(args, "intactkv", None),
                              calibrated=getattr(args, "intactkv_calibrated", False),
                              steps=getattr(args, "calib_steps", 50),
                              lr=getattr(args, "calib_lr", 1e-2))
    if setting.calibrated and setting.parse() is None:
        raise DTMError("--intactkv-calibrated needs --intactkv K or --intactkv prefix.")
    ikv = resolve_intactkv(setting, pair, prompts, chat=getattr(args, "chat", False),
                           calibration=calibration_setting(args),
                           cache_dir=args.cache_dir, progress=stderr_progress)
    if ikv is not None and ikv.calibrated is not None:
        cal = ikv.calibrated
        print(f"calibrated pivot KV: loss {cal.loss_before:.4g} -> {cal.loss_after:.4g}",
              file=sys.stderr)
    return ikv


def print_summary(header: str, summary: dict) -> None:
    print(header)
    for k, v in summary.items():
        print(f"{k:>24}: {v:.4g}" if isinstance(v, float) else f"{k:>24}: {v}")


def stderr_progress(frac: float, message: str) -> None:
    """The engine's progress line on stderr, rewritten in place (only when stderr is a terminal;
    sweeps and prompt sets say done/total, time left and rate: :mod:`dtm_core.progress`)."""
    if sys.stderr.isatty():
        print(f"\r{message[:110]:<110}", end="", file=sys.stderr, flush=True)
        if frac >= 1:
            print(file=sys.stderr)


def join_world(pair) -> tuple:
    """Under torchrun: (the process group's c10d store, this rank); alone: (None, 0)."""
    import os

    from dtm_core.distributed import init, world

    rank, size = world()
    if size <= 1:
        return None, 0
    import torch
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // size))
    return init(str(next(pair.dense.model.parameters()).device.type)), rank


def thinking_args(p) -> None:
    p.add_argument("--thinking", choices=["on", "off"], default=None,
                   help="with --chat: enable_thinking for chat templates that take it (Qwen3); "
                        "default: the template's own")


def thinking_of(args, tokenizer) -> bool | None:
    """--thinking as a bool (None: not given); says on stderr when it cannot apply."""
    from dtm_core.models.generation import takes_thinking

    if args.thinking is None:
        return None
    if not args.chat:
        raise DTMError("--thinking applies to chat templates: add --chat.")
    if not takes_thinking(tokenizer):
        print("warning: this model's chat template has no thinking switch (enable_thinking); "
              "--thinking changes nothing.", file=sys.stderr)
    return args.thinking == "on"
