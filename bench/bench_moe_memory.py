"""Memory of a pair on a mixture-of-experts model (issue: every model family).

A pair shares every untouched tensor with the dense model. Experts are stored as one 3-D parameter
per kind and layer (experts x out x in); a pair's experts parameter is an ExpertOverrides over the
dense one, so compressing one expert copies that expert's matrix only, and the whole kind copies
every expert's matrix once. Prints the extra bytes of each pair against the dense model, measured
in this run on a random-weight Mixtral-shaped model.

    .venv/bin/python bench/bench_moe_memory.py [--experts 8] [--hidden 256] [--layers 4]
"""
import argparse

import torch


def main():
    from transformers import AutoModelForCausalLM, MixtralConfig

    from dtm_core.compression.recipe import Recipe
    from dtm_core.models.load import LoadedModel
    from dtm_core.compression.pair import make_pair, tensor_bytes

    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    cfg = MixtralConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=8,
                        num_key_value_heads=2, num_local_experts=args.experts,
                        num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    lm = LoadedModel(model=model, tokenizer=None, source="mixtral", description="",
                     fingerprint="bench")
    dense = tensor_bytes(model)
    expert_matrix = model.model.layers[0].mlp.experts.down_proj[0].numel() * 4
    kind_param = model.model.layers[0].mlp.experts.down_proj.numel() * 4
    print(f"dense model {dense / 2**20:.1f} MiB; one expert's down matrix "
          f"{expert_matrix / 2**20:.2f} MiB; one layer's experts.down parameter "
          f"{kind_param / 2**20:.2f} MiB ({args.experts} experts)")
    for sel in ("0.e0.down", "0.experts.down", "0.e0.down,0.e1.down", "*.experts.down", "*.q"):
        pair = make_pair(lm, Recipe.single("int4", sel))
        extra = tensor_bytes(model, pair.compressed) - dense
        print(f"{sel:<22} extra {extra / 2**20:8.2f} MiB = {extra / dense:6.1%} of the dense "
              f"model; {extra / expert_matrix:5.1f} expert matrices")


if __name__ == "__main__":
    main()
