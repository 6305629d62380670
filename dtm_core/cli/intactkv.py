"""``intactkv-calibrate``: train the pivot KV (IntactKV+Cal) and compare FDT with plain and
uncalibrated IntactKV."""
from __future__ import annotations

import json

from dtm_core.cli import options as opt
from dtm_core.errors import DTMError

NAME = "intactkv-calibrate"


def add_parser(sub) -> None:
    cal = sub.add_parser(NAME, help="train the pivot KV (IntactKV+Cal) and compare FDT with plain "
                                    "and uncalibrated IntactKV")
    opt.model_args(cal)
    cal.add_argument("--prompts", required=True,
                     help="calibration prompts (a file or a built-in set)")
    cal.add_argument("--eval-prompts", help="prompts to measure FDT on (default: --prompts)")
    cal.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    cal.add_argument("--intactkv", metavar="K|prefix",
                     help="pivot tokens (default: 'prefix' with --chat, else 1)")
    cal.add_argument("--steps", type=int, default=50)
    cal.add_argument("--lr", type=float, default=1e-2)
    cal.add_argument("--new-tokens", type=int, default=32, metavar="N")
    cal.add_argument("--out", help="also write the calibrated KV here (.safetensors)")
    cal.add_argument("--json", help="write the comparison as JSON here")


def run(args) -> int:
    from dtm_core.models.generation import encode_prompts
    from dtm_core.compression.intactkv import IntactKV, calibrate
    from dtm_core.jobs import compare_variants
    from dtm_core.measure.prompts import load_prompts

    opt.check_common(args)
    if not 1 <= args.steps <= 10000:
        raise DTMError("--steps must be between 1 and 10000.")
    ikv = IntactKV.parse(args.intactkv or ("prefix" if args.chat else "1"))
    if ikv is None:
        raise DTMError("IntactKV calibration needs pivot tokens: --intactkv K or prefix.")
    cal_set = load_prompts(args.prompts)
    eval_set = load_prompts(args.eval_prompts) if args.eval_prompts else cal_set
    pair = opt.load_pair(args, cal_set.prompts)
    cal_ids = encode_prompts(pair.tokenizer, cal_set.prompts, chat=args.chat)
    eval_ids = encode_prompts(pair.tokenizer, eval_set.prompts, chat=args.chat)
    cal = calibrate(pair, cal_ids, ikv, steps=args.steps, lr=args.lr, cache_dir=args.cache_dir,
                    progress=opt.stderr_progress)
    if args.out:
        from pathlib import Path
        cal.save(Path(args.out))
    table = compare_variants(pair, eval_ids, args.new_tokens,
                             {"plain": None, f"IntactKV {ikv.label}": ikv,
                              f"IntactKV {ikv.label}+cal": ikv.with_calibration(cal)},
                             batch_size=args.batch_size).summary_table()
    print(f"pair: {pair.dense.source} vs {pair.label}   pivot tokens: {len(cal.ids)} "
          f"{pair.tokenizer.decode(list(cal.ids))!r}")
    print(f"calibration loss (mean over layers of output MSE): {cal.loss_before:.4g} -> "
          f"{cal.loss_after:.4g} in {cal.steps} steps on {len(cal_ids)} prompts")
    print(table.to_string(index=False))
    gain = table.fdt_mean.iloc[2] - table.fdt_mean.iloc[1]
    print(f"FDT gain of calibration over plain IntactKV: {gain:+.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"loss_before": cal.loss_before, "loss_after": cal.loss_after,
                       "steps": cal.steps, "pivot_ids": list(cal.ids),
                       "variants": json.loads(table.to_json(orient="records"))}, fh, indent=2)
    return 0
