"""One model's memory (issue 32): peak memory over the dense model's size, each case in a fresh
process, on the default model and on a random-weight model of Qwen2-1.5B's shape.

    .venv/bin/python bench/bench_one_model.py [--models default,qwen2-1.5b,gptq] [--spec int4:g128]
                                              [--prompts 4] [--new-tokens 32]

Cases: ``load (first)``: the default GGUF into an empty cache (de-quantized tensor by tensor);
``load (cached)``: the same from the cache; ``divergence (two models)``: today's pair, a compressed
copy beside the dense model (``--two-models``); ``divergence (in place)``: the dense passes, then
the model compressed in place, never restored (what the CLI does: the command ends);
``divergence (in place, files)``: the same, the replaced tensors dropped and re-read from the
model's safetensors to restore it bit for bit (the app's Prompt sets and KLD tabs, plans'
verification); ``stream``: Compare's side-by-side stream, which holds both models.
Checkpoint cases (``--compressed-model``): on the default model a Q4_0 re-quantization of its GGUF,
on ``gptq`` a random Llama of about 0.75 GiB and its GPTQ checkpoint (both written by the tests'
writers); ``checkpoint load``: the GPTQ checkpoint de-quantized into its architecture
(``(compressed-tensors)``: a W4A16 checkpoint of the same model through transformers);
``checkpoint divergence (two models)``: today's checkpoint pair; ``(in place)``: the checkpoint's
tensors read one at a time into the dense model.

"peak / model" is (the process's peak resident memory - its memory before the model was loaded
or built) / the dense model's bytes. The peak is the kernel's own high-water mark (VmHWM), so
pages of memory-mapped files count too. The tokenizer (about 125 MiB for SmolLM2's, measured in a
process of its own) is part of every case whatever the model's size; "(peak - tokenizer) / model"
leaves it out. Times are of the measured step alone (the load, for the load cases). For a paired
timing of the whole command, use farm-bench on `python -m dtm_core divergence ...` with and
without `--two-models`.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dtm_core.models.load import build_gguf_cache, default_gguf_path  # noqa: E402

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
import gguf
from dtm_core.compression.pair import in_place_pair, make_pair, tensor_bytes
from dtm_core.compression.recipe import Recipe
from dtm_core.measure.divergence import divergence
from dtm_core.measure.streaming import stream_pair
from dtm_core.models.load import LoadedModel, load_model
from dtm_core.models.sources import default_gguf_path

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
def reset_peak():      # the kernel's high-water mark, from now on
    open("/proc/self/clear_refs", "w").write("5")

case, which, spec = {case!r}, {which!r}, {spec!r}
torch.manual_seed(0)
reset_peak()
base = status("VmRSS")
t = time.perf_counter()
if case == "tokenizer":
    from dtm_core.models.sources import cache_root, _file_key
    tok = AutoTokenizer.from_pretrained(str(cache_root({cache!r}) / "gguf" / _file_key(default_gguf_path())))
    print(json.dumps({{"case": case, "peak_mib": status("VmHWM"), "base_mib": base}}))
    sys.exit(0)
checkpoint = {checkpoint!r}      # the compressed side of the checkpoint cases
if case == "checkpoint load":    # the compressed checkpoint itself, loaded alone
    dense = load_model(checkpoint, cache_dir={cache!r})
elif case == "checkpoint load (compressed-tensors)":
    dense = load_model(checkpoint.replace("gptq", "ct-w4a16"), cache_dir={cache!r})
elif which == "default":
    dense = load_model("default", cache_dir={cache!r})
elif which == "gptq":
    dense = load_model({ck_base!r}, cache_dir={cache!r})
else:
    cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                   num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, max_position_embeddings=32768,
                                   tie_word_embeddings=True, rope_theta=1e6)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)
    from dtm_core.models.sources import cache_root, _file_key
    tok = AutoTokenizer.from_pretrained(str(cache_root({cache!r}) / "gguf" / _file_key(default_gguf_path())))
    dense = LoadedModel(model=model, tokenizer=tok, source="random qwen2-1.5b",
                        description="random", fingerprint="q15")
load_s = time.perf_counter() - t
model_mib = tensor_bytes(dense.model) / 2**20
after_load = status("VmRSS")
ids = [dense.tokenizer(p).input_ids for p in
       ["The history of the printing press", "Write a short poem about rain.",
        "def fibonacci(n):", "Explain photosynthesis to a child."]][:{prompts}]
t = time.perf_counter()
if case.startswith("divergence"):
    recipe = Recipe.single(spec)
    if case == "divergence (two models)":
        pair = make_pair(dense, recipe)
    else:
        pair = in_place_pair(dense, recipe, keep="files" if "files" in case else "none")
    res = divergence(pair, prompt_ids=ids, new_tokens={n})
    extra = {{"fdt_mean": float(res.table.fdt.mean()), "kl_mean": float(res.table.kl_mean.mean())}}
elif case.startswith("checkpoint divergence"):
    from dtm_core.compression.pair import checkpoint_in_place_pair
    from dtm_core.jobs import PairRequest, build_pair
    if "two models" in case:
        pair = build_pair(dense, PairRequest(model=dense.source, compressed_model=checkpoint),
                          load=lambda s: load_model(s, cache_dir={cache!r}))
    else:
        pair = checkpoint_in_place_pair(dense, checkpoint, keep="none", cache_dir={cache!r})
    res = divergence(pair, prompt_ids=ids, new_tokens={n})
    extra = {{"fdt_mean": float(res.table.fdt.mean()), "kl_mean": float(res.table.kl_mean.mean())}}
elif case == "stream":
    pair = make_pair(dense, Recipe.single(spec))
    for _ in stream_pair(pair, prompt_ids=ids[0], new_tokens={n}):
        pass
    extra = {{}}
else:
    extra = {{"from_cache": dense.from_cache}}
step_s = time.perf_counter() - t
peak = status("VmHWM")
print(json.dumps({{"case": case, "model": which, "model_mib": model_mib, "base_mib": base,
                  "after_load_mib": after_load, "peak_mib": peak,
                  "ratio": (peak - base) / model_mib, "load_s": load_s, "step_s": step_s,
                  **extra}}))
"""


def run(case, which, spec, cache, prompts, n, checkpoint="", ck_base=""):
    code = CHILD.format(root=ROOT, case=case, which=which, spec=spec, cache=cache,
                        prompts=prompts, n=n, checkpoint=checkpoint, ck_base=ck_base)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{case} on {which} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare_checkpoints(cache, models):
    """The compressed checkpoints of the checkpoint cases: a Q4_0 re-quantization of the default
    GGUF (gguf-py, decoder matrices only; its de-quantized cache built here, as a second run
    finds it), and for ``gptq`` a random Llama of about 0.75 GiB (hidden 1024, 8 layers, the
    default vocabulary) with its GPTQ checkpoint (4 bits, g32, act-order), written by the tests'
    writers."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    out = {}
    root = os.path.join(cache, "checkpoints")
    os.makedirs(root, exist_ok=True)
    if "default" in models:
        from gguf_requant import requantize
        q4 = os.path.join(root, "q4_0.gguf")
        requantize(str(default_gguf_path()), q4, "Q4_0")
        out["default"] = (q4, "")
    if "gptq" in models:
        import checkpoint_writers as W
        W.base_model(Path(root) / "base", layers=8, hidden=1024, intermediate=2816)
        W.write_gptq(Path(root) / "base", Path(root) / "gptq", act_order=True)
        W.write_ct(Path(root) / "base", Path(root) / "ct-w4a16", "W4A16")
        out["gptq"] = (os.path.join(root, "gptq"), os.path.join(root, "base"))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="default,qwen2-1.5b,gptq")
    ap.add_argument("--spec", default="int4:g128")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--only", default="", help="run only the cases whose name holds this text")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        run("load (first)", "default", args.spec, cache, 1, 1)      # the cache the others read
        t = run("tokenizer", "default", args.spec, cache, 1, 1)
        tok = t["peak_mib"] - t["base_mib"]
        checkpoints = prepare_checkpoints(cache, args.models.split(","))
        for which in args.models.split(","):
            cases = (["load (first)", "load (cached)"] if which == "default" else []) + ([
                "divergence (two models)", "divergence (in place)"] if which != "gptq" else []) + (
                ["divergence (in place, files)"] if which == "default" else []) + (
                ["stream"] if which != "gptq" else []) + (
                (["checkpoint load", "checkpoint load (compressed-tensors)"]
                 if which == "gptq" else []) + [
                 "checkpoint divergence (two models)", "checkpoint divergence (in place)"]
                if which in checkpoints else [])
            for case in [c for c in cases if args.only in c]:
                if case == "load (first)":
                    for f in os.listdir(cache):
                        if f != "checkpoints":
                            shutil.rmtree(os.path.join(cache, f))
                ck, ck_base = checkpoints.get(which, ("", ""))
                if case.startswith("checkpoint") and which == "default":
                    build_gguf_cache(Path(ck), cache)    # as a second run finds it
                r = run(case, which, args.spec, cache, args.prompts, args.new_tokens, ck, ck_base)
                rows.append(r)
                print(json.dumps(r), file=sys.stderr)
    print(f"spec {args.spec}, {args.prompts} prompts, N = {args.new_tokens}; the tokenizer "
          f"alone adds {tok:.0f} MiB to a process (the same in every case)\n")
    print("| model | case | model MiB | peak over base MiB | peak / model | (peak - tokenizer) "
          "/ model | step s | vs two models |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        two = next((x for x in rows if x["model"] == r["model"]
                    and x["case"] == "divergence (two models)"), None)
        vs = (f"{r['step_s'] / two['step_s']:.2f}x time" if two and
              r["case"].startswith("divergence") else "")
        over = r["peak_mib"] - r["base_mib"]
        if r["case"].startswith(("load", "checkpoint load")):
            r["step_s"] = r["load_s"]
        print(f"| {r['model']} | {r['case']} | {r['model_mib']:.0f} | {over:.0f} | "
              f"{r['ratio']:.2f} | {(over - tok) / r['model_mib']:.2f} | {r['step_s']:.1f} | "
              f"{vs} |")


if __name__ == "__main__":
    main()
