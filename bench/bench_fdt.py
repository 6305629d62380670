"""Teacher-forced FDT versus generating the compressed model's continuation (issue: core engine).

Both sides start from the same dense reference continuations and are batched the same way (one
padded batch of all prompts). Prints the ratio measured in this run.

    .venv/bin/python bench/bench_fdt.py [--prompts 12] [--new-tokens 64] [--spec int8]
"""
import argparse
import time


import torch  # noqa: E402

from dtm_core.compression.recipe import Recipe  # noqa: E402
from dtm_core.measure.divergence import divergence, first_difference, pad_id_of  # noqa: E402
from dtm_core.models.generation import encode_prompts, greedy_generate, teacher_forced_logits  # noqa
from dtm_core.models.load import eos_ids, load_model  # noqa: E402
from dtm_core.compression.pair import make_pair  # noqa: E402
from dtm_core.measure.prompts import load_prompts  # noqa: E402


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--spec", default="int8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    dense = load_model(args.model, device=args.device)
    pair = make_pair(dense, Recipe.single(args.spec))
    prompts = load_prompts("general").prompts[:args.prompts]
    ids = encode_prompts(dense.tokenizer, prompts)
    n, pad, eos, B = args.new_tokens, pad_id_of(dense.tokenizer), eos_ids(dense), len(ids)
    refs = greedy_generate(dense.model, ids, n, pad, eos, batch_size=B)
    full = [p + r for p, r in zip(ids, refs)]

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def teacher_forced():
        logits = teacher_forced_logits(pair.compressed, full, pad)
        out = []
        for j, (p, r) in enumerate(zip(ids, refs)):
            am = logits[j, len(p) - 1:len(p) - 1 + len(r)].argmax(-1).tolist()
            out.append(first_difference(r, am, n) if am != r else n)
        sync()
        return out

    def generated():
        gen = greedy_generate(pair.compressed, ids, n, pad, eos, batch_size=B)
        sync()
        return [first_difference(r, g, n) for r, g in zip(refs, gen)]

    def one_at_a_time():
        gen = [greedy_generate(pair.compressed, [p], n, pad, eos)[0] for p in ids]
        sync()
        return gen

    teacher_forced(), generated()  # warm up
    t_tf, fdt_tf = best_of(teacher_forced, args.repeats)
    t_gen, fdt_gen = best_of(generated, args.repeats)
    t_one, _ = best_of(one_at_a_time, 1)
    t_full, res = best_of(lambda: divergence(pair, prompt_ids=ids, new_tokens=n, batch_size=B,
                                             references=refs), 1)
    print(f"device={dense.device} dtype={dense.dtype} prompts={B} N={n} spec={args.spec}")
    print(f"teacher-forced FDT (compressed, one padded forward): {t_tf:.3f} s")
    print(f"batched generation of the compressed continuation:    {t_gen:.3f} s")
    print(f"one prompt at a time generation:                      {t_one:.3f} s")
    print(f"full divergence() metrics (both models, all metrics):  {t_full:.3f} s")
    print(f"FDT agree between the two methods: {fdt_tf == fdt_gen}  ({sum(fdt_tf)/B:.2f} mean)")
    print(f"RATIO batched-generate / teacher-forced = {t_gen / t_tf:.2f}x  (target >= 2.5)")
    print(f"RATIO one-at-a-time-generate / teacher-forced = {t_one / t_tf:.2f}x")


if __name__ == "__main__":
    main()
