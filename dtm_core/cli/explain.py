"""``explain``: why a token diverged (logit lens and component patching)."""
from __future__ import annotations

import json

from dtm_core.cli import options as opt

NAME = "explain"


def add_parser(sub) -> None:
    ex = sub.add_parser(NAME, help="why a token diverged: logit lens and component "
                                   "patching at the first divergent token (or --position)")
    opt.model_args(ex)
    ex.add_argument("--prompt", required=True, help="the prompt text")
    ex.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    ex.add_argument("--new-tokens", type=int, default=32, metavar="N")
    ex.add_argument("--position", type=int, metavar="T",
                    help="the position of the dense continuation to explain (0-based; default: "
                         "the first divergent token)")
    ex.add_argument("--scope", choices=["all", "position"], default="all",
                    help="patch every position up to T (default) or T only (the direct effect)")
    ex.add_argument("--granularity", choices=["component", "layer", "model"],
                    default="component", help="patch one component, a whole layer's "
                                              "components, or all at once")
    ex.add_argument("--patch", default="*", metavar="SELECTION",
                    help="the components to patch (default: every one, and the recipe's own "
                         "slices, experts and KV caches; with a kv:-only recipe, its caches); "
                         "LAYER.kcache, LAYER.vcache or LAYERS.kv patch a layer's cache back "
                         "to the dense entries")
    ex.add_argument("--no-reverse", action="store_true",
                    help="skip the reverse (the dense model with one compressed component)")
    ex.add_argument("--out", help="one row per component: component, layer, kind, "
                                  "restored_logp, restores_argmax, kl_after_patch, ... (CSV, or "
                                  "Parquet for .parquet; configuration in NAME.json)")
    ex.add_argument("--json", help="the position's tokens, the lens per layer, the patching map "
                                   "and the ranking as JSON")


def run(args) -> int:
    from dtm_core.analysis.explain import explain
    from dtm_core.models.generation import encode_prompts

    opt.check_common(args)
    pair = opt.load_pair(args, [args.prompt])
    ids = encode_prompts(pair.tokenizer, [args.prompt], chat=args.chat)[0]
    e = explain(pair, ids, args.new_tokens, position=args.position, scope=args.scope,
                granularity=args.granularity, components=args.patch,
                reverse=not args.no_reverse, progress=opt.stderr_progress)
    config = {"command": "explain", "model": pair.dense.source, "pair": pair.label,
              "prompt": args.prompt, "chat": args.chat, "new_tokens": args.new_tokens,
              "position": e.position, "scope": args.scope, "granularity": args.granularity}
    ranked = e.ranked().drop(columns=["order"])
    if args.out:
        from dtm_core.measure.exports import write_table
        write_table(ranked, args.out, config)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({**config, **e.to_json()}, fh, indent=2)
    print(f"pair: {pair.dense.source} vs {pair.label}   position {e.position}: dense "
          f"{e.tokens['dense']!r} (log p {e.logp_dense:.3f}) vs compressed "
          f"{e.tokens['compressed']!r} (log p of the dense token {e.logp_compressed:.3f}), "
          f"KL {e.kl:.4g}")
    print(f"text before: {e.tokens['before']!r}")
    flip = e.lens_flip_layer
    print("logit lens: " + (f"the compressed model's lens first prefers its own token at layer "
                            f"{flip}" if flip is not None else "the lenses never part"))
    print(e.ranking())
    cols = ["component", "restored_logp", "restored_share", "restores_argmax", "kl_after_patch"]
    if not args.no_reverse:
        cols += ["reverse_flips_argmax", "reverse_kl"]
    print(ranked[cols].head(10).to_string(index=False))
    return 0
