"""IntactKV on the default model (issue: IntactKV and pivot tokens).

For each spec: mean FDT, SDT and KL of the plain compressed model, with IntactKV on the first token
(IntactKV[B]-style: '<|im_start|>' in chat mode, SmolLM2 adds no BOS), with the chat template's
system prefix (IntactKV[P]) and with that prefix calibrated (IntactKV[P]+Cal), all on the same dense
references; plus the calibration loss and the extra cost of an IntactKV pass, measured in this run.

    .venv/bin/python bench/bench_intactkv.py [--specs int4:g128,int3:g128,w8a8] [--eval general]
        [--calibration instructions] [--new-tokens 32] [--steps 50]
"""
import argparse
import tempfile
import time


from dtm_core.compression.recipe import Recipe  # noqa: E402
from dtm_core.measure.divergence import divergence  # noqa: E402
from dtm_core.models.generation import encode_prompts  # noqa: E402
from dtm_core.compression.intactkv import IntactKV, calibrate  # noqa: E402
from dtm_core.models.load import load_model  # noqa: E402
from dtm_core.compression.pair import make_pair  # noqa: E402
from dtm_core.measure.prompts import load_prompts  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", default="int4:g128,int3:g128,w8a8")
    ap.add_argument("--eval", default="general")
    ap.add_argument("--calibration", default="instructions")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    dense = load_model("default")
    tok = dense.tokenizer
    ev = encode_prompts(tok, load_prompts(args.eval).prompts, chat=True)
    cal_ids = encode_prompts(tok, load_prompts(args.calibration).prompts, chat=True)
    print(f"default model, chat template, eval set '{args.eval}' ({len(ev)} prompts), "
          f"N={args.new_tokens}, calibration on '{args.calibration}' ({len(cal_ids)} prompts, "
          f"{args.steps} steps)")
    print(f"{'spec':>10} {'variant':>14} {'FDT mean':>9} {'FDT med':>8} {'SDT':>7} {'KL':>8} "
          f"{'seconds':>8}")
    refs = None
    for spec in args.specs.split(","):
        pair = make_pair(dense, Recipe.single(spec))
        t = time.perf_counter()
        cal = calibrate(pair, cal_ids, IntactKV(prefix=True), steps=args.steps,
                        cache_dir=tempfile.mkdtemp())
        t_cal = time.perf_counter() - t
        variants = {"plain": None, "first token": IntactKV(k=1), "prefix": IntactKV(prefix=True),
                    "prefix+cal": IntactKV(prefix=True).with_calibration(cal)}
        for name, ikv in variants.items():
            t = time.perf_counter()
            r = divergence(pair, prompt_ids=ev, new_tokens=args.new_tokens, references=refs,
                           intactkv=ikv)
            dt = time.perf_counter() - t
            refs = r.references
            s = r.summary
            print(f"{spec:>10} {name:>14} {s['fdt_mean']:9.2f} {s['fdt_median']:8.1f} "
                  f"{s['sdt_mean']:7.3f} {s['kl_mean']:8.4f} {dt:8.1f}", flush=True)
        print(f"{spec:>10} calibration loss {cal.loss_before:.4g} -> {cal.loss_after:.4g} "
              f"({t_cal:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
