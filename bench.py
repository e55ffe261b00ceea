"""
Benchmarks with printed tables (never timed assertions). Everything compared is measured in the
same run, interleaved, so ratios hold on a noisy machine; absolute numbers depend on the machine.

    python bench.py --suite ar                    # AR decoding: KV cache vs recompute (to the context,
                                                  # at most 1,024 tokens, or --max-new-tokens); training tok/s
    python bench.py --suite compare --ckpt CKPT --draft-ckpt DRAFT
                                                  # AR, Orthrus K=4..32, two-model speculative decoding,
                                                  # prompt lookup: same base, prompts and run
    python bench.py --suite ablations --ckpt CKPT --draft-ckpt DRAFT --heads ce=...,self=...
                                                  # denoising steps, head training variants, prompt
                                                  # length, memory vs context, tokenizers

Definitions used in every table:
  tokens/cycle    committed tokens per cycle = per verify pass of the base model (the prefill
                  token not counted; AR: 1)
  tokens/forward  committed tokens per decoding forward pass of ANY model: Orthrus draft + verify,
                  two-model speculative decoding gamma draft-model steps + verify, prompt lookup
                  verify only
  distinct-8      distinct 8-grams / all 8-grams of the output; low = the text loops (easy to draft)
  ceiling         tokens/cycle x t(1-token AR step) / t(the forward passes of one cycle), from pass
                  costs measured in this run: the speedup the method can reach here
"""

import argparse
import json
import os

from benchmarks.suites import check_lists, suite_ablations, suite_ar, suite_compare
from cli import ArgumentParser, add_runtime_flags, pick_device, run_cli, set_threads
from diffusion_head import check_draft_lens
from errors import UserError


def build_parser():
    p = ArgumentParser(__doc__)
    p.add_argument("--suite", default="compare", choices=["ar", "compare", "ablations"], help="which benchmark to run")
    p.add_argument("--ckpt", default="", help="base+head checkpoint (suite ar: optional, else a fresh CPU-preset model)")
    p.add_argument("--base", default=None, help="a head for a pretrained base: where the base is, if it moved from "
                   "where the head recorded it")
    p.add_argument("--draft-ckpt", default="", help="draft model for two-model speculative decoding (train.py --preset draft)")
    p.add_argument("--data-dir", default="", help="prepared data whose val split gives the prompts (default: the checkpoint's)")
    p.add_argument("--prompts", default="", help="a prompt file instead (JSONL with a \"prompt\" field, e.g. data/chat_prompts.py's "
                   "held-out split, or blank-line separated text); --num-prompts of them")
    p.add_argument("--chat", action="store_true", help="with --prompts: wrap each in the model's chat format, stop at its end of turn")
    p.add_argument("--num-prompts", type=int, default=10, help="held-out prompts to decode (the first N of --prompts, or val windows of --data-dir)")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per prompt (suite ar: to the "
                   "context, at most 1,024, unless given)")
    p.add_argument("--methods", default="ar,orthrus,draft-model,prompt-lookup", help="compare: which methods (AR always runs): ar, orthrus, orthrus-tree "
                   "(greedy only), orthrus-fused, draft-model, prompt-lookup")
    p.add_argument("--draft-lens", default="4,8,16,32", help="Orthrus draft lengths K to compare")
    p.add_argument("--tree-nodes", default="15,31", help="orthrus-tree: draft nodes per token tree (comma list)")
    p.add_argument("--tree-width", type=int, default=4, help="orthrus-tree: candidate tokens per position")
    p.add_argument("--gammas", default="4", help="tokens the draft model drafts per cycle")
    p.add_argument("--lookup-gammas", default="8", help="tokens prompt lookup drafts per cycle (at most)")
    p.add_argument("--modes", default="greedy,sampling", help="greedy, sampling (temperature 0.7, top-k 50) or both")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (median reported, spread shown)")
    p.add_argument("--loop-threshold", type=float, default=0.5, help="distinct-8 below this counts as looping text")
    p.add_argument("--ablations", default="denoise,heads,prompt-length,memory,tokenizer", help="ablations suite: which")
    p.add_argument("--draft-len", "--ablation-k", dest="draft_len", type=int, default=8,
                   help="ablations: Orthrus draft length K (the CPU head's best; also --ablation-k)")
    p.add_argument("--heads", default="", help="ablations: label=path,... other heads trained on the same base (KL vs CE, corpus vs self)")
    p.add_argument("--prompt-lens", default="32,128,256,384,448", help="ablations: prompt lengths toward the context limit")
    p.add_argument("--tokenizer-ckpts", default="", help="ablations: label=path,... base+head checkpoints with other tokenizers")
    add_runtime_flags(p, threads=1, dtypes=("float32", "bfloat16"))
    p.add_argument("--json", default="", help="also write the results here as JSON")
    return p


def given_flags(argv) -> set:
    """The flags the command line sets explicitly (as dests): a parser whose defaults are all
    suppressed returns only those."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def main(argv=None):
    args = build_parser().parse_args(argv)
    given = given_flags(argv)
    if args.suite == "ar" and "num_prompts" in given:
        raise UserError("--num-prompts is for --suite compare and ablations; --suite ar decodes one fixed prompt "
                        "(--max-new-tokens and --repeats apply)")
    if args.suite != "ar" and "methods" in given and "draft-model" in args.methods.split(",") and not args.draft_ckpt:
        raise UserError("--methods draft-model needs --draft-ckpt PATH, the small model that drafts (train.py "
                        "--preset draft)")
    check_draft_lens([args.draft_len], "--draft-len")
    for name in ("num_prompts", "prompt_len", "max_new_tokens", "repeats", "threads"):
        minimum = {"threads": 0}.get(name, 1)
        if getattr(args, name) < minimum:
            raise UserError(f"--{name.replace('_', '-')} must be >= {minimum}, got {getattr(args, name)}")
    check_lists(args)  # every flag before anything is loaded
    if args.suite == "ar" and "max_new_tokens" not in given:
        args.max_new_tokens = None  # suite ar decodes to the context (at most 1,024 tokens) unless told
    if args.json and not os.access(os.path.dirname(os.path.abspath(args.json)), os.W_OK):
        raise UserError(f"--json {args.json}: cannot write into {os.path.dirname(os.path.abspath(args.json))}; "
                        "pass a path in a folder you can write to")
    set_threads(args.threads)  # first: pick_device reports the thread count
    device = pick_device(args.device)
    suite = {"ar": suite_ar, "compare": suite_compare, "ablations": suite_ablations}[args.suite]
    results = suite(args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    run_cli(main)
