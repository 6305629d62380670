"""The deployed formats side by side (issue: FP8, NVFP4, MXFP4 and MXFP8).

For the default model and a tiny random mixture-of-experts model (Qwen3-MoE shape, every linear
and every expert compressed), on the same prompts: mean FDT, SDT, mean KL and top-1 agreement of
every format next to int8 and int4:g128, with its bits per weight; then the time to fake-quantize
one component (the default model's layer-0 down projection, 576 x 1536) in each format against
round-to-nearest int4:g128 (the ratio; target <= 2x), measured in this run.

    .venv/bin/python bench/bench_formats.py [--prompts 16] [--new-tokens 32]
"""
import argparse
import time

import torch

from dtm_core.compression.methods import parse_spec
from dtm_core.compression.methods.formats import nominal_bits
from dtm_core.compression.pair import make_pair
from dtm_core.compression.recipe import Recipe
from dtm_core.errors import DTMError
from dtm_core.measure.divergence import divergence, reference_continuations
from dtm_core.measure.prompts import load_prompts
from dtm_core.models.generation import encode_prompts
from dtm_core.models.load import LoadedModel, load_model

SPECS = ["int8", "fp8", "fp8:dyn", "mxfp8", "int4:g128", "w4afp8", "nvfp4", "mxfp4", "int3:g64"]


def tiny_moe() -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=49152, hidden_size=128,
                               intermediate_size=256, moe_intermediate_size=64,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=32, num_experts=8, num_experts_per_tok=2,
                               max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                               pad_token_id=0, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    tok = load_model("default").tokenizer
    return LoadedModel(model=model, tokenizer=tok, source="tiny-qwen3-moe",
                       description="tiny random Qwen3-MoE (8 experts)", fingerprint="tiny-moe-0")


def table(dense: LoadedModel, prompts: list[str], n: int, components: str) -> None:
    ids = encode_prompts(dense.tokenizer, prompts)
    refs = reference_continuations(dense, ids, n)
    print("| spec | bits/weight | mean FDT | SDT | mean KL | top-1 |")
    print("|---|---|---|---|---|---|")
    for spec in SPECS:
        try:
            pair = make_pair(dense, Recipe.single(spec, components))
        except DTMError as exc:      # activation quantization on parts of an experts module
            print(f"| {spec} | {nominal_bits(parse_spec(spec)):.3f} | refused: {exc} | | | |")
            continue
        s = divergence(pair, prompt_ids=ids, references=refs, new_tokens=n).summary
        print(f"| {spec} | {nominal_bits(parse_spec(spec)):.3f} | {s['fdt_mean']:.2f} | "
              f"{s['sdt_mean']:.3f} | {s['kl_mean']:.4f} | {s['top1_agree_mean']:.3f} |")
        del pair


def _steady_allocator() -> None:
    """Keep freed memory in the process (glibc's mallopt: no mmap per large block, no trimming),
    as a long-running process that holds a model mostly does already: otherwise each few-MB
    temporary is a fresh mapping whose page faults, on this virtual machine, cost several times
    the arithmetic, and the ratios measure the allocator's state rather than the formats."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)      # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)      # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def timing(dense: LoadedModel) -> None:
    """Fake-quantizing one component, against RTN int4:g128 and against RTN on the same group
    size (what a format's scales are computed over), on the default model's down_proj and on a
    7B-sized one (4096 x 11008): best of several runs, each format right after its baselines
    so that all see the same machine load."""
    def best(specs, w, reps):
        """Each spec's best time, the specs taking turns so that all see the same load."""
        sps = [parse_spec(s) for s in specs]
        for sp in sps:
            sp.apply(w, {})
        out = [[] for _ in sps]
        for _ in range(reps):
            for sp, times in zip(sps, out):
                t = time.perf_counter()
                sp.apply(w, {})
                times.append(time.perf_counter() - t)
        return [min(times) for times in out]

    _steady_allocator()
    torch.manual_seed(0)
    mats = [("default model down_proj", dense.model.model.layers[0].mlp.down_proj.weight.detach()
             .float(), 60), ("7B-sized", torch.randn(4096, 11008) * 0.02, 3)]
    same = {"fp8": "int8", "fp8:tensor": "int8", "fp8:block128": "int8:g128", "mxfp8": "int8:g32",
            "nvfp4": "int4:g16", "mxfp4": "int4:g32", "w4afp8": "int4:g128"}
    for label, w, reps in mats:
        print(f"\nfake-quantizing one component, {label} {tuple(w.shape)}, best of {reps}:")
        print("| spec | ms | RTN int4:g128 ms | ratio | RTN, same groups | ms | ratio |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for spec, base_spec in same.items():
            base, grp, t = best(["int4:g128", base_spec, spec], w, reps)
            print(f"| {spec} | {t * 1e3:.2f} | {base * 1e3:.2f} | {t / base:.2f}x | {base_spec} | "
                  f"{grp * 1e3:.2f} | {t / grp:.2f}x |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--timing-only", action="store_true", help="only the fake-quantization times")
    args = ap.parse_args()
    prompts = load_prompts("general").prompts[:args.prompts]
    dense = load_model("default")
    if args.timing_only:
        timing(dense)
        return
    print(f"## default model ({dense.source}), every linear of every layer, "
          f"{len(prompts)} 'general' prompts, N={args.new_tokens}\n")
    table(dense, prompts, args.new_tokens, "*")
    timing(dense)
    moe = tiny_moe()
    print(f"\n## {moe.description}: attention and every expert of every layer, same prompts\n")
    table(moe, prompts, args.new_tokens, "*")


if __name__ == "__main__":
    main()
